"""A state store in one process's memory, on a clock of the caller's choosing.

It keeps the same contract as the SQLite and Redis stores (`proxy.store.base`; the
store tests run every behaviour against all three), so several controllers sharing one
`MemoryStore` act as the processes of a fleet, and a fake clock runs whole rollouts,
leases and expiries included, in milliseconds. It is not a choice of `state.store`:
its state ends with the process, which a rollout's state must outlive.

Rules:
1. Everything it holds is written and read as JSON (`to_mapping`/`from_mapping`), as
   the other stores do, so no caller shares a mutable object with it.
2. Expiries (the lease, stats slices, heartbeats) are judged on `clock`.
3. While `down` is set, every call raises `ConnectionError`, as an unreachable store's
   client does; `forget()` loses every state, as a Redis restarted without its data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping

from proxy.judge.stats import Series, VariantStats
from proxy.rollout.machine import RouteState
from proxy.store.base import ProcessInfo, StatsSlice

__all__ = ["MemoryStore"]


class MemoryStore:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.down = False
        self._states: dict[str, str] = {}  # route -> JSON with "version"
        self._lease: tuple[str, float] | None = None  # holder, expires at
        self._stats: dict[tuple[str, str, int], dict[str, tuple[float, str]]] = {}
        self._processes: dict[str, tuple[float, str]] = {}

    def forget(self) -> None:
        """Lose every route state (and the lease), as a store restarted empty."""
        self._states.clear()
        self._lease = None

    def _answer(self) -> float:
        if self.down:
            raise ConnectionError("the state store is down")
        return self._clock()

    async def load_states(self) -> Mapping[str, RouteState]:
        self._answer()
        return {
            route: RouteState.from_mapping(json.loads(text)) for route, text in self._states.items()
        }

    async def compare_and_set(self, state: RouteState, expected_version: int) -> RouteState | None:
        self._answer()
        current = self._states.get(state.route)
        version = 0 if current is None else int(json.loads(current)["version"])
        if version != expected_version:
            return None
        stored = RouteState.from_mapping({**state.to_mapping(), "version": expected_version + 1})
        self._states[state.route] = json.dumps(stored.to_mapping())
        return stored

    async def acquire_lease(self, holder: str, ttl_s: float) -> bool:
        now = self._answer()
        if self._lease is None or self._lease[0] == holder or self._lease[1] < now:
            self._lease = (holder, now + ttl_s)
        return self._lease[0] == holder

    async def release_lease(self, holder: str) -> None:
        self._answer()
        if self._lease is not None and self._lease[0] == holder:
            self._lease = None

    async def publish_stats(self, source: str, slices: Iterable[StatsSlice], ttl_s: float) -> None:
        now = self._answer()
        for route, variant, index, stats in slices:
            entry = self._stats.setdefault((route, variant, index), {})
            entry[source] = (now + ttl_s, json.dumps(stats.to_mapping()))
        for key, sources in list(self._stats.items()):
            for name, (expires_at, _) in list(sources.items()):
                if expires_at < now:
                    del sources[name]
            if not sources:
                del self._stats[key]

    async def read_stats(
        self, route: str, variant: Series, first_slice: int, last_slice: int
    ) -> VariantStats:
        now = self._answer()
        total = VariantStats()
        for (r, v, index), sources in self._stats.items():
            if r != route or v != variant or not first_slice <= index <= last_slice:
                continue
            for expires_at, text in sources.values():
                if expires_at >= now:
                    total.merge(VariantStats.from_mapping(json.loads(text)))
        return total

    async def heartbeat(self, source: str, info: ProcessInfo, ttl_s: float) -> None:
        now = self._answer()
        self._processes[source] = (now + ttl_s, json.dumps({**info, "source": source}))
        for name, (expires_at, _) in list(self._processes.items()):
            if expires_at < now:
                del self._processes[name]

    async def processes(self) -> list[ProcessInfo]:
        now = self._answer()
        return [
            json.loads(text)
            for _, (expires_at, text) in sorted(self._processes.items())
            if expires_at >= now
        ]

    async def close(self) -> None:
        return None
