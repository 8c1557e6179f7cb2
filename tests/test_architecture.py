"""The package's shape: data flows one way between modules, and one folder talks to each
pruning engine (NNI, Torch-Pruning).

Both rules are about every import, including those written inside functions, because a
function-level import only hides a circle from Python's loader, not from the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "pipeline"
NNI_HOME = PACKAGE / "pruning" / "nni"
TP_HOME = PACKAGE / "pruning" / "tp"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, package: str) -> set[str]:
    """Every absolute module name an import statement anywhere in `source` names, with
    `from a import b` counted as `a.b` (b may be a module) as well as `a`. `package`: the
    package relative imports start from."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def imports_of(path: Path) -> set[str]:
    name = module_name(path)
    return imported_names(
        path.read_text(), name if path.name == "__init__.py" else name.rpartition(".")[0]
    )


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: {target for target in imports_of(path) if target in files and target != name}
        for name, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    trail: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        trail.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*trail[trail.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        trail.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_finder_sees_a_circle_through_a_function_level_import():
    # The rule above is only worth as much as the finder: an import hidden inside a function,
    # relative or absolute, must close the circle.
    graph = {"pipeline.a": {"pipeline.b"}, "pipeline.b": {"pipeline.c"}, "pipeline.c": set()}
    assert find_cycle(graph) is None
    hidden = "import os\n\ndef later():\n    from . import a\n    import pipeline.b\n"
    assert {"pipeline.a", "pipeline.b"} <= imported_names(hidden, "pipeline")
    graph["pipeline.c"] = imported_names(hidden, "pipeline") & set(graph)
    assert find_cycle(graph) == ["pipeline.a", "pipeline.b", "pipeline.c", "pipeline.a"]


def importers_outside(home: Path, package: str) -> list[str]:
    """The package's files outside `home` that import `package` (or a module of it)."""
    return sorted(
        str(path.relative_to(SRC))
        for path in PACKAGE.rglob("*.py")
        if home not in path.parents
        and any(n == package or n.startswith(f"{package}.") for n in imports_of(path))
    )


def test_only_the_nni_engine_folder_imports_nni():
    assert importers_outside(NNI_HOME, "nni") == []


def test_only_the_torch_pruning_engine_folder_imports_torch_pruning():
    assert importers_outside(TP_HOME, "torch_pruning") == []


def test_there_are_exactly_five_stages():
    stages = sorted(p.stem for p in (PACKAGE / "stages").glob("*.py") if p.stem != "__init__")
    assert stages == ["baseline", "finetune", "measure", "prune", "speedup"]
