"""What other judges would decide on the same traffic, for the simulator's comparison.
Pure.

- **Flagger** (fluxcd/flagger, `pkg/controller/scheduler.go`): every interval each
  metric over that interval alone is held against a fixed threshold range (here the
  route's limits: `max`, stable's usual rate plus `max_increase`, `max_ratio` times
  stable's usual quantile); all within: one step up; any outside, or a metric with no
  value (a canary without a request: "no values found"), a failed check. The canary is
  rolled back once its failed checks, counted over the whole analysis, reach the
  threshold (`failure_limit`).
- **Kayenta** (spinnaker/kayenta's `NetflixACAJudge`, as Argo Rollouts runs it: its
  `metricproviders/kayenta`): every interval, each metric's series over that interval
  (`parts` points per variant: the interval cut in equal steps) is compared, canary
  against stable, by Kayenta's `MannWhitneyClassifier`: NaN points removed, outliers
  removed by its `IQRDetector(factor 3, reduceSensitivity)`, then the asymptotic
  Wilcoxon rank-sum confidence interval of the shift at 98% (the normal approximation
  with continuity and tie corrections of R's `wilcox.test`, as its `MannWhitney` ports
  it); "High" when the interval's lower end exceeds a quarter of the Hodges–Lehmann
  estimate and the canary's mean is at least stable's (`allowedIncrease` 1). The score
  is the share of metrics that pass (`WeightedSumScorer`, one group; no data scores
  0); Argo's thresholds (pass 90, marginal 75) make the interval successful (a step
  up), inconclusive, or failed (counted as Flagger's are).
- **Oracle SPRT**: Wald's sequential probability ratio test (1945) for each limit,
  knowing the truth: stable's rate and quantiles at each moment (of every shared cause:
  the time of day, an incident, a change of mix), and the canary's. On the counts the
  judge reads, it tests "at the limit" against the canary's true value, and fails the
  canary (or passes a limit) when its likelihood ratio reaches 1/α (α = 1 − confidence,
  not split between limits: it knows which limit matters). A canary exactly at its
  limit gives it nothing to tell apart: it neither fails nor steps up. No judge can
  be faster on average (Wald and Wolfowitz, 1948), so its time to roll back is the bound
  the others are measured against.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from proxy.config.model import AutoRollout, Variant
from proxy.judge.analysis import Limit, LimitKind, limits_of
from proxy.judge.histogram import LogHistogram
from proxy.judge.sequential import above
from proxy.judge.stats import VariantStats

if TYPE_CHECKING:
    from proxy.rollout.traffic import Slice, World

__all__ = ["Oracle", "flagger_passes", "kayenta_outcome", "mann_whitney_interval"]

_KAYENTA_CONFIDENCE: Final = 0.98
_KAYENTA_TOLERANCE: Final = 0.25
_ARGO_PASS: Final = 90.0
_ARGO_MARGINAL: Final = 75.0
_IQR_FACTOR: Final = 3.0


# --- Flagger ---------------------------------------------------------------------------


def flagger_passes(auto: AutoRollout, canary: VariantStats, usual: Usual) -> bool:
    """One Flagger analysis interval: every metric within its threshold range."""
    if canary.requests == 0:
        return False  # "no values found": a failed check
    for limit in limits_of(auto.checks):
        if limit.is_rate:
            value = _rate(canary, limit.metric)
            if value is None:
                return False
            ceiling = limit.value
            if limit.kind is LimitKind.MAX_INCREASE:
                ceiling = usual.rate(limit.metric) + limit.value
            if value > ceiling:
                return False
            continue
        assert limit.quantile is not None
        quantile = _histogram(canary, limit.metric).quantile(limit.quantile)
        if quantile is None:
            if _histogram(canary, limit.metric) is canary.latency:
                return False
            continue  # a route that streams nothing has no such metric to query
        ceiling = limit.value
        if limit.kind is LimitKind.MAX_RATIO:
            ceiling = limit.value * usual.quantile(limit.metric, limit.quantile)
        if quantile > ceiling:
            return False
    return True


@dataclass(frozen=True, slots=True)
class Usual:
    """What an operator writes into fixed thresholds: stable's usual rates and quantiles."""

    rates: dict[str, float]
    quantiles: dict[tuple[str, float], float]

    def rate(self, metric: str) -> float:
        return self.rates[metric]

    def quantile(self, metric: str, q: float) -> float:
        return self.quantiles[(metric, q)]


# --- Kayenta -----------------------------------------------------------------------------


