"""`billion adapter-convert` and `billion adapter-fuse`: LoRA adapters across engines."""

from __future__ import annotations

import click

from billion.commands import console


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
    from backends.adapters import convert, detect

    kind = detect(source)
    written = convert(source, dest, to)
    console.print(f"{source} ({kind}) -> {dest} ({written})")


@click.command()
@click.option("--model", "-m", envvar="BILLION_MODEL", required=True,
              help="The base model the adapter was trained on (spec or folder).")
@click.argument("adapter", type=click.Path(exists=True, file_okay=False))
@click.argument("dest", type=click.Path(file_okay=False))
def adapter_fuse(model, adapter, dest):
    """Merge a LoRA adapter (either format) into its base model: an HF-format folder both engines load."""
    from backends.adapters import fuse
    from billion.loading import model_folder

    out = fuse(model_folder(model), adapter, dest)
    console.print(f"fused model: {out}")
