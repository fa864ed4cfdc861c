"""`canary-proxy simulate`: many rollouts on a simulated clock, through the real judge and
the real state machine. Pure: traffic comes in as values, results go out as values.

Two sources of traffic:

- a built-in scenario (`proxy.rollout.traffic`): synthetic users and their requests,
  drawn interval by interval at the weight the rollout is at;
- a trace of real requests (`TraceRequest`): for each, what stable and what the canary
  would have answered. Each request goes to the variant the real formula gives its
  user at the current weight (`proxy.routing.assignment`); each run varies the salt
  (the route's own for the first run, then `salt#1`, `salt#2`, ...), so that other
  users are the canary's first ones.

Each interval the variants' stats join the evidence as the controller adds them
(`Evidence.added`), the judge decides (`proxy.judge.analysis.judge`) and the state
machine moves (`proxy.rollout.machine.on_judgement`). On the same synthetic traffic
(the same seed for the same run) the baselines of `proxy.rollout.baselines` decide too:
a Flagger-style threshold rule, Kayenta's Mann-Whitney judge as Argo Rollouts runs it,
and an oracle SPRT that knows the true rates.

Schedules are not simulated: every interval may advance.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final

from proxy.config.model import AutoRollout, Route, Variant
from proxy.judge.analysis import judge, limits_of
from proxy.judge.stats import VariantStats
from proxy.rollout.baselines import Oracle, Usual, flagger_passes, kayenta_outcome
from proxy.rollout.machine import RouteState, Status, on_judgement, reconcile
from proxy.rollout.traffic import SCENARIOS, Scenario, Slice, World
from proxy.routing.assignment import bucket_of, canary_threshold

__all__ = [
    "SCENARIOS",
    "Outcome",
    "Policy",
    "RunResult",
    "Scenario",
    "Summary",
    "TraceRequest",
    "render",
    "replay",
    "simulate",
    "summarize",
]

KAYENTA_PARTS: Final = 10  # the points of each of Kayenta's series per interval

# Where a run's intervals come from: (start, length, weight) -> the interval's stats, or
# None when a trace has run out.
_Source = Callable[[float, float, float], Slice | None]


class Policy(StrEnum):
    JUDGE = "canary-proxy"
    FLAGGER = "flagger"
    KAYENTA = "kayenta"
    ORACLE = "oracle-sprt"


@dataclass(frozen=True, slots=True)
class RunResult:
    outcome: str  # promoted | rolled_back | held | running
    seconds: float  # until the outcome, or the whole run when still running
    canary_requests: int
    max_weight: float

    def to_mapping(self) -> dict[str, object]:
        return {
            "outcome": self.outcome,
            "seconds": self.seconds,
            "canary_requests": self.canary_requests,
            "max_weight": self.max_weight,
        }


# --- traces -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one variant answered (or would have answered) one request."""

    status: int
    latency: float  # seconds; until the client cancelled, when it did
    ttft: float | None = None  # seconds to the first token of a stream
    output_tokens: int | None = None
    cancelled: bool = False

    def record(self, stats: VariantStats, bucket: int) -> None:
        error = str(self.status) if self.status >= 500 or self.status == 429 else None
        stats.record(
            self.latency, self.ttft, error, self.output_tokens, self.cancelled, user=bucket
        )


@dataclass(frozen=True, slots=True)
class TraceRequest:
    t: float  # seconds
    user: str
    stable: Outcome
    canary: Outcome


class _TraceWorld:
    """A trace as a source of intervals: its requests split by the formula."""

    def __init__(self, requests: Sequence[TraceRequest], salt: str) -> None:
        self._requests = requests
        self._salt = salt
        self._buckets: dict[str, int] = {}
        self._next = 0
        self._origin = requests[0].t if requests else 0.0
        self.span_s = requests[-1].t - self._origin if requests else 0.0

    def interval(self, start: float, length: float, weight: float) -> Slice | None:
        if start > self.span_s:
            return None
        end = self._origin + start + length
        canary, stable = VariantStats(), VariantStats()
        threshold = canary_threshold(weight)
        requests = self._requests
        while self._next < len(requests) and requests[self._next].t < end:
            request = requests[self._next]
            self._next += 1
            bucket = self._buckets.get(request.user)
            if bucket is None:
                bucket = self._buckets[request.user] = bucket_of(self._salt, request.user)
            if bucket < threshold:
                request.canary.record(canary, bucket)
            else:
                request.stable.record(stable, bucket)
        return Slice(canary, stable, math.nan, 1.0)


# --- runs -------------------------------------------------------------------------------