def kayenta_outcome(
    auto: AutoRollout, canary: Sequence[VariantStats], stable: Sequence[VariantStats]
) -> str:
    """One Kayenta judgement through Argo Rollouts: successful | inconclusive | failed."""
    passed = judged = 0
    for limit in _kayenta_metrics(auto):
        label = _classify(_series(limit, canary), _series(limit, stable))
        if label == "nodata":
            continue
        judged += 1
        passed += label == "pass"
    score = 100.0 * passed / judged if judged else 0.0
    if score >= _ARGO_PASS:
        return "successful"
    return "inconclusive" if score >= _ARGO_MARGINAL else "failed"


def _kayenta_metrics(auto: AutoRollout) -> list[Limit]:
    """One metric per check (Kayenta compares with the baseline; limits are not its)."""
    seen: dict[str, Limit] = {}
    for limit in limits_of(auto.checks):
        seen.setdefault(limit.check, limit)
    return list(seen.values())


def _series(limit: Limit, parts: Sequence[VariantStats]) -> list[float]:
    """A metric's points over the interval's parts, NaN (no requests) removed."""
    values: list[float] = []
    for part in parts:
        if limit.is_rate:
            value = _rate(part, limit.metric)
        else:
            assert limit.quantile is not None
            value = _histogram(part, limit.metric).quantile(limit.quantile)
        if value is not None:
            values.append(value)
    return _without_outliers(values)


def _without_outliers(values: list[float]) -> list[float]:
    """Kayenta's IQRDetector(factor = 3, reduceSensitivity = true): the fences are the
    wider of Tukey's (quartiles ∓ 3 IQR) and the 1st and 99th percentiles."""
    if len(values) < 2:
        return values
    p01, p25, p75, p99 = (_percentile(values, p) for p in (1, 25, 75, 99))
    iqr = p75 - p25
    low, high = min(p01, p25 - _IQR_FACTOR * iqr), max(p99, p75 + _IQR_FACTOR * iqr)
    return [v for v in values if low <= v <= high]


def _percentile(values: list[float], p: float) -> float:
    """Apache Commons Math's default percentile estimate (as Kayenta's StatUtils)."""
    ordered = sorted(values)
    n = len(ordered)
    position = p * (n + 1) / 100
    if position < 1:
        return ordered[0]
    if position >= n:
        return ordered[-1]
    low = int(position)
    return ordered[low - 1] + (position - low) * (ordered[low] - ordered[low - 1])


def _classify(canary: list[float], stable: list[float]) -> str:
    """Kayenta's MannWhitneyClassifier for a metric whose increase is bad."""
    if not canary or not stable:
        return "nodata"
    if sorted(canary) == sorted(stable) or len(set(canary) | set(stable)) == 1:
        return "pass"
    low, _, estimate = mann_whitney_interval(canary, stable, _KAYENTA_CONFIDENCE)
    mean_stable = statistics.fmean(stable)
    deviation = statistics.fmean(canary) / mean_stable if mean_stable != 0 else 1.0
    if low > _KAYENTA_TOLERANCE * abs(estimate) and deviation >= 1.0:
        return "high"
    return "pass"


