"""The package's import graph: data flows one way. Each module imports only from its own layer or
the layers below it, and no two modules import each other, directly or around a loop."""

from __future__ import annotations

import ast
from pathlib import Path

import fpn_cli

PACKAGE = Path(fpn_cli.__file__).parent

# lowest first: a module may import from its own layer and those before it
LAYERS = (
    ("fpn_cli.errors", "fpn_cli.version", "fpn_cli.layout"),
    ("fpn_cli.inputs",),
    ("fpn_cli.models",),
    ("fpn_cli.formats",),
    ("fpn_cli.regions",),
    ("fpn_cli.run", "fpn_cli.report"),
    ("fpn_cli.cli", "fpn_cli.console", "fpn_cli.__main__", "fpn_cli"),
)


def layer_of(module: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``module`` imports (at any depth of its code)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(n for n in names if n in known and n != module)
    return found


def test_no_module_imports_from_a_layer_above_its_own():
    mods = modules()
    upward = sorted(
        f"{m} -> {i}"
        for m, path in mods.items()
        for i in imports(m, path, set(mods))
        if layer_of(i) > layer_of(m)
    )
    assert upward == []


def test_the_import_graph_has_no_cycle():
    mods = modules()
    graph = {m: imports(m, p, set(mods)) - {m} for m, p in mods.items()}
    # a package's __init__ importing its own modules is no cycle of concern
    graph = {m: {i for i in deps if not i.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert cycles == []
