"""The layering the README's architecture section promises, read from the code's imports:
faces (CLI, REST, UI, export, monitoring, Ray...) -> core (detector) -> features/data ->
config/errors; no import runs back up a layer, no package circle, no module over 500 lines."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "defectscope"

# Lower numbers sit lower: a unit may import only from its own layer or below.
LAYERS = {
    "errors": 0,
    "version": 0,
    "config": 1,
    "storage": 1,
    "data": 2,
    "features": 2,
    "detector": 3,
}
FACE = 4  # everything else: evaluation, export, monitoring, serving, ui, cli, distributed, ...
MAX_LINES = 500


def unit(module: str) -> str:
    """'defectscope.detector.fitting' -> 'detector'; the package itself -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports() -> dict[str, set[str]]:
    """Every module's imports of defectscope modules, function-level imports included."""
    found: dict[str, set[str]] = defaultdict(set)
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "defectscope":
                    # `from defectscope import storage` imports the module storage.
                    found[module].update(f"defectscope.{alias.name}" for alias in node.names)
                elif node.module.startswith("defectscope."):
                    found[module].add(node.module)
            elif isinstance(node, ast.Import):
                found[module].update(
                    a.name for a in node.names if a.name.startswith("defectscope.")
                )
    return found


def layer(name: str) -> int:
    return LAYERS.get(name, FACE)


def test_no_import_runs_back_up_a_layer() -> None:
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in imports().items()
        for target in targets
        if unit(module) and unit(target) and layer(unit(target)) > layer(unit(module))
    )
    assert not upward, "\n".join(upward)


def test_core_has_no_private_reach_into_the_detector() -> None:
    # The staged fit and auto mode take explicit parts, never a Detector's private state.
    for name in ("fitting.py", "selection.py", "few_shot.py", "parts.py", "engine.py"):
        text = (PACKAGE / "detector" / name).read_text()
        assert "detector._" not in text and "from defectscope.detector.detector" not in text, name


def test_no_circle_between_packages() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for module, targets in imports().items():
        for target in targets:
            if unit(module) and unit(target) and unit(module) != unit(target):
                graph[unit(module)].add(unit(target))
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_no_module_over_the_size_limit() -> None:
    long = sorted(
        f"{file.relative_to(PACKAGE)}: {n} lines"
        for file in PACKAGE.rglob("*.py")
        if (n := len(file.read_text().splitlines())) > MAX_LINES
    )
    assert not long, "\n".join(long)
