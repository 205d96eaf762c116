"""The package's import graph, read from the source with ``ast`` (imports inside functions included): no
circles, layers that import downward only, and a runtime that never imports the export pipeline."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"edgelmm": ROOT / "edgelmm", "edgelmm.kernels": ROOT / "kernels", "edgelmm.export": ROOT / "export"}

# Each part of the package and the parts it may import (besides itself and the root package, whose __init__
# loads the API lazily). Lower parts never import higher ones.
BASE = {"errors", "paths", "process_memory"}
ALLOWED = {
    "errors": set(), "paths": set(), "process_memory": set(),
    "kernels": BASE, "backends": set(),  # backends/__init__ names the two backends only
    "config": BASE, "processing": BASE, "sampling": BASE,
    "spec": BASE | {"config", "processing"},
    "checkpoint": BASE | {"config", "processing", "spec"},
    "families": BASE | {"config", "processing", "spec", "checkpoint"},
    "models": BASE | {"config", "spec", "checkpoint", "kernels"},
    "generate": BASE | {"sampling", "spec"},
    "backends.onnx": BASE | {"config", "processing", "spec", "checkpoint", "families"},
    "synthetic": BASE | {"config", "processing", "spec", "checkpoint", "families", "models"},
    "plan": BASE | {"config", "spec", "checkpoint", "families", "models", "synthetic", "backends.onnx"},
    "backends.torch": BASE | {"config", "processing", "spec", "checkpoint", "families", "models", "plan"},
    "api": BASE | {"config", "processing", "sampling", "spec", "checkpoint", "families", "generate",
                   "backends.onnx", "backends.torch", "plan"},
}
RUNTIME = set(ALLOWED)
ALLOWED["bench"] = RUNTIME | {"api"}
ALLOWED["export"] = RUNTIME  # beside the runtime: reads its formats and models, never imported by it
ALLOWED["cli"] = RUNTIME | {"bench", "export.cli"}  # the command line composes everything


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The edgelmm modules ``path`` (module ``name``) imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        out.update(t for t in targets if t in known)
    return out - {name}


def part_of(module: str) -> str:
    """The part of the package a module belongs to (the keys of ALLOWED)."""
    rest = module.removeprefix("edgelmm.")
    if rest == "edgelmm":
        return "root"
    for part in sorted(ALLOWED, key=len, reverse=True):
        if rest == part or rest.startswith(part + "."):
            return part
    raise AssertionError(f"{module} belongs to no part of the layer table in {__file__}; add it there")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, name, set(found)) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circles(graph):
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_every_module_has_a_layer(graph):
    for module in graph:
        part_of(module)


def test_layers_import_downward_only(graph):
    wrong = []
    for module, targets in graph.items():
        own = part_of(module)
        if own == "root":
            continue
        for target in targets:
            theirs = part_of(target)
            sub = target.removeprefix("edgelmm.")
            if theirs not in (own, "root") and theirs not in ALLOWED[own] and sub not in ALLOWED[own]:
                wrong.append(f"{module} ({own}) imports {target} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_the_runtime_never_imports_the_exporter(graph):
    offenders = [f"{m} imports {t}" for m, targets in graph.items() for t in targets
                 if t.startswith("edgelmm.export") and part_of(m) in RUNTIME | {"bench"}]
    assert not offenders, "\n".join(offenders)
