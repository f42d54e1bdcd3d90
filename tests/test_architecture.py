"""The import graph: no cycle (module-level or deferred imports), stages import only downward,
and every module imports in a fresh interpreter in dependency order (docs/ARCHITECTURE.md)."""

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "alchemist_jax"

# Floors, bottom first. A module may import modules of its own floor (the graph stays acyclic)
# and of the floors below; never of a floor above. Names are module prefixes.
FLOORS = (
    ("alchemist_jax.runtime",),
    ("alchemist_jax.meta", "alchemist_jax.config"),
    ("alchemist_jax.data",),
    ("alchemist_jax.models",),
    (
        "alchemist_jax.alignment",
        "alchemist_jax.rating",
        "alchemist_jax.training",
        "alchemist_jax.evaluation",
        "alchemist_jax.encoding",
    ),
    ("alchemist_jax.scoring", "alchemist_jax.dedup", "alchemist_jax.selection"),
    ("alchemist_jax.report",),
    ("alchemist_jax.pipeline",),
    ("alchemist_jax.cli",),
)


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("alchemist_jax"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("alchemist_jax"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {m for m in _imports(path, modules) if m in modules and m != name}
        for name, path in modules.items()
    }


def _floor(module: str) -> int:
    for number, prefixes in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return number
    raise AssertionError(f"{module} is on no floor: add it to FLOORS and docs/ARCHITECTURE.md")


def test_no_import_cycle():
    try:
        tuple(TopologicalSorter(_graph()).static_order())
    except CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")


def test_stages_import_only_downward():
    upward = [
        f"{module} (floor {_floor(module)}) imports {target} (floor {_floor(target)})"
        for module, targets in _graph().items()
        for target in targets
        if _floor(target) > _floor(module)
    ]
    assert not upward, "\n".join(upward)


def test_every_module_imports_in_dependency_order():
    order = list(TopologicalSorter(_graph()).static_order())
    script = f"import importlib\nfor name in {order!r}:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks themselves can fail: a graph with a cycle is refused, an upward edge found."""
    with pytest.raises(CycleError):
        tuple(TopologicalSorter({"a": {"b"}, "b": {"a"}}).static_order())
    assert _floor("alchemist_jax.runtime.io") < _floor("alchemist_jax.rating")
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from alchemist_jax import pipeline\n")
    assert _imports(source, _modules()) == {"alchemist_jax.pipeline"}
