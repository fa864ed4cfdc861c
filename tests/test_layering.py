"""Data flows one way: the pure middle never imports the I/O at the edges."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "proxy"

# Pure modules: no sockets, no event loop I/O, no HTTP library.
PURE = [
    "proxy/errors.py",
    "proxy/keys.py",
    "proxy/routing.py",
    "proxy/headers.py",
    "proxy/answer.py",
    "proxy/histogram.py",
    "proxy/otlp_wire.py",
    "proxy/tracing.py",
    "proxy/stats.py",
    "proxy/metrics.py",
    "proxy/telemetry.py",
    "proxy/sequential.py",
    "proxy/analysis.py",
    "proxy/rollout.py",
    "proxy/schedule.py",
    *sorted(str(p.relative_to(PACKAGE.parent)) for p in (PACKAGE / "config").glob("*.py")),
]
EDGE_MODULES = {
    "aiohttp",
    "uvloop",
    "proxy.app",
    "proxy.body",
    "proxy.cli",
    "proxy.demo",
    "proxy.forwarding",
    "proxy.relay",
    "proxy.upstreams",
    "proxy.pool",
    "proxy.http1",
    "proxy.deadlines",
    "proxy.exporter",
    "proxy.admin",
    "proxy.controller",
    "proxy.store",
    "proxy.fake_backend",
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_nothing_from_the_edges(module: str) -> None:
    path = PACKAGE.parent / module
    forbidden = {
        name
        for name in imports_of(path)
        if any(name == edge or name.startswith(f"{edge}.") for edge in EDGE_MODULES)
    }
    assert not forbidden, f"{module} imports {sorted(forbidden)}"


def test_the_pure_list_covers_the_config_package() -> None:
    assert "proxy/config/parse.py" in PURE
    assert "proxy/config/model.py" in PURE


def test_every_module_opens_with_a_docstring() -> None:
    missing = [
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if ast.get_docstring(ast.parse(path.read_text())) is None
    ]
    assert missing == []
