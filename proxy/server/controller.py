"""The rollout controller: judge, decide, apply, record, persist, for every route.

Every `interval` it judges each progressing route (`proxy.judge.analysis.judge`, over the
window since its step began), lets the state machine decide (`proxy.rollout.machine`),
stores the new state with compare-and-set, serves its weight from the next request
on, and says why: a log line that reads as a sentence, `canary.rollout.decisions`,
and a span when tracing is on.

Every process runs one (each worker, each replica); they meet in the state store,
and the store is the only thing that differs between one machine and a fleet. On
every tick each one says it is alive (with its config version), publishes the stats
slices it completed, tries to take or renew the lease, and reads the route states
back, so a decision made anywhere is served everywhere within a tick or two.

The decisions are `proxy.rollout.planner`'s, a pure function of the time, the states,
the evidence and the config; this module is the I/O around them. The clock and the
store are injected (`clock`, `store`), so tests drive whole rollouts with `tick()` on
a fake clock and an in-memory store.

Rules:
1. One controller decides at a time: it holds the store's lease, renewed every tick.
   Without it, or when the store fails, it decides nothing, at once.
2. A state is served only once it is stored; a write that loses its compare-and-set
   is dropped, and the stored state read again.
3. The store is opened when a route has an automatic rollout, when a state file
   already exists, when the process is one of several workers, or when an operator
   first acts: a lone proxy with fixed weights writes no file.
4. Schedule windows in `serve` mode open and close the canary's traffic on the tick.
5. The judge reads the merged stats of every process, up to `SETTLE_SLICES` slices
   before the current one: by then every live process has published them.
6. While the store is unreachable, requests go on at the last weights known, decisions
   pause, and the outage shows in the log, `/api/status` and `canary.state_store.up`;
   when it answers again, the state is read back and reconciled with the config. A
   state the store lost meanwhile is written back from memory (the first writer wins).
7. No step is advanced while the live processes do not share one config: what they
   share (`proxy.config.fleet`: backends, routes, rollout, schedule, the store), not
   their per-process addresses. The log and `/api/status` name the settings that differ.
8. The store holds the truth: a stored state that differs from the one in memory
   replaces it on the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from proxy.config.fleet import disagreements, explain, shared_settings
from proxy.config.model import Config, Route, StateStoreKind
from proxy.judge.analysis import Evidence, Verdict
from proxy.judge.stats import Series, VariantStats, WindowStats
from proxy.rollout.machine import Decision, OperatorAction, RouteState, Transition, on_operator
from proxy.rollout.planner import (
    SETTLE_SLICES,
    Fleet,
    Judged,
    due,
    plan,
    reconcile_all,
    served_weights,
    shadowing,
    slices_to_gather,
    timers_for,
    variants_of,
)
from proxy.store import ProcessInfo, StateStore, open_store

__all__ = ["Controller", "ControllerHost", "StoreUnavailable", "UnknownRoute"]

log = logging.getLogger("proxy.server.controller")

TICK_S: Final = 1.0
LEASE_S: Final = 5.0  # a dead leader's lease passes to another within this
HEARTBEAT_S: Final = 5.0  # a process that stops beating drops out of the list after this
_OPERATOR_ATTEMPTS: Final = 3

Clock = Callable[[], float]  # epoch seconds


class UnknownRoute(KeyError):
    """An operator named a route the config does not have."""


class StoreUnavailable(Exception):
    """The state store could not take a change (HTTP 503)."""


class ControllerHost(Protocol):
    """What the controller needs of the running proxy."""

    @property
    def config(self) -> Config: ...

    @property
    def stats(self) -> WindowStats:
        """This process's window stats, which the controller publishes and judges."""
        ...

    def set_weights(
        self, weights: Mapping[str, float], shadowing: frozenset[str] = frozenset()
    ) -> None:
        """Serve these weights, and send shadow traffic for the routes in `shadowing`."""
        ...

    def record_judgement(self, route: str, verdict: Verdict | None) -> None:
        """A judgement made (None: the first step, taken without one)."""
        ...

    def record_decision(self, route: str, decision: Decision) -> None: ...

    def describe(self) -> Mapping[str, object]:
        """What this process says of itself in its heartbeat (ports, worker number)."""
        ...


