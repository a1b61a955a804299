"""Reading a JSON-lines data file (fine-tune rows, MMLU questions): one rule for what a bad line is.

A line that is not UTF-8, or not JSON (cut short, an integer longer than Python parses, nesting
deeper than its parser goes), is a UserError naming file:line; blank lines are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from backends.types import UserError


def json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, the line's JSON value) for every non-blank line of `path`."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not UTF-8 text (byte {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            except (ValueError, RecursionError) as e:  # an over-long integer, nesting too deep
                raise UserError(f"{where}: not readable JSON ({str(e).splitlines()[0][:120]})") from None
