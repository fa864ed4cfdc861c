"""The package's layers: each folder imports only from the folders below it.

The folders, bottom up (docs/architecture.md draws them):

    config → apis → routing → judge → rollout → telemetry → store → http → server → cli

`proxy.errors` (the error tree) is below them all, `proxy.fake_backend` stands alone,
and the pure layers (config, apis, routing, judge, rollout) do no I/O at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "proxy"

# Bottom up. A module may import a module of its own layer or of a lower one.
LAYERS = (
    ("errors", "__init__"),
    ("config",),
    ("apis",),
    ("routing",),
    ("judge",),
    ("rollout",),
    ("telemetry",),
    ("store",),
    ("http",),
    ("server",),
    ("cli", "demo", "__main__"),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
STANDALONE = "fake_backend"  # imports nothing of the package; only cli and demo use it

# Pure: no sockets, no event loop, no HTTP or database library, no clock of their own.
PURE_FOLDERS = ("config", "apis", "routing", "judge", "rollout")
PURE_MODULES = (
    "proxy/errors.py",
    "proxy/http/headers.py",
    "proxy/telemetry/metrics.py",
    "proxy/telemetry/tracing.py",
    "proxy/telemetry/exposition.py",
    "proxy/telemetry/prometheus.py",
    "proxy/telemetry/settings.py",
)
IO_LIBRARIES = frozenset(
    {"aiohttp", "uvloop", "asyncio", "socket", "redis", "sqlite3", "subprocess", "urllib.request"}
)


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def name_of(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def unit_of(module: str) -> str:
    """The layer unit of `proxy.X...`: the folder, or the top-level module's name."""
    return module.split(".")[1] if module.count(".") else "__init__"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "proxy":  # `from proxy import x`: x may be a subpackage
                names.update(f"proxy.{alias.name}" for alias in node.names)
    return names


def package_imports(path: Path) -> set[str]:
    own = {"proxy.__version__"}
    return {name for name in imports_of(path) if name.startswith("proxy.") and name not in own}


@pytest.mark.parametrize("path", modules(), ids=name_of)
def test_no_module_imports_from_a_layer_above_its_own(path: Path) -> None:
    unit = unit_of(name_of(path))
    if unit == STANDALONE:
        assert {m for m in package_imports(path) if unit_of(m) != STANDALONE} == set()
        return
    assert unit in RANK, f"{unit} is in no layer: add it to LAYERS and docs/architecture.md"
    upward = sorted(
        module
        for module in package_imports(path)
        if unit_of(module) != STANDALONE and RANK[unit_of(module)] > RANK[unit]
    )
    assert upward == [], f"{name_of(path)} (layer {unit}) imports from above: {upward}"


def test_only_the_command_uses_the_fake_backend() -> None:
    users = sorted(
        name_of(path)
        for path in modules()
        if unit_of(name_of(path)) != STANDALONE
        and any(unit_of(m) == STANDALONE for m in package_imports(path))
    )
    assert "proxy.cli" in users
    assert set(users) <= {"proxy.cli", "proxy.demo"}, users


def pure_modules() -> list[Path]:
    paths = [p for p in modules() if p.relative_to(PACKAGE).parts[0] in PURE_FOLDERS]
    return paths + [PACKAGE.parent / module for module in PURE_MODULES]


@pytest.mark.parametrize("path", pure_modules(), ids=name_of)
def test_pure_modules_do_no_io(path: Path) -> None:
    used = {
        name
        for name in imports_of(path)
        if any(name == lib or name.startswith(f"{lib}.") for lib in IO_LIBRARIES)
    }
    assert used == set(), f"{name_of(path)} imports {sorted(used)}"


def test_the_layers_name_every_folder() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == {name for names in LAYERS for name in names if "_" not in name} - {
        "errors",
        "cli",
        "demo",
    } | {STANDALONE}


def test_every_module_opens_with_a_docstring() -> None:
    missing = [
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if ast.get_docstring(ast.parse(path.read_text())) is None
    ]
    assert missing == []


def test_the_layer_check_really_checks() -> None:
    """A module that imported from above would be caught (the check is not vacuous)."""
    judge = PACKAGE / "judge" / "analysis.py"
    assert RANK[unit_of(name_of(judge))] < RANK["http"]
    assert "proxy.judge.histogram" in package_imports(judge)
