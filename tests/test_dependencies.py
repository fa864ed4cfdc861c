"""Every package the proxy imports is declared, and heavy ones load only when used."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "proxy"
# Import name -> distribution name, where they differ. `opentelemetry` is a namespace that
# several distributions share (the SDK and the exporters are declared beside it).
DISTRIBUTIONS = {"yaml": "pyyaml", "opentelemetry": "opentelemetry-api"}


def third_party_imports() -> set[str]:
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return {n for n in names if n != "proxy" and n not in sys.stdlib_module_names}


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements.extend(extra)
    names = set()
    for requirement in requirements:
        name = requirement.split(";")[0]
        for mark in "<>=!~[ ":
            name = name.split(mark)[0]
        names.add(name.strip().lower().replace("_", "-"))
    return names


@pytest.mark.timeout(120)
def test_every_imported_package_is_declared() -> None:
    missing = {
        name
        for name in third_party_imports()
        if DISTRIBUTIONS.get(name, name).replace("_", "-") not in declared()
    }
    assert missing == set()


@pytest.mark.timeout(120)
def test_the_check_finds_the_packages_it_should() -> None:
    assert {"aiohttp", "multidict", "yaml", "mmh3"} <= third_party_imports()


@pytest.mark.timeout(120)
def test_a_proxy_without_a_redis_store_never_imports_redis(tmp_path: Path) -> None:
    """The public path (server, store, telemetry) loads, and redis stays out."""
    code = (
        "import sys\n"
        "import proxy.cli, proxy.server.app, proxy.store\n"
        "from proxy.config.model import StateConfig\n"
        f"proxy.store.open_store(StateConfig(path={str(tmp_path / 'state.db')!r}))\n"
        "print(sorted(m for m in sys.modules if m == 'redis' or m.startswith('redis.')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=100, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.timeout(120)
def test_a_redis_store_imports_redis_when_opened() -> None:
    code = (
        "import sys, proxy.store\n"
        "from proxy.config.model import StateConfig, StateStoreKind\n"
        "proxy.store.open_store(StateConfig(StateStoreKind.REDIS, url='redis://127.0.0.1:1/0'))\n"
        "print('redis' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=100, check=True
    )
    assert result.stdout.strip() == "True"
