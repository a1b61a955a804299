"""`billion models`: the registry."""

from __future__ import annotations

import click

from billion.commands import console


@click.command()
def models():
    """List the registered models, their aliases and what they need.

    Use an alias, the Hub id, random:<alias> (real architecture, random weights) or
    tiny:<alias> (toy size) as --model.
    """
    from billion.models import MODELS

    for c in MODELS.values():
        aliases = ", ".join((c.alias, *c.old_aliases))
        console.print(f"[bold]{c.alias}[/]  {c.hub_id}")
        console.print(f"  aliases: {aliases}")
        console.print(f"  {c.parameters:,} parameters, {c.architecture}, context {c.context_length:,} tokens, "
                      f"{'chat' if c.chat else 'base model (no chat template)'}")
        console.print(f"  tokenizer: {c.tokenizer}")
        console.print(f"  licence: {c.licence}")
        if c.drafts_for:
            console.print(f"  can draft for: {', '.join(c.drafts_for)}")
