"""`billion models`: the registry."""

from __future__ import annotations

import click
from rich.table import Table

from billion.commands import console


@click.command()
def models():
    """List the registered models, their aliases and what they need."""
    from billion.models import MODELS

    table = Table(title="models (use the alias, the Hub id, random:<alias> or tiny:<alias>)")
    for col in ("alias", "hub id", "params", "context", "architecture", "tokenizer", "licence", "drafts for"):
        table.add_column(col)
    for c in MODELS.values():
        aliases = c.alias + (f" ({', '.join(c.old_aliases)})" if c.old_aliases else "")
        table.add_row(aliases, c.hub_id, f"{c.parameters / 1e9:.2f}B", f"{c.context_length:,}", c.architecture,
                      c.tokenizer, c.licence, ", ".join(c.drafts_for))
    console.print(table)
