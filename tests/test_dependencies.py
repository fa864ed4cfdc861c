"""Every package the proxy imports is declared, and heavy ones load only when used."""

from __future__ import annotations

import ast
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


@pytest.mark.timeout(10)
def test_every_imported_package_is_declared() -> None:
    missing = {
        name
        for name in third_party_imports()
        if DISTRIBUTIONS.get(name, name).replace("_", "-") not in declared()
    }
    assert missing == set()


@pytest.mark.timeout(10)
def test_the_check_finds_the_packages_it_should() -> None:
    assert {"aiohttp", "multidict", "yaml", "mmh3"} <= third_party_imports()