def mann_whitney_interval(
    x: Sequence[float], y: Sequence[float], confidence: float
) -> tuple[float, float, float]:
    """The two-sided confidence interval of the shift of `x` over `y`, and its
    Hodges–Lehmann estimate, by the normal approximation of the Wilcoxon rank-sum
    statistic with continuity and tie corrections (R's `wilcox.test(conf.int = TRUE)`,
    as Kayenta's `MannWhitney` ports it)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    low_mu, high_mu = min(x) - max(y), max(x) - min(y)

    def standardized(mu: float) -> float:
        shifted = [v - mu for v in x]
        ranks = _ranks([*shifted, *y])
        nx, ny = len(x), len(y)
        dz = sum(ranks[:nx]) - nx * (nx + 1) / 2 - nx * ny / 2
        ties = _tie_counts([*shifted, *y])
        total = nx + ny
        sigma = math.sqrt(
            (nx * ny / 12) * ((total + 1) - sum(t**3 - t for t in ties) / (total * (total - 1)))
        )
        if sigma == 0:
            return 0.0
        correction = math.copysign(0.5, dz) if dz != 0 else 0.0
        return (dz - correction) / sigma

    def root(target: float) -> float:
        if standardized(low_mu) - target <= 0:
            return low_mu
        if standardized(high_mu) - target >= 0:
            return high_mu
        lo, hi = low_mu, high_mu
        for _ in range(60):
            mid = (lo + hi) / 2
            if standardized(mid) - target > 0:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    return root(z), root(-z), root(0.0)


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _tie_counts(values: list[float]) -> list[int]:
    counts: dict[float, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return [c for c in counts.values() if c > 1]


# --- the oracle --------------------------------------------------------------------------


@dataclass(slots=True)
class Oracle:
    """Wald's SPRT per limit, knowing the truth of a simulated world."""

    auto: AutoRollout
    world: World
    limits: tuple[Limit, ...] = ()
    fail_log: dict[str, float] = field(default_factory=dict)
    pass_log: dict[str, float] = field(default_factory=dict)
    _truth: _Truth | None = None

    def __post_init__(self) -> None:
        self.limits = limits_of(self.auto.checks)
        self._truth = _Truth(self.world)

    def new_step(self) -> None:
        self.pass_log = {}

    def judge(self, piece: Slice, start: float, length: float) -> str | None:
        """ "fail", "pass" or None (undecided) after this interval."""
        truth = self._truth
        assert truth is not None
        threshold = math.log(1 / (1 - self.auto.confidence))
        middle = start + length / 2
        all_within = bool(self.limits)
        for limit in self.limits:
            null, actual, events, trials = truth.of(limit, piece, middle)
            if math.isclose(null, actual, rel_tol=1e-9, abs_tol=1e-12):
                all_within = False  # exactly at the limit: nothing to tell apart
                continue
            if trials > 0:
                step = _log_ratio(events, trials, actual, null)
                sums = self.fail_log if actual > null else self.pass_log
                sums[limit.key] = sums.get(limit.key, 0.0) + step
            if actual > null:
                if self.fail_log.get(limit.key, 0.0) >= threshold:
                    return "fail"
                all_within = False
            else:
                all_within = all_within and self.pass_log.get(limit.key, 0.0) >= threshold
        return "pass" if all_within else None


def _log_ratio(events: float, trials: float, p1: float, p0: float) -> float:
    p1 = min(max(p1, 1e-9), 1 - 1e-9)
    p0 = min(max(p0, 1e-9), 1 - 1e-9)
    return events * math.log(p1 / p0) + (trials - events) * math.log((1 - p1) / (1 - p0))


class _Truth:
    """The true null and canary value of each limit at a time, from the world's model
    (a large sample of its base traffic for the quantiles)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.samples = world.base_samples()

    def of(self, limit: Limit, piece: Slice, t: float) -> tuple[float, float, float, float]:
        """(null, the canary's true value, its events, its trials) in this interval."""
        world = self.world
        scenario = world.scenario
        canary = piece.canary
        if limit.is_rate:
            events, trials = _rate_counts(canary, limit.metric)
            if limit.metric == "errors":
                stable = world.stable_rate(t)
                actual = min(stable + scenario.canary_error_rate - scenario.stable_error_rate, 1.0)
            else:
                stable = self.samples.share(Variant.STABLE, "cancels", None)
                actual = self.samples.share(Variant.CANARY, "cancels", None)
            if limit.kind is LimitKind.MAX_INCREASE:
                return min(stable + limit.value, 1.0), actual, events, trials
            return max(limit.value, stable), actual, events, trials
        assert limit.quantile is not None
        histogram = _histogram(canary, limit.metric)
        slower = world.slower(t)
        exceed = 1.0 - limit.quantile
        if limit.kind is LimitKind.MAX_RATIO:
            stable_q = self.samples.quantile(Variant.STABLE, limit.metric, limit.quantile) * slower
            threshold = limit.value * stable_q
            actual = self.samples.share(Variant.CANARY, limit.metric, threshold / slower)
            return exceed, actual, above(histogram, threshold), float(histogram.count)
        stable_share = self.samples.share(Variant.STABLE, limit.metric, limit.value / slower)
        actual = self.samples.share(Variant.CANARY, limit.metric, limit.value / slower)
        return (
            max(exceed, stable_share),
            actual,
            above(histogram, limit.value),
            float(histogram.count),
        )


def _rate_counts(stats: VariantStats, metric: str) -> tuple[float, float]:
    if metric == "errors":
        return float(stats.errors), float(stats.requests - stats.cancels)
    return float(stats.cancels), float(stats.requests)


def _rate(stats: VariantStats, metric: str) -> float | None:
    events, trials = _rate_counts(stats, metric)
    return events / trials if trials > 0 else None


def _histogram(stats: VariantStats, metric: str) -> LogHistogram:
    if metric == "latency":
        return stats.latency
    return stats.ttft if metric == "ttft" else stats.tpot