def simulate(
    route: Route, scenario: Scenario, runs: int, seed: int, policy: Policy, first_run: int = 0
) -> list[RunResult]:
    """`runs` rollouts of `route` under `scenario`, decided by `policy`: runs number
    `first_run` on, each drawn from (`seed`, its number), the same for every policy."""
    auto = _auto(route)
    results = []
    for run in range(first_run, first_run + runs):
        world = World(scenario, seed, run)
        if policy is Policy.JUDGE:
            results.append(_judged(route, auto, world.interval, scenario.duration_s))
        else:
            results.append(_baseline(auto, world, scenario.duration_s, policy))
    return results


def replay(route: Route, requests: Sequence[TraceRequest], runs: int) -> list[RunResult]:
    """`runs` rollouts of `route` on a trace, the salt varied from run to run."""
    auto = _auto(route)
    ordered = sorted(requests, key=lambda request: request.t)
    salt = route.sticky.salt
    results = []
    for run in range(runs):
        world = _TraceWorld(ordered, salt if run == 0 else f"{salt}#{run}")
        results.append(_judged(route, auto, world.interval, world.span_s + auto.interval_s))
    return results


def _auto(route: Route) -> AutoRollout:
    auto = route.rollout.auto
    if auto is None:
        raise ValueError(f"route {route.name!r} has no automatic rollout to simulate")
    return auto


def _judged(route: Route, auto: AutoRollout, source: _Source, duration_s: float) -> RunResult:
    """One rollout decided by the judge and the state machine, as the controller does."""
    # From the first step, whatever weight the config serves today.
    start = replace(route, rollout=replace(route.rollout, weight=0.0))
    state: RouteState = reconcile(None, start, "simulated", 0.0).state
    canary_requests = 0
    highest = state.weight
    now = 0.0
    while now < duration_s:
        piece = source(now, auto.interval_s, state.weight)
        if piece is None:
            break
        now += auto.interval_s
        canary_requests += piece.canary.requests
        judgement = None
        if state.step >= 0:
            evidence = state.evidence.added(
                piece.canary, piece.stable, state.evidence.next_slice + 1, auto, reuse=True
            )
            state = replace(state, evidence=evidence)
            judgement = judge(evidence, auto)
        state = on_judgement(state, auto, judgement, now, True).state
        highest = max(highest, state.weight)
        if state.status is not Status.PROGRESSING:
            break
    return RunResult(_outcome(state.status), now, canary_requests, highest)


def _baseline(auto: AutoRollout, world: World, duration_s: float, policy: Policy) -> RunResult:
    """One rollout decided by a baseline: one step per passing interval, a rollback once
    its failures (counted over the rollout) reach `failure_limit` (the oracle: at once)."""
    steps = auto.steps
    step, weight = 0, steps[0]
    failed = canary_requests = step_requests = 0
    highest = weight
    oracle = Oracle(auto, world) if policy is Policy.ORACLE else None
    usual = _usual(auto, world) if policy is Policy.FLAGGER else None
    parts = KAYENTA_PARTS if policy is Policy.KAYENTA else 0
    now = 0.0
    while now < duration_s:
        piece = world.interval(now, auto.interval_s, weight, parts)
        start, now = now, now + auto.interval_s
        canary_requests += piece.canary.requests
        step_requests += piece.canary.requests
        if policy is Policy.FLAGGER:
            assert usual is not None
            verdict: str | None = "pass" if flagger_passes(auto, piece.canary, usual) else "fail"
        elif policy is Policy.KAYENTA:
            outcome = kayenta_outcome(auto, piece.canary_parts, piece.stable_parts)
            verdict = {"successful": "pass", "failed": "fail"}.get(outcome)
        else:
            assert oracle is not None
            verdict = oracle.judge(piece, start, auto.interval_s)
            if verdict == "pass" and step_requests < auto.min_requests:
                verdict = None
        if verdict == "fail":
            failed += 1
            if oracle is not None or failed >= auto.failure_limit:
                return RunResult("rolled_back", now, canary_requests, highest)
        elif verdict == "pass":
            step += 1
            if step >= len(steps) or steps[step] >= 100:
                return RunResult("promoted", now, canary_requests, 100.0)
            weight = steps[step]
            highest = max(highest, weight)
            step_requests = 0
            if oracle is not None:
                oracle.new_step()
    return RunResult("running", now, canary_requests, highest)


