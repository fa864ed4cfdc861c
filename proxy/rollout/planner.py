"""What the rollout controller decides on a tick: a pure function of the time, the route
states, the judge's evidence, the config and what the fleet says.

The controller (`proxy.server.controller`) does the I/O around it: it reads the states
and the stats from the store, asks `due` which routes to judge, gathers their evidence
over `slices_to_gather`, calls `plan`, then stores each transition (compare-and-set),
serves `served_weights`, and logs and counts what the plan says. Nothing here reads a
clock, a store or a socket, so whole rollouts run in tests on a fake clock.

Rules:
1. A route with `rollout.auto` is judged every `interval`, the first time one interval
   after the route was first planned (at start, or when a reload added it).
2. Only the leader judges; a process that does not lead plans weights only.
3. Only a `progressing` route, a `testing` one (an A/B test's guard and end), or one in
   `shadow`, is judged; the timers of the others run on regardless.
4. No step goes up outside an `advance` schedule window, nor while the live processes
   do not share one config (`Fleet.held_because`); failures still count, and a
   rollback is never held.
5. The evidence grows by the stats slices settled since it was last gathered: up to
   `SETTLE_SLICES` before the current slice, by when every live process has published.
6. The weight served is the state's, or 0 outside a `serve` schedule window.
7. A step with a `pause` holds the weight there for the pause, counted from when the
   step was reached (or the rollout resumed at it): the judge goes on judging, and
   failures count (a rollback is never held), but no step goes up before it ends.
   The shadow phase is held so for `shadow.duration`.
8. A route in `shadow` is judged as a progressing one, on its shadow pairs (the stats
   variants `shadow_canary` and `shadow_stable`) instead of its served traffic, and
   sends its shadow share to the canary while its `serve` window is open.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Final

from proxy.config.model import AutoRollout, Config, Route, Variant
from proxy.config.summary import format_span
from proxy.judge.analysis import Evidence, Judgement, judge
from proxy.judge.stats import SLICE_S, Series, ShadowSide
from proxy.rollout.machine import (
    RouteState,
    Status,
    Transition,
    canary_identity,
    on_judgement,
    reconcile,
    served_weight,
)
from proxy.routing.schedule import may_advance, may_serve

__all__ = [
    "SETTLE_SLICES",
    "SHADOW_VARIANTS",
    "Fleet",
    "Judged",
    "Plan",
    "Reconciled",
    "SliceRange",
    "due",
    "pause_left_s",
    "plan",
    "reconcile_all",
    "served_weights",
    "shadowing",
    "slices_to_gather",
    "timers_for",
    "variants_of",
]

SETTLE_SLICES: Final = 2  # rule 5
# The stats variants a shadow pair is recorded under (rule 8): (canary, stable).
SHADOW_VARIANTS: Final = (ShadowSide.CANARY, ShadowSide.STABLE)
_SERVED_VARIANTS: Final = (Variant.CANARY, Variant.STABLE)
_JUDGED: Final = (Status.PROGRESSING, Status.TESTING, Status.SHADOW)


@dataclass(frozen=True, slots=True)
class Fleet:
    """What the fleet says to this process on this tick."""

    leader: bool
    held_because: str | None = None  # why no step may go up (rule 4); None: they agree


@dataclass(frozen=True, slots=True)
class SliceRange:
    """The stats slices [first, last] to add to a route's evidence; then it runs to `next`."""

    first: int
    last: int

    @property
    def next(self) -> int:
        return self.last + 1


@dataclass(frozen=True, slots=True)
class Judged:
    """One route judged on this tick, and what that did to its state."""

    route: Route
    judgement: Judgement | None  # None: below the first step, taken without a judgement
    transition: Transition  # its state is to be stored, whether or not it decided
    held_because: str | None  # a step that would have gone up, and why it did not
    pause_left_s: float = 0.0  # what is left of the step's pause (rule 7)

    @property
    def note(self) -> str | None:
        """A sentence for the log when the judgement counted but decided nothing."""
        judgement, state = self.judgement, self.transition.state
        auto = self.route.rollout.auto
        if judgement is None or self.transition.decision is not None or auto is None:
            return None
        where = "in shadow" if state.status is Status.SHADOW else "at this step"
        pausing = (
            f"; {'held' if state.status is Status.SHADOW else 'pausing'} {where}, "
            f"{format_span(self.pause_left_s)} left"
            if self.pause_left_s > 0
            else ""
        )
        at = "in shadow" if state.status is Status.SHADOW else f"at {state.weight:g}%"
        return (
            f"route {self.route.name} {at}: {judgement.verdict.value} "
            f"({state.passes}/{auto.pass_intervals} passes, "
            f"{state.failures}/{auto.failure_limit} failures{pausing}): {judgement.reason}"
        )


@dataclass(frozen=True, slots=True)
class Plan:
    judged: tuple[Judged, ...]
    timers: Mapping[str, float]  # when each route is next judged (epoch seconds)


@dataclass(frozen=True, slots=True)
class Reconciled:
    """A route's state brought in line with the config; `store` when it must be written."""

    route: Route
    transition: Transition
    store: bool


