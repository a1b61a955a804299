"""The README and docs/ stay true to the CLI: every `billion ...` line in their ```bash blocks parses
with the real click commands (an unknown command or option, a missing value or a bad choice fails,
quoting the line), and the README stays short and keeps the test command CI runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEST_COMMAND = "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
PROGRAMS = ("billion", ".venv/bin/billion")


def bash_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line inside a ```bash block."""
    out, inside = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"\s*```(\w*)", line)
        if fence:
            inside = not inside and fence.group(1) == "bash"
            continue
        if inside:
            out.append((n, line))
    return out


def billion_commands(line: str) -> list[list[str]]:
    """The argument lists of the `billion` commands on a line: a chain is split on `&&`, a trailing
    `# comment` is dropped (shlex, so a quoted '#' stays), so is a trailing `&` (run in the
    background), and `... -m billion ARGS` (torchrun, mlx.launch) counts too."""
    words = shlex.split(line, comments=True)
    if words and words[-1] == "&":
        words = words[:-1]
    parts, current = [], []
    for w in words:
        if w == "&&":
            parts.append(current)
            current = []
        else:
            current.append(w)
    parts.append(current)
    found = []
    for part in parts:
        if part and part[0] in PROGRAMS:
            found.append(part[1:])
        elif "billion" in part and part.index("billion") > 0 and part[part.index("billion") - 1] == "-m":
            found.append(part[part.index("billion") + 1:])
    return found


def documented_commands() -> list[tuple[str, list[str]]]:
    cases = []
    for path in DOCS:
        for n, line in bash_lines(path):
            for args in billion_commands(line):
                cases.append((f"{path.relative_to(ROOT)}:{n}: {line.strip()}", args))
    return cases


def parse(args: list[str]) -> None:
    """Parse as the CLI would, without running anything: the group, then the subcommand."""
    from billion.cli import cli

    ctx = cli.make_context("billion", list(args))
    rest = [*ctx._protected_args, *ctx.args] if hasattr(ctx, "_protected_args") else [*ctx.protected_args, *ctx.args]
    assert rest, "no command"
    name, *sub_args = rest
    command = cli.get_command(ctx, name)
    if command is None:
        raise click.UsageError(f"no such command {name!r}")
    try:
        command.make_context(name, sub_args, parent=ctx)
    except click.BadParameter as e:
        # Example paths (an adapter folder, a records folder) need not exist where the tests run:
        # the argument was recognised, which is what this test checks.
        if not (isinstance(e.param.type, click.Path) and "does not exist" in e.format_message()):
            raise


CASES = documented_commands()


def test_docs_show_commands():
    assert len(CASES) >= 30, [c for c, _ in CASES]
    files = {case.split(":")[0] for case, _ in CASES}
    assert "README.md" in files


@pytest.mark.parametrize("where,args", CASES, ids=[c for c, _ in CASES])
def test_documented_command_parses(where, args, monkeypatch):
    monkeypatch.chdir(ROOT)  # relative paths in the examples (results/) are the repository's
    try:
        parse(args)
    except (click.UsageError, click.BadParameter) as e:
        pytest.fail(f"{where}\n  -> {e.format_message()}")


def test_parse_rejects_unknown_options():
    with pytest.raises(click.UsageError):
        parse(["bench", "--no-such-option"])
    with pytest.raises(click.UsageError):
        parse(["no-such-command"])


def test_readme_is_short_and_keeps_the_test_command():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 160
    assert TEST_COMMAND in text.splitlines() or TEST_COMMAND in text
    assert any(line.strip() == TEST_COMMAND for _, line in bash_lines(ROOT / "README.md"))


def test_docs_links_resolve():
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to missing {target}"