def _usual(auto: AutoRollout, world: World) -> Usual:
    """The fixed thresholds an operator would write from stable's ordinary numbers."""
    samples = world.base_samples()
    rates = {
        "errors": world.usual_error_rate(),
        "cancels": samples.share(Variant.STABLE, "cancels", None),
    }
    quantiles = {
        (limit.metric, limit.quantile): samples.quantile(
            Variant.STABLE, limit.metric, limit.quantile
        )
        for limit in limits_of(auto.checks)
        if limit.quantile is not None
    }
    return Usual(rates, quantiles)


def _outcome(status: Status) -> str:
    return {
        Status.PROMOTED: "promoted",
        Status.ROLLED_BACK: "rolled_back",
        Status.PAUSED: "held",
    }.get(status, "running")


# --- summaries --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Summary:
    policy: Policy
    runs: int
    promoted: float  # shares of runs
    rolled_back: float
    running: float  # still running at the end, or held
    stepped_up: float  # runs that left the first step
    time_to_outcome_p50_s: float | None
    time_to_outcome_p90_s: float | None
    rollback_time_p50_s: float | None
    rollback_canary_requests_p50: float | None
    rollback_highest_weight_p50: float | None
    promote_canary_requests_p50: float | None = None

    def to_mapping(self) -> dict[str, object]:
        return {
            "policy": self.policy.value,
            "runs": self.runs,
            "promoted": self.promoted,
            "rolled_back": self.rolled_back,
            "running": self.running,
            "stepped_up": self.stepped_up,
            "time_to_outcome_p50_s": self.time_to_outcome_p50_s,
            "time_to_outcome_p90_s": self.time_to_outcome_p90_s,
            "rollback_time_p50_s": self.rollback_time_p50_s,
            "rollback_canary_requests_p50": self.rollback_canary_requests_p50,
            "rollback_highest_weight_p50": self.rollback_highest_weight_p50,
            "promote_canary_requests_p50": self.promote_canary_requests_p50,
        }


def summarize(policy: Policy, results: Sequence[RunResult], first_step: float) -> Summary:
    runs = len(results)
    promoted = [r for r in results if r.outcome == "promoted"]
    rolled = [r for r in results if r.outcome == "rolled_back"]
    decided = [r.seconds for r in results if r.outcome in ("promoted", "rolled_back")]
    return Summary(
        policy=policy,
        runs=runs,
        promoted=len(promoted) / runs,
        rolled_back=len(rolled) / runs,
        running=(runs - len(promoted) - len(rolled)) / runs,
        stepped_up=sum(r.max_weight > first_step for r in results) / runs,
        time_to_outcome_p50_s=_quantile(decided, 0.5),
        time_to_outcome_p90_s=_quantile(decided, 0.9),
        rollback_time_p50_s=_quantile([r.seconds for r in rolled], 0.5),
        rollback_canary_requests_p50=_quantile([float(r.canary_requests) for r in rolled], 0.5),
        rollback_highest_weight_p50=_quantile([r.max_weight for r in rolled], 0.5),
        promote_canary_requests_p50=_quantile([float(r.canary_requests) for r in promoted], 0.5),
    )


def shares(results: Sequence[RunResult]) -> dict[str, object]:
    """`--json`: the shares of each outcome and every run."""
    runs = len(results) or 1
    promoted = sum(r.outcome == "promoted" for r in results) / runs
    rolled_back = sum(r.outcome == "rolled_back" for r in results) / runs
    return {
        "runs": [r.to_mapping() for r in results],
        "promoted": promoted,
        "rolled_back": rolled_back,
        "running": 1.0 - promoted - rolled_back if results else 0.0,
    }


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, round(q * 100) - 1)]


def render(heading: Iterable[str], summaries: Sequence[Summary]) -> str:
    """The simulation's outcome as a table, one row per policy, under `heading`."""
    lines = [*heading, ""]
    header = (
        "policy",
        "promoted",
        "rolled back",
        "running",
        "time p50",
        "time p90",
        "canary requests before rollback",
        "highest weight before rollback",
    )
    rows = [header] + [
        (
            summary.policy.value,
            f"{100 * summary.promoted:.1f}%",
            f"{100 * summary.rolled_back:.1f}%",
            f"{100 * summary.running:.1f}%",
            duration(summary.time_to_outcome_p50_s),
            duration(summary.time_to_outcome_p90_s),
            _number(summary.rollback_canary_requests_p50),
            _number(summary.rollback_highest_weight_p50, "%"),
        )
        for summary in summaries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def route_heading(route: Route) -> str:
    auto = _auto(route)
    steps = " > ".join(f"{step:g}" for step in auto.steps)
    return (
        f"route {route.name}: steps {steps} %, every {auto.interval_s:g}s, passes after "
        f"{auto.min_requests} canary requests at a step, confidence {auto.confidence:g}"
    )


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _number(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:g}{unit}"
