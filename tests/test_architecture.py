"""The package's shape: imports flow one way (no cycles), the shared vocabulary stands alone, and
the run side never imports the report."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "ringbench"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """ringbench modules ``path`` imports at its top level (imports under ``if TYPE_CHECKING`` and inside
    functions run later, if at all, and cannot close a loop at import time)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from ringbench.run import env` imports a module; `from ringbench import register` a name.
            found |= {
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                for alias in node.names
            }
    return {name for name in found if name in modules}


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(paths)) for name, path in paths.items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for name in graph[todo.pop()] - seen:
            seen.add(name)
            todo.append(name)
    return seen


def test_no_module_imports_itself_through_others():
    graph = _graph()
    loops = sorted(name for name in graph if name in _reachable(graph, name))
    assert loops == []


def test_the_vocabulary_imports_nothing_from_the_package():
    assert _graph()["ringbench.vocabulary"] == set()


def test_the_run_side_does_not_import_the_report():
    graph = _graph()
    for name in graph:
        if name.startswith(("ringbench.run", "ringbench.sweep", "ringbench.attention", "ringbench.progress")):
            assert not {m for m in _reachable(graph, name) if m.startswith("ringbench.report")}, name
