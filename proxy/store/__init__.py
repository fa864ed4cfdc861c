"""Where rollout state lives: a registry of state stores, chosen by `state.store`.

`sqlite` (the default) is one file on one machine; `redis` (a fleet of replicas)
comes with the fleet work. Where the state lives is the only difference between the
two: nothing else forks on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from proxy.config.model import StateConfig, StateStoreKind
from proxy.store.base import ProcessInfo, StateStore, StatsSlice
from proxy.store.sqlite import SqliteStore

__all__ = ["STORES", "ProcessInfo", "StateStore", "StatsSlice", "open_store"]


def _sqlite(config: StateConfig) -> StateStore:
    return SqliteStore(config.path)


STORES: Final[dict[StateStoreKind, Callable[[StateConfig], StateStore]]] = {
    StateStoreKind.SQLITE: _sqlite,
}


def open_store(config: StateConfig) -> StateStore:
    """The state store the config names."""
    factory = STORES.get(config.store)
    if factory is None:
        raise NotImplementedError(f"state.store {config.store.value} is not available yet")
    return factory(config)
