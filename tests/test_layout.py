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


# What picks a token (the sampling rule, the acceptance rule, a library's own generation loop):
# called inside a loop, it is a decode loop.
TOKEN_CHOOSERS = {"sample", "multinomial", "accept", "generate_step", "stream_generate"}
# The one scheduler and the parts it drives (the proposers' draft loop, the rule itself).
SCHEDULER = {"backends.batching", "backends.speculation", "backends.sampling"}


def token_loops(source: str) -> list[int]:
    """Lines of loops that choose tokens: a for/while whose body calls one of TOKEN_CHOOSERS, or
    a model's own `generate` (HF's loop; a Backend's generate is the scheduler's)."""
    found = []
    for loop in ast.walk(ast.parse(source)):
        if not isinstance(loop, (ast.For, ast.While, ast.AsyncFor)):
            continue
        for node in ast.walk(loop):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            on_model = isinstance(f, ast.Attribute) and "model" in ast.unparse(f.value)
            if name in TOKEN_CHOOSERS or (name == "generate" and on_model):
                found.append(loop.lineno)
                break
    return found


def test_tokens_come_from_the_one_scheduler_only():
    """Issue 29: every generated token comes from backends/batching.py's scheduler. A module that
    samples tokens in a loop of its own (the four loops there were) fails this test."""
    old_loop = ("def session_tokens(model, prompt, gen):\n"
                "    logits = model.session().feed(prompt)\n"
                "    for n in range(gen.max_tokens):\n"
                "        token = sampling.sample(sampling.distribution(logits, gen), rng)\n"
                "        yield token\n")
    assert token_loops(old_loop) == [3]  # the check finds what it must
    assert token_loops("for x in xs:\n    out = self.model.generate(ids)\n") == [1]
    offenders = {name: token_loops(f.read_text()) for package in ("backends", "billion")
                 for name, f in modules(package).items() if name not in SCHEDULER}
    assert {name: lines for name, lines in offenders.items() if lines} == {}


def test_a_dialect_is_one_module_the_server_finds_and_holds_no_generation_logic():
    """billion/server/dialects/: every module there is served (its router, its error shape), so a
    new API is one new file; and a dialect only translates: it imports nothing from the engines,
    the grammars or the tool formats (answers.py and prompts.py do that for every dialect)."""
    from billion.server import dialects
    from billion.server.app import create_app

    folder = ROOT / "billion" / "server" / "dialects"
    found = {f"billion.server.dialects.{f.stem}" for f in folder.glob("*.py") if f.stem != "__init__"}
    assert {d.__name__ for d in dialects.ALL} == found and len(found) >= 3
    app = create_app({})
    served = set(app.openapi()["paths"])
    for dialect in dialects.ALL:
        assert {r.path for r in dialect.router.routes} <= served, dialect.__name__
        for name in imports_of(folder / f"{dialect.__name__.rsplit('.', 1)[1]}.py", "backends") | \
                imports_of(folder / f"{dialect.__name__.rsplit('.', 1)[1]}.py", "billion"):
            assert not name.startswith(("backends", "billion.server.engine", "billion.server.tool_formats",
                                        "billion.server.tools")), (dialect.__name__, name)
    shaped = [d for d in dialects.ALL if hasattr(d, "error_body")]
    assert [d.ERROR_PREFIX for d in shaped] == ["/v1/messages"]  # Anthropic's; the others answer OpenAI's
