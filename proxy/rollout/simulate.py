"""`canary-proxy simulate`: many rollouts of synthetic traffic on a simulated clock.

Each run replays a route's automatic rollout interval by interval: requests arrive as
a Poisson process at `rps`, the canary gets its weight's share, each variant's
errors are binomial and its latencies log-normal (so their histograms are
multinomial over the real histogram's buckets), and at every interval the real judge
(`proxy.judge.analysis`) and the real state machine (`proxy.rollout.machine`) decide, over the
window since the step began, exactly as the controller does. Operators tune
thresholds with it before a real rollout.

Beside it runs a Flagger-style rule on the same traffic, for comparison: the canary
alone against fixed thresholds over the last interval (its error rate against the
route's `max`, or stable's true rate plus `max_increase`; its p95 against the
latency limit computed from stable's true p95), one step per passing interval, and a
rollback once `failure_limit` checks have failed (counted over the rollout, as
Flagger counts them); an interval with no canary requests is a failed check.

Schedules are not simulated: every interval may advance.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Final

from proxy.config.model import AutoRollout, Route
from proxy.judge.analysis import Evidence, judge
from proxy.judge.histogram import LogHistogram
from proxy.judge.stats import VariantStats
from proxy.rollout.machine import RouteState, Status, on_judgement, reconcile

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Policy", "RunResult", "Scenario", "Summary", "render", "simulate", "summarize"]

_PER_DOUBLING: Final = 8
_SIGMAS: Final = 7.0  # histogram buckets are drawn over median × e^(±7σ)


class Policy(StrEnum):
    JUDGE = "canary-proxy"
    FLAGGER = "flagger-style"


@dataclass(frozen=True, slots=True)
class Scenario:
    """The synthetic traffic of one simulation."""

    rps: float = 10.0
    stable_error_rate: float = 0.01
    canary_error_rate: float = 0.01
    canary_latency_ratio: float = 1.0  # canary latencies are stable's times this
    canary_ttft_ratio: float = 1.0
    stream_share: float = 0.5  # the share of requests that stream (TTFT is theirs)
    latency_p50_s: float = 1.0
    ttft_p50_s: float = 0.2
    sigma: float = 0.5  # of log latency
    duration_s: float = 4 * 3600.0


@dataclass(frozen=True, slots=True)
class RunResult:
    outcome: str  # promoted | rolled_back | held | running
    time_s: float
    canary_requests: int
    highest_weight: float


@dataclass(frozen=True, slots=True)
class Summary:
    policy: Policy
    runs: int
    promoted: float  # shares of runs
    rolled_back: float
    running: float  # still running at the end, or held
    time_to_outcome_p50_s: float | None
    time_to_outcome_p90_s: float | None
    rollback_canary_requests_p50: float | None
    rollback_highest_weight_p50: float | None
    promote_canary_requests_p50: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def to_mapping(self) -> dict[str, object]:
        return {
            "policy": self.policy.value,
            "runs": self.runs,
            "promoted": self.promoted,
            "rolled_back": self.rolled_back,
            "running": self.running,
            "time_to_outcome_p50_s": self.time_to_outcome_p50_s,
            "time_to_outcome_p90_s": self.time_to_outcome_p90_s,
            "rollback_canary_requests_p50": self.rollback_canary_requests_p50,
            "rollback_highest_weight_p50": self.rollback_highest_weight_p50,
            "promote_canary_requests_p50": self.promote_canary_requests_p50,
        }


class _Traffic:
    """Draws one interval of one variant's numbers."""

    def __init__(
        self, rng: np.random.Generator, scenario: Scenario, canary: bool, auto: AutoRollout
    ) -> None:
        self._rng = rng
        # Only what the route's checks read is drawn: the draws are most of the time.
        self._latency_judged = auto.checks.latency_p95 is not None
        self._ttft_judged = auto.checks.ttft_p95 is not None
        self.error_rate = scenario.canary_error_rate if canary else scenario.stable_error_rate
        latency_ratio = scenario.canary_latency_ratio if canary else 1.0
        ttft_ratio = scenario.canary_ttft_ratio if canary else 1.0
        self.stream_share = scenario.stream_share
        self._latency = _buckets(scenario.latency_p50_s * latency_ratio, scenario.sigma)
        self._ttft = _buckets(scenario.ttft_p50_s * ttft_ratio, scenario.sigma)
        self.latency_p95_s = (
            scenario.latency_p50_s * latency_ratio * math.exp(1.645 * scenario.sigma)
        )

    def draw(self, requests: int) -> VariantStats:
        rng = self._rng
        stats = VariantStats()
        stats.requests = requests
        if requests == 0:
            return stats
        stats.errors = int(rng.binomial(requests, self.error_rate))
        if stats.errors:
            stats.errors_by_type["500"] = stats.errors
        if self._latency_judged:
            stats.latency = self._histogram(self._latency, requests)
        if self._ttft_judged:
            stats.ttft = self._histogram(self._ttft, int(rng.binomial(requests, self.stream_share)))
        return stats

    def _histogram(
        self, buckets: tuple[np.ndarray, np.ndarray, np.ndarray], n: int
    ) -> LogHistogram:
        indices, probabilities, mids = buckets
        histogram = LogHistogram()
        if n == 0:
            return histogram
        counts = self._rng.multinomial(n, probabilities)
        nonzero = counts.nonzero()[0]
        histogram.buckets = dict(
            zip(indices[nonzero].tolist(), counts[nonzero].tolist(), strict=True)
        )
        histogram.count = n
        histogram.sum = float((counts * mids).sum())
        return histogram


