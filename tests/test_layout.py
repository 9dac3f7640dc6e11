"""The house layout stays one-way: no import cycles in trainer/, and data preparation (trainer/prep)
and training code share nothing but the on-disk contract (trainer/layout.py) and plain helpers."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "trainer"
SHARED = {"trainer.layout", "trainer.errors", "trainer.files", "trainer.years"}
"""Modules both rooms may import: the dataset contract, the user-error base, atomic writes, --years."""


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The trainer modules `path` imports anywhere in it (functions and TYPE_CHECKING blocks too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found.update(n for n in names if n in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {_module(p): p for p in PACKAGE.rglob("*.py")}
    return {m: _imports(p, set(paths)) - {m} for m, p in paths.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_trainer_imports_have_no_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    assert _cycle(graph) == [], " -> ".join(_cycle(graph))


def test_data_preparation_and_training_code_do_not_import_each_other() -> None:
    graph = import_graph()
    prep = {m for m in graph if m.startswith("trainer.prep")}
    training = set(graph) - prep - SHARED - {"trainer"}
    crossing = sorted(f"{m} -> {d}" for m in prep for d in graph[m] if d in training)
    crossing += sorted(f"{m} -> {d}" for m in training for d in graph[m] if d in prep)
    assert crossing == []
    for m in SHARED:
        assert graph[m] <= SHARED, f"{m} is shared by both rooms and may import only {SHARED}"


def test_data_preparation_does_not_need_torch() -> None:
    heavy = {"torch", "deepspeed", "open_clip", "webdataset", "torchvision"}
    shared = [PACKAGE / f"{m.split('.')[-1]}.py" for m in SHARED]
    for path in sorted((PACKAGE / "prep").rglob("*.py")) + shared:
        tree = ast.parse(path.read_text())
        used = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        used |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not used & heavy, f"{path.relative_to(REPO)} imports {sorted(used & heavy)}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
