"""Where rollout state lives: a registry of state stores, chosen by `state.store`.

`sqlite` (the default) is one file on one machine (`proxy.store.sqlite`); `redis` is
one Redis server, or one Redis Cluster (`state.cluster`), shared by a fleet of replicas
(`proxy.store.redis`). Where the state lives is the only difference between the two:
nothing else forks on it. The Redis client library is imported only by a proxy whose
config names a Redis store. (`proxy.store.memory` is the tests' store: no config names it.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from proxy.config.model import StateConfig, StateStoreKind
from proxy.errors import ConfigError
from proxy.store.base import ProcessInfo, StateStore, StatsSlice
from proxy.store.sqlite import SqliteStore

__all__ = ["STORES", "ProcessInfo", "StateStore", "StatsSlice", "open_store"]


def _sqlite(config: StateConfig) -> StateStore:
    return SqliteStore(config.path)


def _redis(config: StateConfig) -> StateStore:
    if config.url is None:
        raise ConfigError("state.url: required when state.store is redis")
    from proxy.store.redis import RedisStore  # the redis package loads only for a Redis store

    return RedisStore(config.url, cluster=config.cluster)


STORES: Final[dict[StateStoreKind, Callable[[StateConfig], StateStore]]] = {
    StateStoreKind.SQLITE: _sqlite,
    StateStoreKind.REDIS: _redis,
}


def open_store(config: StateConfig) -> StateStore:
    """The state store the config names (a Redis one connects on its first call)."""
    return STORES[config.store](config)
