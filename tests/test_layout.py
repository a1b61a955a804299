"""The shape DESIGN.md promises: imports go billion -> backends, and backends has no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports_of(path: Path, package: str) -> set[str]:
    """Modules of `package` that `path` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
            if node.module == package:  # from backends import hf_folder
                found.update(f"{package}.{a.name}" for a in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == package)
    return found


def modules(package: str) -> dict[str, Path]:
    out = {}
    for f in (ROOT / package).rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def test_backends_never_imports_billion():
    for name, f in modules("backends").items():
        assert not imports_of(f, "billion"), name


def test_no_import_cycles_in_backends():
    mods = modules("backends")
    graph = {m: {i for i in imports_of(f, "backends") if i in mods and i != m} for m, f in mods.items()}
    graph["backends"] = set()  # the registry names engines by string, imported lazily on purpose
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_the_plain_types_are_a_leaf():
    assert imports_of(ROOT / "backends" / "types.py", "backends") == set()


def test_commands_never_import_each_other():
    commands = {m for m in modules("billion") if m.startswith("billion.commands.")}
    for name in commands:
        others = imports_of(modules("billion")[name], "billion") & (commands - {name})
        assert not others, f"{name} imports {others}"
