"""The package's shape: the import graph of mimo/ (every import, including those inside functions and under
TYPE_CHECKING) has no cycle, and every import points down: ground floor <- wings <- commands.

    ground floor   mimo/*.py (config, model, tokenizer, checkpoint, weights, quantize, gguf, ...), hf/, kernels/,
                   benchmarks/
    wings          data/ -> inference/ -> eval/ -> train/, and serve/ over inference/ (ALLOWED below)
    commands       cli.py (the table of commands), speedrun.py, bench.py: may import anything
"""

from __future__ import annotations

import ast
from pathlib import Path

import mimo

PACKAGE = Path(mimo.__file__).resolve().parent
WINGS = ("data", "inference", "eval", "train", "serve")
COMMANDS = ("mimo.cli", "mimo.speedrun", "mimo.bench")
# wing -> the floors its modules may import (the ground floor: every module outside the wings and COMMANDS)
ALLOWED = {
    "ground": {"ground"},
    "data": {"ground", "data"},
    "inference": {"ground", "inference"},
    "eval": {"ground", "data", "inference", "eval"},
    "train": {"ground", "data", "inference", "eval", "train"},
    "serve": {"ground", "inference", "serve"},
}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under mimo/."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("mimo", *path.relative_to(PACKAGE).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the mimo modules it imports anywhere in its file (`from mimo import x` counts as mimo.x)."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = name.split(".")[: None if is_package else -1]
                    parent = parent[: len(parent) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{a.name}" for a in node.names)
        deps = set()
        for target in targets:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target not in (name, "mimo"):
                deps.add(target)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def floor(module: str) -> str:
    """'commands', a wing's name, or 'ground'."""
    if module in COMMANDS:
        return "commands"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in WINGS else "ground"


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    found = cycles(graph)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports, {len(found)} cycles")
    assert found == []


def test_every_import_points_down():
    upward = [f"{m} ({floor(m)}) imports {d} ({floor(d)})" for m, deps in sorted(import_graph().items())
              for d in sorted(deps) if floor(m) != "commands" and floor(d) not in ALLOWED[floor(m)]]
    assert upward == []


def test_the_wings_are_plain_packages():
    for wing in WINGS:
        assert (PACKAGE / wing / "__init__.py").read_text() == ""


def test_sampling_is_a_leaf_under_the_engine_and_the_speculator():
    graph = import_graph()
    assert graph["mimo.inference.sampling"] <= {"mimo.errors"}
    assert "mimo.inference.sampling" in graph["mimo.inference.speculative"] & graph["mimo.inference.engine"]
    assert "mimo.inference.engine" not in graph["mimo.inference.speculative"]
