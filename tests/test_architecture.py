"""The house rules, checked on the source: rooms import downwards only (no cycles), never another room's underscore
names; nothing below the sweep imports the report or deploy; a room is readable in one sitting and says what it owns;
the files that ship in a bundle import neither torch nor dse. `python tests/test_architecture.py` prints the graph."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dse"
SHIPPED = PACKAGE / "deploy" / "bundle"
MAX_LINES = 500
# Rooms below the sweep: what a trial's training and measuring lean on.
BELOW_SWEEP = (
    "dse.train",
    "dse.step",
    "dse.fused",
    "dse.autotune",
    "dse.checkpoint",
    "dse.optim",
    "dse.storage",
    "dse.study",
    "dse.front",
    "dse.latency",
    "dse.pruning",
    "dse.identity",
    "dse.measure",
    "dse.data",
    "dse.config",
    "dse.models",
)


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, ast.Module]:
    return {_module(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py")) if SHIPPED not in p.parents}


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names) of every `from dse... import names` and `import dse...`, anywhere in the file."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dse":
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "dse"]
    return found


def import_graph() -> dict[str, set[str]]:
    """Each dse module -> the dse modules it imports (a package's `from dse.x import y` counts y when y is a module)."""
    sources = _sources()
    graph: dict[str, set[str]] = {}
    for name, tree in sources.items():
        targets = set()
        for module, names in _imports(tree):
            subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in sources]
            targets |= set(subs) if subs and len(subs) == len(names) else {module}
        graph[name] = {t for t in targets if t != name and t in sources}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def test_no_import_cycles():
    graph = import_graph()
    # A package's __init__ re-exports its rooms; a room importing its own package's public names is no cycle.
    rooms = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    assert _cycle(rooms) is None


def test_no_room_imports_another_room_s_underscore_names():
    bad = [
        (name, module, n)
        for name, tree in _sources().items()
        for module, names in _imports(tree)
        for n in names
        if n.startswith("_") and module != name
    ]
    assert bad == []


@pytest.mark.parametrize("below", BELOW_SWEEP)
def test_nothing_below_the_sweep_imports_the_sweep_report_or_deploy(below):
    graph = import_graph()
    mine = {m: ts for m, ts in graph.items() if m == below or m.startswith(below + ".")}
    upward = {
        m: sorted(t for t in ts if t.startswith(("dse.sweep", "dse.report", "dse.deploy"))) for m, ts in mine.items()
    }
    assert {m: ts for m, ts in upward.items() if ts} == {}


def test_every_room_says_what_it_owns_lists_its_names_and_fits_in_one_sitting():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path} has no module docstring"
        assert len(path.read_text().splitlines()) <= MAX_LINES, f"{path} is over {MAX_LINES} lines"
        if path.name not in ("__main__.py",) and SHIPPED not in path.parents and path.name != "__init__.py":
            names = {
                t.id
                for node in tree.body
                if isinstance(node, ast.Assign)
                for t in node.targets
                if isinstance(t, ast.Name)
            }
            assert "__all__" in names, f"{path} has no __all__"


def test_the_files_that_ship_in_a_bundle_import_neither_torch_nor_dse():
    for path in SHIPPED.glob("*.py"):
        roots = {
            n.split(".")[0]
            for node in ast.walk(ast.parse(path.read_text()))
            for n in (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
        }
        assert not roots & {"torch", "dse", "torchvision"}, path


if __name__ == "__main__":
    for module, targets in sorted(import_graph().items()):
        print(f"{module:24} -> {', '.join(sorted(targets)) or '-'}")
