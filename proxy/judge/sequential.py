"""The statistics the rollout judge uses: confidence bounds and always-valid tests. Pure.

Two kinds of question are asked of a canary's numbers:

- *Is it clearly worse than a limit?* (fail) A rollout looks at its data every
  interval, for as long as it runs, and a fixed-sample test repeated that way would
  cry wolf far more often than its nominal level. So the failing side uses the
  mixture sequential probability ratio test (mSPRT; Robbins 1970, as used for A/B
  tests by Johari et al. 2017, "Always valid inference"): its statistic Λ may be
  checked after every request and still exceeds 1/α, under the null hypothesis, with
  probability at most α over the whole sequence (Ville's inequality). The mixture
  here is one-sided (half-normal over excesses above the null, as only an excess can
  fail a canary) and averaged over spreads τ from half the limit to eight times it,
  so small and large regressions are both caught early; an average of such
  martingales is one. The normal approximation and a plug-in variance make all this
  hold approximately, which the tests and the simulator measure.
- *Is it clearly within the limit?* (pass) A wrong pass only moves a canary one step
  up, where it meets more traffic and is judged again, so this side uses the
  one-sided upper confidence bound of a fixed-sample interval at the route's
  confidence: Wilson's score interval for a proportion, Newcombe's hybrid score
  interval for a difference of two proportions (both behave well with few events).

Latency quantiles are turned into proportions: "p95 ≤ T" is "at most 5% of requests
take longer than T", so the same proportion tests apply to the count of requests
above T, read from a log-bucketed histogram (inside a bucket, values are taken as
spread evenly on its log scale).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Final

from proxy.judge.histogram import LogHistogram

__all__ = [
    "above",
    "difference_bounds",
    "log_mixture_ratio",
    "log_mixture_ratio_difference",
    "quantile_bounds",
    "wilson_bounds",
    "z_score",
]

_NORMAL: Final = NormalDist()
_LOG_2: Final = math.log(2)
_SPREADS: Final = (0.5, 1.0, 2.0, 4.0, 8.0)  # the mixture's spreads, in units of the scale
_PER_DOUBLING: Final = 8  # proxy.judge.histogram's buckets per doubling


def z_score(confidence: float) -> float:
    """The one-sided normal quantile for `confidence` (0.95 → 1.645)."""
    return _NORMAL.inv_cdf(confidence)


def wilson_bounds(events: float, trials: int, confidence: float) -> tuple[float, float]:
    """One-sided Wilson score bounds for a proportion (each side at `confidence`)."""
    if trials <= 0:
        return 0.0, 1.0
    z = z_score(confidence)
    p = events / trials
    z2 = z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_bounds(
    events_a: int, trials_a: int, events_b: int, trials_b: int, confidence: float
) -> tuple[float, float]:
    """One-sided bounds for p_a − p_b by Newcombe's hybrid score method (his method 10)."""
    if trials_a <= 0 or trials_b <= 0:
        return -1.0, 1.0
    p_a, p_b = events_a / trials_a, events_b / trials_b
    low_a, high_a = wilson_bounds(events_a, trials_a, confidence)
    low_b, high_b = wilson_bounds(events_b, trials_b, confidence)
    difference = p_a - p_b
    lower = difference - math.sqrt((p_a - low_a) ** 2 + (high_b - p_b) ** 2)
    upper = difference + math.sqrt((high_a - p_a) ** 2 + (p_b - low_b) ** 2)
    return max(-1.0, lower), min(1.0, upper)


def log_mixture_ratio(events: float, trials: int, null: float, scale: float) -> float:
    """log Λ of the one-sided mSPRT of H0: p ≤ `null` against p > `null`.

    Observations are Bernoulli, taken as normal with the variance at the null
    boundary; the effect is mixed over half-normals of spreads around `scale`. 0 when
    the estimate is not above the null (the one-sided test never rejects there).
    """
    if trials <= 0:
        return 0.0
    estimate = events / trials
    if estimate <= null:
        return 0.0
    variance = max(null * (1 - null), 1e-9) / trials  # of the estimate, under H0
    return _log_mixture(estimate - null, variance, scale)


def log_mixture_ratio_difference(
    events_a: int,
    trials_a: int,
    events_b: int,
    trials_b: int,
    null: float,
    scale: float,
) -> float:
    """log Λ of the one-sided mSPRT of H0: p_a − p_b ≤ `null` against the excess.

    The variance of the difference is estimated with the proportions smoothed by half
    an event (so a run of zero errors does not make it vanish).
    """
    if trials_a <= 0 or trials_b <= 0:
        return 0.0
    difference = events_a / trials_a - events_b / trials_b
    if difference <= null:
        return 0.0
    smooth_a = (events_a + 0.5) / (trials_a + 1)
    smooth_b = (events_b + 0.5) / (trials_b + 1)
    variance = smooth_a * (1 - smooth_a) / trials_a + smooth_b * (1 - smooth_b) / trials_b
    return _log_mixture(difference - null, variance, scale)


def _log_mixture(excess: float, variance: float, scale: float) -> float:
    """log of the mean, over the spreads τ of `_SPREADS` × `scale`, of the one-sided
    normal-mixture likelihood ratio for an observed excess d with variance V:

        Λ_τ = 2 · sqrt(V / (V + τ²)) · exp(τ² d² / (2 V (V + τ²))) · Φ(d τ / sqrt(V (V + τ²)))
    """
    logs = []
    for factor in _SPREADS:
        tau2 = (factor * scale) ** 2
        total = variance + tau2
        logs.append(
            _LOG_2
            + 0.5 * math.log(variance / total)
            + tau2 * excess * excess / (2 * variance * total)
            + _log_normal_cdf(excess * math.sqrt(tau2 / (variance * total)))
        )
    peak = max(logs)
    return peak + math.log(sum(math.exp(value - peak) for value in logs) / len(logs))


def _log_normal_cdf(z: float) -> float:
    return math.log(max(_NORMAL.cdf(z), 1e-300))


def above(histogram: LogHistogram, threshold_s: float) -> float:
    """How many recorded values exceed `threshold_s`, taking the values inside the bucket
    that holds the threshold as spread evenly over the bucket's log scale."""
    if threshold_s <= 0:
        return float(histogram.count)
    position = math.log2(threshold_s) * _PER_DOUBLING
    count = 0.0
    for index, n in histogram.buckets.items():
        # Bucket `index` holds (2^(index/8), 2^((index+1)/8)].
        if index >= position:
            count += n
        elif index + 1 > position:
            count += n * (index + 1 - position)
    return count


def quantile_bounds(
    histogram: LogHistogram, q: float, confidence: float
) -> tuple[float | None, float | None]:
    """Distribution-free one-sided bounds for the q-quantile, from order statistics.

    The rank bounds come from the normal approximation to the binomial count below
    the quantile, each read from the histogram as `LogHistogram.quantile` reads a rank.
    None where the sample is too small to bound that side.
    """
    n = histogram.count
    if n == 0:
        return None, None
    spread = z_score(confidence) * math.sqrt(n * q * (1 - q))
    low_rank = math.floor(n * q - spread)
    high_rank = math.ceil(n * q + spread) + 1
    return (
        histogram.quantile(low_rank / n) if low_rank >= 1 else None,
        histogram.quantile(high_rank / n) if high_rank <= n else None,
    )