class Controller:
    """The rollout controller of one process.

    Args:
        host: the running proxy.
        shared: one of several workers: the store is how they agree (rule 3).
        clock: epoch seconds (`time.time`; tests pass a fake one).
        store: the state store to use; default: the one the config names, opened
            when first needed.
        source: this process's name in the fleet (default `host:pid`).
    """

    def __init__(
        self,
        host: ControllerHost,
        *,
        shared: bool = False,
        clock: Clock = time.time,
        store: StateStore | None = None,
        source: str | None = None,
    ) -> None:
        self._host = host
        self._shared = shared
        self._clock = clock
        self._store: StateStore | None = store
        self._given_store = store is not None
        self.source = source or f"{socket.gethostname()}:{os.getpid()}"
        self._holder = f"{self.source}:{id(self):x}"
        self._started_at = clock()
        self._leader = False
        self.states: dict[str, RouteState] = {}
        self._timers: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.store_error: str | None = None
        self.store_down_since: float | None = None
        self._synced = True  # False: the stored states must be read and reconciled again
        self._published_through: int | None = None  # the last stats slice published
        self.processes: list[ProcessInfo] = []
        self.held_because: str | None = None  # why no step may advance now (rule 7)
        self._settings_of: tuple[Config, dict[str, object]] | None = None  # the fleet's part

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, *, run: bool = True) -> None:
        """Load and reconcile the states, serve them, and (with `run`) tick every second."""
        config = self._host.config
        if self._needs_store(config):
            await self._open_store()
        async with self._lock:
            stored = await self._load()
            await self._reconcile(config, stored)
        self._serve()
        if self._store is not None and self.store_error is not None:
            log.warning(
                "the state store is unreachable (%s): serving the config's weights; "
                "decisions wait for it",
                self.store_error,
            )
        self._timers = timers_for(config, self._timers, self._clock())
        if run:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="rollout controller"
            )

    async def step_down(self) -> None:
        """Decide nothing more, and hand the lease on at once (a process that drains)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._leader = False
        if self._store is not None:
            with contextlib.suppress(Exception):
                await self._store.release_lease(self._holder)

    async def stop(self) -> None:
        """Step down, publish the stats of the requests that finished while draining, close."""
        await self.step_down()
        if self._store is not None:
            if self.store_down_since is None:
                with contextlib.suppress(Exception):
                    await self._publish(self._store, final=True)
            if not self._given_store:
                await self._store.close()
                self._store = None

    async def config_changed(self, config: Config) -> tuple[dict[str, float], frozenset[str]]:
        """Reconcile every route with a reloaded config; the weights to serve under it, and
        the routes in shadow."""
        if self._store is None and self._needs_store(config):
            await self._open_store()
        async with self._lock:
            await self._reconcile(config, dict(self.states))
        return self.served_weights(config), self.shadowing(config)

    # --- what the proxy serves and shows ------------------------------------------------

    def served_weights(self, config: Config | None = None) -> dict[str, float]:
        return served_weights(config or self._host.config, self.states, self._clock())

    def shadowing(self, config: Config | None = None) -> frozenset[str]:
        """The routes whose canary gets shadow traffic now."""
        return shadowing(config or self._host.config, self.states, self._clock())

    def _serve(self, config: Config | None = None) -> None:
        self._host.set_weights(self.served_weights(config), self.shadowing(config))

    @property
    def leader(self) -> bool:
        return self._leader

    @property
    def store_up(self) -> bool | None:
        """Whether the state store answers; None when no store is in use."""
        return None if self._store is None else self.store_down_since is None

    async def window(self, route: str, variant: Series, first: int, last: int) -> VariantStats:
        """A route variant's stats over slices [first, last], of every process.

        What this process published comes from the store with everyone else's; its
        slices since then from its own memory. Without a store (or while it is down):
        this process's alone.
        """
        local = self._host.stats
        published = self._published_through
        if self._store is None or self.store_down_since is not None or published is None:
            return local.between(route, variant, first, last)
        try:
            total = await self._store.read_stats(route, variant, first, min(last, published))
        except Exception as exc:
            self._store_failed(exc)
            return local.between(route, variant, first, last)
        total.merge(local.between(route, variant, max(first, published + 1), last))
        return total

    def next_judgement_in(self, route: str) -> float | None:
        at = self._timers.get(route)
        return None if at is None else max(0.0, at - self._clock())

    # --- operators ----------------------------------------------------------------------

    async def operate(
        self, route_name: str, action: OperatorAction, *, force: bool = False
    ) -> RouteState:
        """Apply an operator's action (`force`: past a resume's cooldown).

        Raises UnknownRoute, TransitionRefused or StoreUnavailable.
        """
        config = self._host.config
        route = config.route(route_name)
        if route is None:
            raise UnknownRoute(route_name)
        if self._store is None:
            await self._open_store()
        async with self._lock:
            for _ in range(_OPERATOR_ATTEMPTS):
                transition = on_operator(
                    self.states[route_name], route.rollout.auto, action, self._clock(), force=force
                )
                if await self._commit(route, transition):
                    break
                if self.store_down_since is not None:
                    raise StoreUnavailable(self.store_error or "the state store failed")
                # Another process changed the state first: act on the state it stored.
            else:
                raise StoreUnavailable("the state kept changing under this change; try again")
        self._serve()
        return self.states[route_name]

    # --- the loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            # Ticks fall just after each whole second, in every process alike.
            await asyncio.sleep(TICK_S - self._clock() % TICK_S + 0.05)
            try:
                await self.tick()
            except Exception as exc:  # the loop must outlive a bad tick
                log.exception("rollout controller tick failed: %s", exc)

    async def tick(self) -> None:
        """One tick: meet the store, judge what is due as the leader, serve the weights."""
        config = self._host.config
        if self._store is None and self._needs_store(config):
            await self._open_store()
        if self._store is not None:
            try:
                await self._meet(self._store, config)
            except Exception as exc:
                self._store_failed(exc)
        now = self._clock()
        self._hold(_fleet_differs(self.processes) if self._leader else None)
        if self._leader:
            async with self._lock:
                evidence = {
                    route.name: await self._gather(route.name, now)
                    for route in due(config, self.states, self._timers, now)
                }
                planned = plan(
                    now, self.states, evidence, config, Fleet(True, self.held_because), self._timers
                )
                self._timers = dict(planned.timers)
                for judged in planned.judged:
                    if not self.leader:  # the store failed under an earlier route's write
                        break
                    await self._apply(judged)
        else:
            self._timers = timers_for(config, self._timers, now)
        self._serve(config)

    def _hold(self, held_because: str | None) -> None:
        if held_because is not None and held_because != self.held_because:
            log.warning("rollout steps held: %s", held_because)
        elif held_because is None and self.held_because is not None and self._leader:
            log.info("the live processes share one config again: steps may advance")
        self.held_because = held_because

    async def _apply(self, judged: Judged) -> None:
        route, judgement = judged.route, judged.judgement
        if judged.held_because is not None:
            log.warning(
                "route %s stays at %g%%: %s",
                route.name,
                judged.transition.state.weight,
                judged.held_because,
            )
        self._host.record_judgement(route.name, judgement.verdict if judgement else None)
        if (note := judged.note) is not None:
            # A shared incident holds the rollout for a reason outside the canary: say so.
            shared = judgement is not None and judgement.shared_incident
            log.log(logging.WARNING if shared else logging.INFO, "%s", note)
        await self._commit(route, judged.transition)

    async def _meet(self, store: StateStore, config: Config) -> None:
        """One tick's exchange with the store: beat, publish, lease, read the states."""
        await store.heartbeat(
            self.source,
            {
                **self._host.describe(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "config_version": config.version,
                "fleet_version": config.fleet_version,
                "shared": self._shared_settings(config),
                "leader": self._leader,
                "started_at": self._started_at,
            },
            HEARTBEAT_S,
        )
        await self._publish(store)
        self.processes = list(await store.processes())
        leader = await store.acquire_lease(self._holder, LEASE_S)
        if leader != self._leader:
            log.info(
                "rollout controller %s: %s the lease",
                self.source,
                "took" if leader else "lost",
            )
        self._leader = leader
        if self.store_down_since is not None:
            log.warning(
                "the state store answers again after %.0fs: decisions resume",
                self._clock() - self.store_down_since,
            )
            self.store_down_since = None
        self.store_error = None
        async with self._lock:
            stored = await store.load_states()
            if not self._synced:
                self._synced = True
                await self._reconcile(config, stored)
                return
            for name, mine in list(self.states.items()):
                state = stored.get(name)
                if state is None:
                    await self._restore(store, mine)
                elif state != mine:
                    # Decided elsewhere: serve it here too. (Not by version alone: a store
                    # that lost its data numbers the versions from 1 again.)
                    self.states[name] = state

    async def _restore(self, store: StateStore, state: RouteState) -> None:
        """Write back a state the store lost (a Redis restarted without its data)."""
        restored = await store.compare_and_set(state, 0)
        if restored is None:
            return  # another process restored it first: read on the next tick
        self.states[state.route] = restored
        log.warning(
            "route %s: the state store had lost its rollout state; restored it from memory "
            "(%s at %g%%)",
            state.route,
            state.status.value,
            state.weight,
        )

    async def _publish(self, store: StateStore, *, final: bool = False) -> None:
        """Publish the stats slices completed since the last publish (`final`: and the
        current one, which this process will not fill any further)."""
        stats = self._host.stats
        current = stats.slice_of(self._clock()) + (1 if final else 0)
        first = (
            self._published_through + 1
            if self._published_through is not None
            else current - SETTLE_SLICES - 1
        )
        slices = [item for item in stats.slices() if first <= item[2] < current]
        await store.publish_stats(self.source, slices, stats.retention_s)
        self._published_through = current - 1

    def _store_failed(self, exc: Exception) -> None:
        self._leader = False  # rule 1: decide nothing from now on
        self.store_error = f"{exc.__class__.__name__}: {exc}"
        if self.store_down_since is None:
            self.store_down_since = self._clock()
            log.warning(
                "the state store is unreachable (%s): requests go on at the last weights "
                "known (%s); decisions pause",
                self.store_error,
                ", ".join(f"{n} {w:g}%" for n, w in self.served_weights().items()) or "none",
            )

    async def _gather(self, route: str, now: float) -> Evidence:
        """A route's evidence with the stats slices settled since it was last gathered."""
        state = self.states[route]
        evidence = state.evidence
        span = slices_to_gather(evidence, now)
        config = self._host.config.route(route)
        if span is None or config is None or config.rollout.auto is None:
            return evidence
        canary, stable = variants_of(state)  # a canary in shadow: its shadow pairs
        return evidence.added(
            await self.window(route, canary, span.first, span.last),
            await self.window(route, stable, span.first, span.last),
            span.next,
            config.rollout.auto,
        )

    # --- state ----------------------------------------------------------------------------

    async def _reconcile(self, config: Config, stored: Mapping[str, RouteState]) -> None:
        """Bring every route's state in line with `config` (at start and on reload)."""
        for name in set(self.states) - {route.name for route in config.routes}:
            del self.states[name]
        for reconciled in reconcile_all(config, stored, self._clock()):
            if reconciled.store:
                await self._commit(reconciled.route, reconciled.transition)
            else:
                self.states[reconciled.route.name] = reconciled.transition.state

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
                self._store_failed(exc)
                self._synced = False  # reconcile again once the store answers
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
            self._store_failed(exc)
            self._synced = False
            return {}

    def _explain(self, route: Route, decision: Decision) -> None:
        log.info("route %s: %s", route.name, decision.reason)
        self._host.record_decision(route.name, decision)

    async def _open_store(self) -> None:
        """Open the store the config names (unless one was given), and try for the lease."""
        if self._store is None:
            self._store = self._open_configured_store()
        await self._take_lease()

    def _open_configured_store(self) -> StateStore:
        config = self._host.config.state
        try:
            store = open_store(config)
        except (OSError, sqlite3.Error) as exc:  # a file that cannot be: a config mistake
            raise RuntimeError(f"cannot open the state store at {config.path}: {exc}") from exc
        log.info(
            "rollout state in %s",
            config.path if config.store is StateStoreKind.SQLITE else config.url,
        )
        return store

    async def _take_lease(self) -> None:
        assert self._store is not None
        try:
            self._leader = await self._store.acquire_lease(self._holder, LEASE_S)
        except Exception as exc:
            self._store_failed(exc)

    def _shared_settings(self, config: Config) -> dict[str, object]:
        """What the fleet shares of `config`, worked out once per config."""
        if self._settings_of is None or self._settings_of[0] is not config:
            self._settings_of = (config, dict(shared_settings(config)))
        return self._settings_of[1]

    def _needs_store(self, config: Config) -> bool:
        if self._given_store or self._shared:
            return True
        if any(route.rollout.auto is not None for route in config.routes):
            return True
        return config.state.store is not StateStoreKind.SQLITE or os.path.exists(config.state.path)


def _fleet_differs(processes: list[ProcessInfo]) -> str | None:
    """Why no step may advance (rule 7), or None when every live process shares one config."""
    versions = Counter(str(p.get("fleet_version")) for p in processes)
    if len(versions) <= 1:
        return None
    shared = [
        (str(p.get("source")), settings)
        for p in processes
        if isinstance(settings := p.get("shared"), Mapping)
    ]
    found = disagreements(shared) if len(shared) == len(processes) else []
    if not found:  # a process too old to say what it shares: name the versions
        running = ", ".join(f"{v} on {n}" for v, n in versions.most_common())
        return f"the live processes run different configs ({running})"
    return f"the live processes do not share one config: {explain(found)}"
