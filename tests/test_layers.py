"""The package's imports point down one layer order, and function-local imports say why.

Every import in src/mquant (module level, inside functions, under TYPE_CHECKING) is read with
`ast`. An import from package A into package B must not point up the order below, and the package
graph must have no cycle (packages on one layer may use each other only one way). A function-local
import is allowed to defer a heavy or optional dependency (or, rarely, to break a module cycle),
and must carry a comment saying so on its line or on the comment line(s) right above it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mquant"

# Lower first. The default model (`demo`) is a model source and a dataset like a hub id: loading
# (io) and calibration data (calib) use it, so it sits next to `models`, below them.
LAYERS: dict[str, int] = {
    "errors": 0, "config": 0, "progress": 0,
    "models": 1, "demo": 1,
    "core": 2,
    "quantizers": 3, "steps": 3, "kernels": 3,
    "calib": 4,
    "io": 5,
    "api": 6, "__init__": 6,
    "eval": 7, "testing": 7, "serving": 7,
    "cli": 8,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def _target(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path):
    """(target module, line number, inside a function) for each mquant import in `path`."""
    module, tree = _module_name(path), ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            targets = [_target(node, module, path.name == "__init__.py")]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            yield module, target, node, id(node) in local


def _all_imports():
    return [(path, *item) for path in sorted(SRC.rglob("*.py")) for item in _imports(path)]


def test_every_package_has_a_layer():
    packages = {_package(_module_name(p)) for p in SRC.rglob("*.py")}
    missing = sorted(packages - set(LAYERS))
    assert not missing, f"packages without a layer in tests/test_layers.py: {missing}; add them to LAYERS"


def test_imports_point_down_the_layer_order():
    upward = []
    for path, module, target, node, _ in _all_imports():
        if not target.startswith("mquant"):
            continue
        src, dst = _package(module), _package(target)
        if src != dst and LAYERS[dst] > LAYERS[src]:
            upward.append(f"{path.relative_to(SRC)}:{node.lineno} {src} (layer {LAYERS[src]}) imports {target} (layer {LAYERS[dst]})")
    assert not upward, "imports pointing up the layer order:\n" + "\n".join(upward)


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = defaultdict(set)
    for _, module, target, _, _ in _all_imports():
        if target.startswith("mquant") and _package(module) != _package(target):
            graph[_package(module)].add(_package(target))
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return trail + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, trail + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            raise AssertionError(f"import cycle between packages: {' -> '.join(cycle)}")


def _has_reason(lines: list[str], lineno: int) -> bool:
    """A comment on the import's line, or comment lines right above it (imports may stack)."""
    if "#" in lines[lineno - 1]:
        return True
    i = lineno - 2
    while i >= 0 and lines[i].strip().startswith(("from ", "import ")) and "#" not in lines[i]:
        i -= 1
    return i >= 0 and (lines[i].strip().startswith("#") or ("#" in lines[i] and lines[i].strip().startswith(("from ", "import "))))


def test_function_local_imports_say_why():
    unexplained = []
    sources: dict[Path, list[str]] = {}
    for path, _, target, node, local in _all_imports():
        if not local:
            continue
        lines = sources.setdefault(path, path.read_text().splitlines())
        if not _has_reason(lines, node.lineno):
            unexplained.append(f"{path.relative_to(SRC)}:{node.lineno} import {target}")
    assert not unexplained, ("function-local imports without a one-line reason (move them to module level, or say "
                             "which heavy/optional dependency they defer):\n" + "\n".join(sorted(set(unexplained))))


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    """The walk must not miss the kinds of import it polices."""
    code = "from .x import y\n\ndef f():\n    from mquant.cli import main\n    import json\n"
    path = SRC / "core" / "_probe_for_test.py"
    tree = ast.parse(code)
    kinds = []
    local = {id(n) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef) for n in ast.walk(fn)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            kinds.append((_target(node, "mquant.core._probe_for_test", False), id(node) in local))
    assert ("mquant.core.x", False) in kinds and ("mquant.cli", True) in kinds
    assert _package("mquant.cli") == "cli" and _package("mquant") == "__init__"
    assert not _has_reason(["def f():", "    import json"], 2) and _has_reason(["    # lazy: slow", "    import json"], 2)
    assert not path.exists()
