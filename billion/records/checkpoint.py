"""Resume: what a long run has finished, appended as JSON lines as it goes.

One mechanism for every resumable task (mmlu, humaneval, eval): the runner names the file after a hash
of the run's identity (billion/runner.py `Runner.checkpoint`), the task appends one line per
finished item, a rerun of the same command reads them back. A last line torn by a crash or a
Ctrl-C is skipped, not an error; the file is removed once the run completes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Callable, Iterable


class Checkpoint:
    def __init__(self, path: Path, decode: Callable[[dict], object] = dict):
        self.path = Path(path)
        self.decode = decode  # a line's JSON object -> the task's item (e.g. a dataclass)

    def load(self) -> list:
        """The items finished so far, in order; lines that do not decode (torn by a crash) are skipped."""
        items = []
        if not self.path.is_file():
            return items
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                items.append(self.decode(json.loads(line)))
            except (ValueError, TypeError, KeyError):
                continue
        return items

    def append(self, items: Iterable) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = self.path.is_file() and self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n")
        with open(self.path, "a") as f:
            if torn:  # start on a line of our own, not on the end of the torn one
                f.write("\n")
            for item in items:
                f.write(json.dumps(asdict(item) if is_dataclass(item) else item) + "\n")
            f.flush()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
