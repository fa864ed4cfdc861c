"""What a state store must do, for one process or a fleet of them.

Four things are shared: each route's rollout state, written with compare-and-set
so two controllers can never both win; the window stats of every process, appended
as time slices and merged by whoever judges; a lease, so one controller decides at a
time; and a heartbeat of every live process (its config version, whether it leads),
so the status page lists them and the controller sees when they disagree. The
embedded store is SQLite (`proxy.store.sqlite`); a fleet uses Redis (`proxy.store.redis`).

Rules:
1. `compare_and_set` writes only over the version it read, and returns the state
   with the version bumped; None when someone else wrote first.
2. A lease is held until its time runs out unless renewed by its holder; taking it
   from another holder is only possible after it expired.
3. Stats slices expire on their own; a slice written again by the same source
   replaces the previous write.
4. A heartbeat lives for its time to live; a process that stops beating drops out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from proxy.judge.stats import Series, VariantStats
from proxy.rollout.machine import RouteState

__all__ = ["ProcessInfo", "StateStore", "StatsSlice"]

# (route, variant, slice index, stats)
StatsSlice = tuple[str, Series, int, VariantStats]
# What a process says of itself in its heartbeat (JSON-able; "source" is its id).
ProcessInfo = Mapping[str, object]


class StateStore(Protocol):
    async def load_states(self) -> Mapping[str, RouteState]:
        """Every route state stored, by route name."""
        ...

    async def compare_and_set(self, state: RouteState, expected_version: int) -> RouteState | None:
        """Store `state` if the stored version is `expected_version` (0: none stored)."""
        ...

    async def acquire_lease(self, holder: str, ttl_s: float) -> bool:
        """Take or renew the controller lease for `ttl_s`; whether `holder` holds it."""
        ...

    async def release_lease(self, holder: str) -> None: ...

    async def publish_stats(self, source: str, slices: Iterable[StatsSlice], ttl_s: float) -> None:
        """Write this source's slices (replacing its earlier writes of the same slices)."""
        ...

    async def read_stats(
        self, route: str, variant: Series, first_slice: int, last_slice: int
    ) -> VariantStats:
        """The merged stats of every source over [first_slice, last_slice]."""
        ...

    async def heartbeat(self, source: str, info: ProcessInfo, ttl_s: float) -> None:
        """Say this process is alive, and what it runs, for the next `ttl_s`."""
        ...

    async def processes(self) -> list[ProcessInfo]:
        """The heartbeat of every live process, each with its "source", by source."""
        ...

    async def close(self) -> None: ...
