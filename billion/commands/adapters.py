"""`billion adapter-convert` and `billion adapter-fuse`: LoRA adapters across engines."""

from __future__ import annotations

import click

from billion.ui import console


@click.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--to", type=click.Choice(["mlx", "peft"]), default=None,
              help="Target format. Default: the other engine's (mlx-lm <-> PEFT).")
def adapter_convert(source, dest, to):
    """Convert a LoRA adapter folder between mlx-lm's format and PEFT's.

    mlx-lm (adapters.safetensors, lora_a [in, r], `scale`) <-> PEFT
    (adapter_model.safetensors, lora_A.weight [r, in], lora_alpha / r), so an
    adapter trained on one engine runs on the other (`mlx_lm.load(..., adapter_path=)`,
    `PeftModel.from_pretrained`).
    """
    from backends.folders.adapters import convert, detect

    kind = detect(source)
    written = convert(source, dest, to)
    console.print(f"{source} ({kind}) -> {dest} ({written})")


@click.command()
@click.option("--model", "-m", envvar="BILLION_MODEL", required=True,
              help="The base model the adapter was trained on (spec or folder).")
@click.argument("adapter", type=click.Path(exists=True, file_okay=False))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--keep-fused-layers-full", is_flag=True,
              help="Quantized base: leave the layers the adapter changed in full precision instead of "
                   "re-quantizing them (for adapters smaller than a quantization step).")
def adapter_fuse(model, adapter, dest, keep_fused_layers_full):
    """Merge a LoRA adapter (either format) into its base model: an HF-format folder both engines load."""
    from backends.folders import hf_folder
    from backends.folders.adapters import fuse
    from billion.loading import resolve

    model = resolve(model)
    base = model.folder
    config = hf_folder.read_config(base)
    if "quantization" in config or "quantization_config" in config:
        from billion.tasks.quantized_fuse import fuse_folder

        engine = "mlx" if "quantization" in config else "torch"  # mlx-lm's key / transformers' key
        with console.status(f"fusing into the quantized base on {engine} (dequantize, fuse, re-quantize, check)..."):
            check = fuse_folder(engine, model, adapter, dest, requantize=not keep_fused_layers_full)
        console.print(f"fused model: {dest} ({check['fuse']}; the fused logits keep "
                      f"{check['adapter_effect_kept']:.0%} of the adapter's effect)")
        return
    out = fuse(base, adapter, dest)
    console.print(f"fused model: {out}")
