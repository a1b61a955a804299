"""`billion quantize`: write a quantized model folder that loads back in the same engine."""

from __future__ import annotations

from pathlib import Path

import click

from billion.options import engines, model_options, results_option
from billion.ui import console, fmt

VERIFY_TEXT = "The quick brown fox jumps over the lazy dog. Quantization stores weights in fewer bits."


@click.command()
@model_options(skip=("quantize", "compile"))
@click.option("--bits", type=click.Choice(["4", "8"]), required=True, help="Bits per weight.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder to write (new or empty).")
@results_option
def quantize(model, backend, bits, group_size, out, device, dtype, trust_remote_code, results_dir):
    """Quantize a model's weights to 4 or 8 bits and save the folder.

    MLX writes what `mlx_lm.convert -q` writes (affine, packed uint32, `quantization` in
    config.json); torch writes a transformers folder with torchao weights and a
    TorchAoConfig (on CPU, torchao saves int4 values one per byte). The folder is then a
    model like any other: `billion bench --model OUT --backend <same engine>`. It is
    loaded back once here and its logits checked against the model just quantized.
    """
    from backends.types import UserError
    from billion.loading import LoadOptions, resolve
    from billion.runner import Runner

    names = engines(backend)
    if len(names) != 1:
        raise UserError("a quantized folder belongs to one engine: choose --backend mlx or --backend torch")
    name, scheme, out = names[0], f"int{bits}", Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty")
    options = LoadOptions(device=device, dtype=dtype, trust_remote_code=trust_remote_code, group_size=group_size)
    settings = {"bits": int(bits), "group_size": group_size, "out": str(out)}
    with Runner("quantize", resolve(model), options, settings, results_dir) as runner:
        for run in runner.engines([name]):
            full_bytes = run.info.weight_bytes
            with console.status(f"quantizing to {scheme} and writing {out}..."):
                description = run.backend.save_quantized_folder(out, scheme, group_size)
            ids = run.backend.tokenize(VERIFY_TEXT)
            expected, quant_bytes = run.backend.logits(ids), run.backend.info().weight_bytes
            with runner.loaded(name, model=resolve(str(out)), label=str(out)) as again:
                diff = float(abs(again.logits(ids) - expected).max())
                loaded_as = again.info().quantization
            folder_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            console.print(f"[bold]{name}[/]: {description}")
            console.print(f"  weights in memory {fmt(full_bytes / 1e9, 3)} GB -> {fmt(quant_bytes / 1e9, 3)} GB "
                          f"({quant_bytes / full_bytes:.2f}x); safetensors on disk {fmt(folder_bytes / 1e9, 3)} GB")
            console.print(f"  loaded back as: {loaded_as}; max |Δlogit| against the model just quantized: {diff:.2e}")
            if diff > 1e-3:
                raise UserError(f"the folder written to {out} does not load back to the same model "
                                f"(max |Δlogit| {diff:.2e})")
            metrics = {"weight_gb_full": full_bytes / 1e9, "weight_gb_quant": quant_bytes / 1e9,
                       "weight_ratio": quant_bytes / full_bytes, "safetensors_gb": folder_bytes / 1e9,
                       "round_trip_max_abs_logit_diff": diff}
            runner.record(run, metrics, config={"description": description})
