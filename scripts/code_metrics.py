"""The code-shape figures issue 21 asks for, before and after: lines per command module, places
that catch KeyboardInterrupt, parse_spec call sites, the largest functions and modules, README
length.

    python scripts/code_metrics.py            # this checkout
    python scripts/code_metrics.py /tmp/old   # another checkout (e.g. a git worktree of an older commit)

Counts come from the source's syntax tree (ast), not from grep, so comments and strings do not count.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("billion", "backends")


def python_files(root: Path):
    for package in PACKAGES:
        yield from sorted((root / package).rglob("*.py"))


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def main(root: Path) -> None:
    catches, mentions, parse_spec_calls, funcs, modules = [], [], [], [], []
    for f in python_files(root):
        rel = f.relative_to(root)
        text = f.read_text()
        tree = ast.parse(text)
        modules.append((len(text.splitlines()), str(rel)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "KeyboardInterrupt":
                mentions.append(f"{rel}:{node.lineno}")
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                names = [n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)]
                if "KeyboardInterrupt" in names:
                    catches.append(f"{rel}:{node.lineno}")
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else None
                if name == "parse_spec":
                    parse_spec_calls.append(f"{rel}:{node.lineno}")
        for fn in functions(tree):
            funcs.append((fn.end_lineno - fn.lineno + 1, f"{rel}:{fn.lineno} {fn.name}"))

    commands = sorted((len(p.read_text().splitlines()), p.name) for p in (root / "billion" / "commands").glob("*.py"))
    print(f"command modules ({len(commands)}), lines: " + ", ".join(f"{n} {c}" for c, n in sorted(commands,
                                                                                             key=lambda x: x[1])))
    print(f"  total {sum(c for c, _ in commands)}, largest {max(commands)[0]} ({max(commands)[1]})")
    print(f"places that catch KeyboardInterrupt: {len(catches)}: {', '.join(catches)}")
    print(f"KeyboardInterrupt named in code (catches and raises): {len(mentions)}")
    print(f"parse_spec call sites: {len(parse_spec_calls)}: {', '.join(parse_spec_calls)}")
    funcs.sort(reverse=True)
    over = [f for f in funcs if f[0] > 60]
    print("largest functions: " + "; ".join(f"{n} lines {where}" for n, where in funcs[:3]))
    print(f"functions over 60 lines: {len(over)}")
    modules.sort(reverse=True)
    print("largest modules: " + "; ".join(f"{n} lines {where}" for n, where in modules[:3]))
    readme = root / "README.md"
    print(f"README.md: {len(readme.read_text().splitlines())} lines")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent))