def _buckets(median_s: float, sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bucket indices, probabilities and midpoints of a log-normal over the histogram's buckets."""
    import numpy as np

    mu = math.log(median_s)
    low = math.floor(math.log2(median_s * math.exp(-_SIGMAS * sigma)) * _PER_DOUBLING) - 1
    high = math.ceil(math.log2(median_s * math.exp(_SIGMAS * sigma)) * _PER_DOUBLING) + 1
    indices = np.arange(low, high + 1)
    edges = np.exp2(np.arange(low, high + 2) / _PER_DOUBLING)
    cdf = np.array([_normal_cdf((math.log(edge) - mu) / sigma) for edge in edges])
    probabilities = np.diff(cdf)
    probabilities = probabilities / probabilities.sum()
    mids = np.sqrt(edges[:-1] * edges[1:])
    return indices, probabilities, mids


def _normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2))


def simulate(
    route: Route, scenario: Scenario, runs: int, seed: int, policy: Policy
) -> list[RunResult]:
    """`runs` rollouts of `route` under `scenario`, decided by `policy`."""
    import numpy as np

    auto = route.rollout.auto
    if auto is None:
        raise ValueError(f"route {route.name!r} has no automatic rollout to simulate")
    rng = np.random.default_rng(seed)
    stable = _Traffic(rng, scenario, False, auto)
    canary = _Traffic(rng, scenario, True, auto)
    one = _one_judged_run if policy is Policy.JUDGE else _one_flagger_run
    return [one(route, auto, scenario, rng, stable, canary) for _ in range(runs)]


def _first_state(route: Route) -> RouteState:
    return reconcile(None, route, "simulated", 0.0).state


def _one_judged_run(
    route: Route,
    auto: AutoRollout,
    scenario: Scenario,
    rng: np.random.Generator,
    stable: _Traffic,
    canary: _Traffic,
) -> RunResult:
    state = _first_state(route)
    canary_requests = 0
    highest = state.weight
    now = 0.0
    while now < scenario.duration_s:
        now += auto.interval_s
        n_canary, n_stable = _split(rng, scenario.rps * auto.interval_s, state.weight)
        canary_requests += n_canary
        _accumulate(state.evidence, canary.draw(n_canary), stable.draw(n_stable))
        judgement = judge(state.evidence, auto) if state.step >= 0 else None
        state = on_judgement(state, auto, judgement, now, True).state
        highest = max(highest, state.weight)
        if state.status is not Status.PROGRESSING:
            break
    return RunResult(_outcome(state.status), now, canary_requests, highest)


def _one_flagger_run(
    route: Route,
    auto: AutoRollout,
    scenario: Scenario,
    rng: np.random.Generator,
    stable: _Traffic,
    canary: _Traffic,
) -> RunResult:
    checks = auto.checks
    error_limit = _flagger_error_limit(auto, scenario)
    latency_limit = _flagger_latency_limit(auto, stable)
    steps = auto.steps
    step = 0
    weight = steps[0]
    failed = 0
    canary_requests = 0
    highest = weight
    now = 0.0
    while now < scenario.duration_s:
        now += auto.interval_s
        n_canary, _ = _split(rng, scenario.rps * auto.interval_s, weight)
        canary_requests += n_canary
        interval = canary.draw(n_canary)
        passed = n_canary > 0
        if passed and error_limit is not None and checks.error_rate is not None:
            passed = interval.errors / n_canary <= error_limit
        if passed and latency_limit is not None:
            p95 = interval.latency.quantile(0.95)
            passed = p95 is not None and p95 <= latency_limit
        if not passed:
            failed += 1
            if failed >= auto.failure_limit:
                return RunResult("rolled_back", now, canary_requests, highest)
            continue
        step += 1
        if step >= len(steps) or steps[step] >= 100:
            return RunResult("promoted", now, canary_requests, 100.0)
        weight = steps[step]
        highest = max(highest, weight)
    return RunResult("running", now, canary_requests, highest)