def timers_for(config: Config, timers: Mapping[str, float], now: float) -> dict[str, float]:
    """The judgement timers of the config's automatic routes (rule 1): kept where they
    run, started for a route seen for the first time, dropped for a route gone."""
    result: dict[str, float] = {}
    for route in config.routes:
        auto = route.rollout.auto
        if auto is not None:
            result[route.name] = timers.get(route.name, now + auto.interval_s)
    return result


def pause_left_s(state: RouteState, auto: AutoRollout, now: float) -> float:
    """What is left of the pause of the step the rollout is at, or of the shadow phase
    (rule 7); 0 when none."""
    if state.status is Status.SHADOW and auto.shadow is not None:
        return max(0.0, state.step_started_at + auto.shadow.duration_s - now)
    if state.status is not Status.PROGRESSING:
        return 0.0
    pause = auto.pause_s(state.step)
    return max(0.0, state.step_started_at + pause - now) if pause > 0 else 0.0


def due(
    config: Config, states: Mapping[str, RouteState], timers: Mapping[str, float], now: float
) -> list[Route]:
    """The routes to judge now (rules 1 and 3), whose evidence the caller gathers."""
    return [
        route
        for route in config.routes
        if route.rollout.auto is not None
        and route.name in timers
        and now >= timers[route.name]
        and (state := states.get(route.name)) is not None
        and state.status in _JUDGED
    ]


def variants_of(state: RouteState) -> tuple[Series, Series]:
    """The stats variants (canary, stable) a route's evidence is gathered from (rule 8)."""
    return SHADOW_VARIANTS if state.status is Status.SHADOW else _SERVED_VARIANTS


def slices_to_gather(evidence: Evidence, now: float) -> SliceRange | None:
    """The settled slices the evidence has not seen yet (rule 5); None when there are none."""
    settled = int(now // SLICE_S) - SETTLE_SLICES + 1
    if settled <= evidence.next_slice:
        return None
    return SliceRange(evidence.next_slice, settled - 1)


def plan(
    now: float,
    states: Mapping[str, RouteState],
    evidence: Mapping[str, Evidence],
    config: Config,
    fleet: Fleet,
    timers: Mapping[str, float],
) -> Plan:
    """Judge the routes that are due, with the evidence gathered for them (rules 1-4).

    Args:
        now: epoch seconds.
        states: every route's state, as stored.
        evidence: for each route to judge, its evidence with the settled slices added
            (a route missing here is judged on the evidence its state holds).
        config: the config in force.
        fleet: whether this process leads, and whether the fleet agrees.
        timers: when each route is next judged (`timers_for`).
    """
    timers = timers_for(config, timers, now)
    if not fleet.leader:
        return Plan((), timers)
    judged: list[Judged] = []
    for route in due(config, states, timers, now):
        auto = route.rollout.auto
        assert auto is not None  # due() judges automatic routes only
        timers[route.name] = now + auto.interval_s
        state = states[route.name]
        state = replace(state, evidence=evidence.get(route.name, state.evidence))
        judged_now = state.step >= 0 or state.status is Status.SHADOW
        judgement = judge(state.evidence, auto) if judged_now else None
        pausing = pause_left_s(state, auto, now)
        advance = may_advance(route.schedule, now) and fleet.held_because is None and not pausing
        transition = on_judgement(state, auto, judgement, now, advance)
        held = (
            fleet.held_because
            if fleet.held_because is not None and transition.state.passes >= auto.pass_intervals
            else None
        )
        judged.append(Judged(route, judgement, transition, held, pausing))
    return Plan(tuple(judged), timers)


def served_weights(
    config: Config, states: Mapping[str, RouteState], now: float
) -> dict[str, float]:
    """The weight each route serves now (rule 6)."""
    return {
        route.name: served_weight(states[route.name], may_serve(route.schedule, now))
        for route in config.routes
        if route.name in states
    }


def shadowing(config: Config, states: Mapping[str, RouteState], now: float) -> frozenset[str]:
    """The routes whose canary gets shadow traffic now (rule 8)."""
    return frozenset(
        route.name
        for route in config.routes
        if (state := states.get(route.name)) is not None
        and state.status is Status.SHADOW
        and route.rollout.auto is not None
        and route.rollout.auto.shadow is not None
        and may_serve(route.schedule, now)
    )


def reconcile_all(config: Config, stored: Mapping[str, RouteState], now: float) -> list[Reconciled]:
    """Every route's state in line with `config` (at start, on reload, after an outage).

    A state is to be stored when reconciling decided something, or when none was stored.
    """
    return [
        Reconciled(route, transition, transition.decision is not None or route.name not in stored)
        for route, transition in _reconciled(config, stored, now)
    ]


def _reconciled(
    config: Config, stored: Mapping[str, RouteState], now: float
) -> Iterable[tuple[Route, Transition]]:
    for route in config.routes:
        identity = canary_identity(route, config.backends)
        yield route, reconcile(stored.get(route.name), route, identity, now)
