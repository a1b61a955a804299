"""What every command shows on the terminal: the console, number formatting, the engine line,
progress bars. Kept apart from the options (billion/options.py) and the run loop (billion/runner.py)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

# Piped output (logs, CI) gets 120 columns rather than rich's 80, so tables are not cut.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


def print_engine(name: str, info, parameters: bool = False) -> None:
    """The line each command prints once a model is loaded: what runs (with its parameter count if
    asked), in what precision, where."""
    count = f" {info.parameters:,} parameters," if parameters else ""
    console.print(f"[bold]{name}[/]: {info.architecture},{count} {info.dtype} on {info.device}"
                  + (f", {info.quantization}" if info.quantization else "")
                  + (", compiled decode" if info.compiled else ""))


def progress_bar(label: str) -> Progress:
    """A transient bar with a count and the time remaining (MMLU questions, HumanEval problems)."""
    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                    transient=True)


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) < 0.01 and value != 0:
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)
