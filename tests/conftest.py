"""Shared fixtures: one stable and one canary fake-backend process for the session (and
a fresh pair for a test that needs its own, `pair`);
a fresh redis-server for each test that asks for one, and an emptied Redis Cluster."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import BackendProcess, start_backend
from tests.redis_server import (
    RedisClusterNodes,
    RedisServer,
    require_redis_server,
    start_cluster,
)


@dataclass
class Backends:
    stable: BackendProcess
    canary: BackendProcess


@pytest.fixture
def pair() -> Iterator[tuple[BackendProcess, BackendProcess]]:
    """A stable and a canary backend of the test's own (their journals start empty)."""
    stable = start_backend("m-stable")
    canary = start_backend("m-canary")
    try:
        yield stable, canary
    finally:
        stable.stop()
        canary.stop()


@pytest.fixture(scope="session")
def backends() -> Iterator[Backends]:
    stable = start_backend("m-stable")
    canary = start_backend("m-canary")
    try:
        yield Backends(stable, canary)
    finally:
        stable.stop()
        canary.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """An empty redis-server of this test's own (`url`; `stop()`/`start()` keep the port)."""
    server = RedisServer(require_redis_server(), tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    """One Redis Cluster for the session: a cluster takes 2 s to come up."""
    cluster = start_cluster(require_redis_server(), tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(redis_cluster_session: RedisClusterNodes) -> RedisClusterNodes:
    """The session's three-node Redis Cluster, emptied for this test (`url`: a node)."""
    redis_cluster_session.flush()
    return redis_cluster_session