def _accumulate(evidence: Evidence, canary: VariantStats, stable: VariantStats) -> None:
    """Add an interval's draws to the evidence in place. The controller builds new
    evidence every interval (`Evidence.added`); a million simulated intervals cannot
    afford the copies, and nothing else holds this evidence."""
    evidence.rollout_canary.merge(canary)
    evidence.step_canary.merge(canary)
    evidence.rollout_stable.merge(stable)
    evidence.step_stable.merge(stable)


def _flagger_error_limit(auto: AutoRollout, scenario: Scenario) -> float | None:
    check = auto.checks.error_rate
    if check is None:
        return None
    limits = []
    if check.max is not None:
        limits.append(check.max)
    if check.max_increase is not None:
        limits.append(scenario.stable_error_rate + check.max_increase)
    return min(limits) if limits else None


def _flagger_latency_limit(auto: AutoRollout, stable: _Traffic) -> float | None:
    check = auto.checks.latency_p95
    if check is None:
        return None
    limits = []
    if check.max_s is not None:
        limits.append(check.max_s)
    if check.max_ratio is not None:
        limits.append(check.max_ratio * stable.latency_p95_s)
    return min(limits) if limits else None


def _split(rng: np.random.Generator, expected: float, weight: float) -> tuple[int, int]:
    """Poisson arrivals in one interval, split by the weight: (canary, stable)."""
    share = weight / 100
    return int(rng.poisson(expected * share)), int(rng.poisson(expected * (1 - share)))


def _outcome(status: Status) -> str:
    return {
        Status.PROMOTED: "promoted",
        Status.ROLLED_BACK: "rolled_back",
        Status.PAUSED: "held",
    }.get(status, "running")


def summarize(policy: Policy, results: Sequence[RunResult]) -> Summary:
    runs = len(results)
    promoted = [r for r in results if r.outcome == "promoted"]
    rolled = [r for r in results if r.outcome == "rolled_back"]
    decided = [r.time_s for r in results if r.outcome in ("promoted", "rolled_back")]
    return Summary(
        policy=policy,
        runs=runs,
        promoted=len(promoted) / runs,
        rolled_back=len(rolled) / runs,
        running=(runs - len(promoted) - len(rolled)) / runs,
        time_to_outcome_p50_s=_quantile(decided, 0.5),
        time_to_outcome_p90_s=_quantile(decided, 0.9),
        rollback_canary_requests_p50=_quantile([float(r.canary_requests) for r in rolled], 0.5),
        rollback_highest_weight_p50=_quantile([r.highest_weight for r in rolled], 0.5),
        promote_canary_requests_p50=_quantile([float(r.canary_requests) for r in promoted], 0.5),
    )


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, round(q * 100) - 1)]


def render(
    route: Route, scenario: Scenario, runs: int, seed: int, summaries: Sequence[Summary]
) -> str:
    """The simulation's outcome as a table, one row per policy."""
    auto = route.rollout.auto
    assert auto is not None
    steps = " > ".join(f"{step:g}" for step in auto.steps)
    lines = [
        f"route {route.name}: steps {steps} %, every {auto.interval_s:g}s, "
        f"{auto.min_requests} canary requests first, confidence {auto.confidence:g}",
        f"traffic: {scenario.rps:g} req/s; errors {100 * scenario.stable_error_rate:g}% stable, "
        f"{100 * scenario.canary_error_rate:g}% canary; canary latency "
        f"x{scenario.canary_latency_ratio:g}, TTFT x{scenario.canary_ttft_ratio:g}",
        f"{runs} runs of up to {scenario.duration_s / 3600:g} h, seed {seed}",
        "",
    ]
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
            _duration(summary.time_to_outcome_p50_s),
            _duration(summary.time_to_outcome_p90_s),
            _number(summary.rollback_canary_requests_p50),
            _number(summary.rollback_highest_weight_p50, "%"),
        )
        for summary in summaries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _number(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:g}{unit}"
