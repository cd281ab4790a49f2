"""The package's shape is its architecture: data flows one way (request → upstream → recorder →
Redis → statistics → flusher → MLflow), so no module imports from a layer above its own, and the
types pass mypy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "abproxy"

# Lowest first. A module may import its own layer and the ones listed before it.
LAYERS: list[tuple[str, ...]] = [
    ("abproxy.errors", "abproxy.stats", "abproxy.logs"),
    ("abproxy.config", "abproxy.tracking_uri", "abproxy.wire", "abproxy.assignment", "abproxy.catalog", "abproxy.metrics", "abproxy.pacing"),
    ("abproxy.upstream",),
    ("abproxy.recording",),
    ("abproxy.judging",),
    ("abproxy.proxy",),
    ("abproxy.analysis",),
    ("abproxy.tracking",),
    ("abproxy.routes",),
    ("abproxy.app", "abproxy.serving"),
    ("abproxy.simulation", "abproxy.cli", "abproxy.__main__"),
]


def layer_of(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("abproxy"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("abproxy"))
    known = modules()
    return {name for name in names if name in known and name != "abproxy"}


def test_no_module_imports_from_a_layer_above_its_own():
    backward = []
    for module, path in modules().items():
        if module == "abproxy":
            continue
        for imported in imports_of(path):
            if layer_of(imported) > layer_of(module):
                backward.append(f"{module} (layer {layer_of(module)}) imports {imported} (layer {layer_of(imported)})")
    assert backward == []


def test_the_statistics_core_imports_no_io():
    for module, path in modules().items():
        if module.startswith("abproxy.stats"):
            source = path.read_text()
            for io in ("redis", "mlflow", "uvicorn", "httptools", "asyncio", "socket"):
                assert f"import {io}" not in source and f"from {io}" not in source, (module, io)


def test_no_import_cycles_between_modules():
    graph = {module: imports_of(path) for module, path in modules().items()}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in done:
            return
        assert module not in visiting, " -> ".join([*visiting[visiting.index(module):], module])
        visiting.append(module)
        for imported in graph.get(module, ()):
            visit(imported)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_aiohttp_is_gone_from_the_package():
    for module, path in modules().items():
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not any(name.split(".")[0] == "aiohttp" for name in imported), module


@pytest.mark.slow
def test_the_package_type_checks():
    checked = subprocess.run([sys.executable, "-m", "mypy"], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_what_the_statistics_read_of_redis_is_parsed_without_a_redis_client():
    """Key names, counter parsing, the request record and the overrides are pure modules: the
    analysis reads them, and so do tests of the statistics, without the I/O of store.py."""
    pure = ("abproxy.recording.layout", "abproxy.recording.counters", "abproxy.recording.overrides", "abproxy.recording.record")
    found = modules()
    for module in pure:
        source = found[module].read_text()
        assert "import redis" not in source and "from redis" not in source, module
        assert "abproxy.recording.store" not in imports_of(found[module]), module
    assert "abproxy.recording.store" not in imports_of(found["abproxy.analysis.analyse"])
