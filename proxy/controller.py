"""The rollout controller: judge, decide, apply, record, persist, for every route.

Every `interval` it judges each progressing route (`proxy.analysis.judge`, over the
window since its step began), lets the state machine decide (`proxy.rollout`),
stores the new state with compare-and-set, serves its weight from the next request
on, and says why: a log line that reads as a sentence, `canary.rollout.decisions`,
and a span when tracing is on. The decisions are pure functions; this module is the
I/O around them.

Rules:
1. One controller decides at a time: it holds the store's lease, renewed every tick.
   Without it, it decides nothing.
2. A state is served only once it is stored; a write that loses its compare-and-set
   is dropped, and the stored state read again.
3. The store is opened when a route has an automatic rollout, when a state file
   already exists, or when an operator first acts: a proxy with fixed weights writes
   no file.
4. Schedule windows in `serve` mode open and close the canary's traffic on the tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Final, Protocol

from proxy.analysis import Evidence, judge
from proxy.config.model import Config, Route, StateStoreKind
from proxy.rollout import (
    Decision,
    OperatorAction,
    RouteState,
    Status,
    Transition,
    canary_identity,
    on_judgement,
    on_operator,
    reconcile,
    served_weight,
)
from proxy.schedule import may_advance, may_serve
from proxy.store import StateStore, open_store
from proxy.telemetry import Telemetry

__all__ = ["Controller", "ControllerHost", "StoreUnavailable", "UnknownRoute"]

log = logging.getLogger("proxy.controller")

TICK_S: Final = 1.0
LEASE_S: Final = 10.0


class UnknownRoute(KeyError):
    """An operator named a route the config does not have."""


class StoreUnavailable(Exception):
    """The state store could not take a change (HTTP 503)."""


class ControllerHost(Protocol):
    """What the controller needs of the running proxy."""

    @property
    def config(self) -> Config: ...

    @property
    def telemetry(self) -> Telemetry: ...

    def set_weights(self, weights: Mapping[str, float]) -> None: ...


class Controller:
    def __init__(self, host: ControllerHost) -> None:
        self._host = host
        self._store: StateStore | None = None
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._leader = False
        self.states: dict[str, RouteState] = {}
        self._next_judgement: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.store_error: str | None = None

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        config = self._host.config
        if _needs_store(config):
            await self._open_store()
        async with self._lock:
            stored = await self._load()
            await self._reconcile(config, stored)
        self._host.set_weights(self.served_weights())
        now = time.time()
        for route in config.routes:
            if route.rollout.auto is not None:
                self._next_judgement[route.name] = now + route.rollout.auto.interval_s
        self._task = asyncio.get_running_loop().create_task(self._run(), name="rollout controller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._store is not None:
            with contextlib.suppress(Exception):
                await self._store.release_lease(self._holder)
            await self._store.close()
            self._store = None

    async def config_changed(self, config: Config) -> dict[str, float]:
        """Reconcile every route with a reloaded config; the weights to serve under it."""
        if self._store is None and _needs_store(config):
            await self._open_store()
        async with self._lock:
            await self._reconcile(config, dict(self.states))
        return self.served_weights(config)

    # --- what the proxy serves and shows ------------------------------------------------

    def served_weights(self, config: Config | None = None) -> dict[str, float]:
        config = config or self._host.config
        now = time.time()
        return {
            route.name: served_weight(self.states[route.name], may_serve(route.schedule, now))
            for route in config.routes
            if route.name in self.states
        }

    @property
    def leader(self) -> bool:
        return self._leader

    def next_judgement_in(self, route: str) -> float | None:
        at = self._next_judgement.get(route)
        return None if at is None else max(0.0, at - time.time())

    # --- operators ----------------------------------------------------------------------

    async def operate(self, route_name: str, action: OperatorAction) -> RouteState:
        """Apply an operator's action. Raises UnknownRoute or TransitionRefused."""
        config = self._host.config
        route = config.route(route_name)
        if route is None:
            raise UnknownRoute(route_name)
        if self._store is None:
            await self._open_store()
        async with self._lock:
            transition = on_operator(
                self.states[route_name], route.rollout.auto, action, time.time()
            )
            if not await self._commit(route, transition):
                raise StoreUnavailable(self.store_error or "the state store refused the change")
        self._host.set_weights(self.served_weights())
        return self.states[route_name]

    # --- the loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self._tick()
            except Exception as exc:  # the loop must outlive a bad tick (a store outage)
                self.store_error = f"{exc.__class__.__name__}: {exc}"
                log.warning("rollout controller tick failed: %s", self.store_error)

    async def _tick(self) -> None:
        config = self._host.config
        if self._store is not None:
            leader = await self._store.acquire_lease(self._holder, LEASE_S)
            if leader != self._leader:
                log.info("rollout controller %s the lease", "holds" if leader else "lost")
            self._leader = leader
            self.store_error = None
        now = time.time()
        async with self._lock:
            for route in config.routes:
                auto = route.rollout.auto
                state = self.states.get(route.name)
                if auto is None or state is None or not self._leader:
                    continue
                due = self._next_judgement.setdefault(route.name, now + auto.interval_s)
                if now < due:
                    continue
                self._next_judgement[route.name] = now + auto.interval_s
                await self._judge(route, state, now)
        weights = self.served_weights(config)
        self._host.set_weights(weights)

    async def _judge(self, route: Route, state: RouteState, now: float) -> None:
        auto = route.rollout.auto
        assert auto is not None
        if state.status is not Status.PROGRESSING:
            return
        state = replace(state, evidence=self._gather(route.name, state.evidence, now))
        judgement = judge(state.evidence, auto) if state.step >= 0 else None
        transition = on_judgement(state, auto, judgement, now, may_advance(route.schedule, now))
        self._host.telemetry.record_judgement(
            route.name, judgement.verdict.value if judgement is not None else "advance"
        )
        if judgement is not None and transition.decision is None:
            new = transition.state
            log.info(
                "route %s at %g%%: %s (%d/%d passes, %d/%d failures): %s",
                route.name,
                state.weight,
                judgement.verdict.value,
                new.passes,
                auto.pass_intervals,
                new.failures,
                auto.failure_limit,
                judgement.reason,
            )
        await self._commit(route, transition)

    def _gather(self, route: str, evidence: Evidence, now: float) -> Evidence:
        """The evidence with the stats slices completed since it was last gathered."""
        stats = self._host.telemetry.stats
        current = stats.slice_of(now)  # still filling: it waits for the next interval
        if current <= evidence.next_slice:
            return evidence
        last = current - 1
        return evidence.added(
            stats.between(route, "canary", evidence.next_slice, last),
            stats.between(route, "stable", evidence.next_slice, last),
            current,
        )

    # --- state ----------------------------------------------------------------------------

    async def _reconcile(self, config: Config, stored: Mapping[str, RouteState]) -> None:
        """Bring every route's state in line with `config` (at start and on reload)."""
        now = time.time()
        for name in set(self.states) - {route.name for route in config.routes}:
            del self.states[name]
        for route in config.routes:
            identity = canary_identity(route, config.backends)
            transition = reconcile(stored.get(route.name), route, identity, now)
            if transition.decision is not None or route.name not in stored:
                await self._commit(route, transition)
            else:
                self.states[route.name] = transition.state

    async def _commit(self, route: Route, transition: Transition) -> bool:
        """Store a transition's state (compare-and-set), then serve and explain it.

        False when it was not stored: the store failed (decisions wait for it) or
        another controller wrote first (its state is taken instead).
        """
        state = transition.state
        if self._store is not None:
            try:
                stored = await self._store.compare_and_set(state, state.version)
                if stored is None:
                    fresh = (await self._store.load_states()).get(route.name)
            except Exception as exc:
                self.store_error = f"{exc.__class__.__name__}: {exc}"
                log.warning("route %s: state not stored (%s)", route.name, self.store_error)
                return False
            if stored is None:
                if fresh is not None:
                    self.states[route.name] = fresh
                log.info("route %s: another controller changed it first", route.name)
                return False
            state = stored
        self.states[route.name] = state
        if transition.decision is not None:
            self._explain(route, transition.decision)
        return True

    async def _load(self) -> Mapping[str, RouteState]:
        if self._store is None:
            return {}
        try:
            return await self._store.load_states()
        except Exception as exc:
            self.store_error = f"{exc.__class__.__name__}: {exc}"
            log.warning(
                "rollout state not loaded (%s): serving the config's weights", self.store_error
            )
            return {}

    def _explain(self, route: Route, decision: Decision) -> None:
        log.info("route %s: %s", route.name, decision.reason)
        self._host.telemetry.record_decision(route.name, decision)

    async def _open_store(self) -> None:
        config = self._host.config.state
        self._store = open_store(config)
        self._leader = await self._store.acquire_lease(self._holder, LEASE_S)
        if config.store is StateStoreKind.SQLITE:
            log.info("rollout state in %s", config.path)


def _needs_store(config: Config) -> bool:
    if any(route.rollout.auto is not None for route in config.routes):
        return True
    return config.state.store is not StateStoreKind.SQLITE or os.path.exists(config.state.path)
