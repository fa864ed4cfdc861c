"""Shared fixtures: one stable and one canary fake-backend process for the session."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.harness import BackendProcess, start_backend


@dataclass
class Backends:
    stable: BackendProcess
    canary: BackendProcess


@pytest.fixture(scope="session")
def backends() -> Iterator[Backends]:
    stable = start_backend("m-stable")
    canary = start_backend("m-canary")
    try:
        yield Backends(stable, canary)
    finally:
        stable.stop()
        canary.stop()
