"""The statistics of the rollout judge: always-valid tests of a rate against a limit,
built one time slice at a time, and how much to trust them. Pure.

Every check is a question about a proportion. An error rate is one; "the p95 is at most
T" is "at most 5% of requests take longer than T"; "the p95 is at most 1.25 × stable's"
is "at most 5% of the canary's requests take longer than 1.25 × stable's p95, read in
the same slice of time". So one kind of test serves every check: in each time slice k
(a judgement interval) the canary shows `events` out of `trials`, against a null rate
π_k that the limit sets for that slice (the limit itself, or stable's rate in the same
slice plus the allowed increase, or the quantile's 5%).

Each test is an *e-process*, a test supermartingale (Ville 1939; Ramdas et al.,
"Game-theoretic statistics and safe anytime-valid inference", 2023): a mixture, over a
grid of alternatives, of the likelihood ratio of the canary's counts under "the rate is
π_k moved by s on the log-odds scale" against "the rate is π_k". Under the null, the
chance that it *ever* reaches 1/α, at any look of a rollout of any length, is at most
α. For Bernoulli trials with a known null this is exact, with no normal approximation,
so small counts and small rates (a p99, an error limit of 0.1%) are handled as they are.
Both directions are tested the same way:

- `Side.FAIL`: the null is "within the limit" (the rate is at most π_k); alternatives
  lie above it. Rejecting fails the canary. One-sided likelihood ratios against a rate
  above π_k are supermartingales under every rate at or below it.
- `Side.PASS`: the null is "at or beyond the limit"; alternatives lie below it.
  Rejecting passes the check.

Comparing within time slices (requirement of stratification: Lindon et al., "Rapid
regression detection in software deployments through sequential testing", KDD 2022)
is what makes a daily pattern, a step-up or an incident of both variants cancel: each
slice's canary is measured against what stable did in that same slice.

Three departures from independent, identical trials are accounted for by dividing the
log likelihood ratios by a *design effect* (the quasi-likelihood dispersion of
Wedderburn 1974; Kish's design effect of cluster samples), which is 1 when the trials
are as independent as the model says and larger when they are not:

- the null of a slice is estimated from stable's own numbers in it (`dispersion` per
  slice: 1 + the share of the variance that stable's estimate adds);
- trials are correlated in time (bursts): `EProcess.design_effect` compares the spread
  of the per-slice residuals with what the binomial model expects;
- trials are correlated within users (one user's requests fail together):
  `proportion_design_effect` and `mean_design_effect` do the same over user clusters.

Both spreads are cluster-robust ("sandwich") variances around the fitted rate with the
small-sample factor C/(C−1); with a single cluster nothing can be said about it, and the
design effect is the whole sample (its evidence counts as one observation). Dividing by
an estimated dispersion makes the guarantee approximate; the tests and the simulator
measure it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from statistics import NormalDist
from typing import Final

from proxy.judge.histogram import LogHistogram

__all__ = [
    "EProcess",
    "Side",
    "above",
    "mean_design_effect",
    "proportion_design_effect",
    "wilson_bounds",
    "z_score",
]

_NORMAL: Final = NormalDist()
_PER_DOUBLING: Final = 8  # proxy.judge.histogram's buckets per doubling
_EDGE: Final = 1e-9  # rates are kept inside (0, 1) by this much
_SHRINK_FROM: Final = 16  # clusters (or time slices) from which a design effect is shrunk


class Side(StrEnum):
    FAIL = "fail"  # null: within the limit; rejecting it fails the check
    PASS = "pass"  # null: at or beyond the limit; rejecting it passes the check


# The alternatives of the mixture, two families with the same weights:
#
# - a limit that is a rate of its own (an absolute ceiling, the share above a quantile):
#   the null rate moved by these amounts on the log-odds scale. Most weight sits on
#   moves of a quarter to a half (a canary whose p95 is 1.4× against a limit of 1.25×
#   moves its share above the limit from 5% to about 7%, 0.3); the large moves catch a
#   canary failing everything within a few requests, the small ones a slight excess
#   over a long rollout.
# - a limit on the increase over stable: the null (stable's rate plus the increase, in
#   each slice) moved by these multiples of the increase. A healthy canary is one whole
#   increase below it in every slice, whatever stable's rate (a log-odds move would mean
#   a different thing at 1% than in an incident at 40%); a canary as far beyond the limit
#   again as the limit allows is one increase above it.
_SHIFTS: Final = {
    Side.FAIL: (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
    Side.PASS: (-0.125, -0.25, -0.5, -1.0, -2.0, -4.0),
}
_STEPS: Final = {
    Side.FAIL: (0.25, 0.5, 1.0, 2.0, 4.0, 16.0, 64.0),
    Side.PASS: (-0.25, -0.5, -0.75, -1.0, -1.5, -2.0),
}
_LOG_WEIGHTS: Final = {
    Side.FAIL: tuple(math.log(w) for w in (0.10, 0.30, 0.30, 0.15, 0.07, 0.05, 0.03)),
    Side.PASS: tuple(math.log(w) for w in (0.05, 0.15, 0.30, 0.25, 0.15, 0.10)),
}


def _softplus(x: float) -> float:
    """log(1 + e^x), without overflow."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


@dataclass(frozen=True, slots=True)
class EProcess:
    """One one-sided test of a rate against a limit, over the time slices seen so far.

    Besides the mixture's log likelihood ratios it keeps the sums that the time design
    effect needs: per slice k, the trials n_k, the residual R_k = events − π_k n_k and the
    binomial variance the model expects, each weighted by the slice's dispersion φ_k.
    Its size does not grow with the number of slices.
    """

    side: Side
    log_ratios: tuple[float, ...]
    trials: float = 0.0  # Σ n_k
    events: float = 0.0  # Σ events_k
    residual: float = 0.0  # Σ R_k
    residual_squares: float = 0.0  # Σ R_k²
    residual_trials: float = 0.0  # Σ R_k n_k
    trial_squares: float = 0.0  # Σ n_k²
    variance: float = 0.0  # Σ φ_k n_k π_k (1 − π_k)
    variance_slope: float = 0.0  # Σ φ_k n_k (1 − 2 π_k)
    weighted_trials: float = 0.0  # Σ φ_k n_k
    slices: int = 0  # slices with trials

    @classmethod
    def start(cls, side: Side) -> EProcess:
        return cls(side, (0.0,) * len(_SHIFTS[side]))

    def added(
        self,
        events: float,
        trials: float,
        null: float,
        dispersion: float = 1.0,
        increase: float | None = None,
    ) -> EProcess:
        """With one more time slice: `events` of `trials` against the null rate `null`,
        their evidence divided by `dispersion` (at least 1). With `increase`, the
        alternatives are the null moved by multiples of it; else by log-odds."""
        if trials <= 0:
            return self
        null = min(max(null, _EDGE), 1.0 - _EDGE)
        misses = trials - events
        ratios = []
        if increase is None:
            logit = math.log(null / (1.0 - null))
            up, down = _softplus(-logit), _softplus(logit)
            for ratio, shift in zip(self.log_ratios, _SHIFTS[self.side], strict=True):
                # log(alternative / null) per event, log((1 − alt) / (1 − null)) per miss
                gain = up - _softplus(-logit - shift)
                loss = down - _softplus(logit + shift)
                ratios.append(ratio + (events * gain + misses * loss) / dispersion)
        else:
            log_null, log_rest = math.log(null), math.log(1.0 - null)
            for ratio, step in zip(self.log_ratios, _STEPS[self.side], strict=True):
                alt = min(max(null + step * increase, _EDGE), 1.0 - _EDGE)
                gain = math.log(alt) - log_null
                loss = math.log(1.0 - alt) - log_rest
                ratios.append(ratio + (events * gain + misses * loss) / dispersion)
        residual = events - null * trials
        weighted = dispersion * trials
        return EProcess(
            self.side,
            tuple(ratios),
            self.trials + trials,
            self.events + events,
            self.residual + residual,
            self.residual_squares + residual * residual,
            self.residual_trials + residual * trials,
            self.trial_squares + trials * trials,
            self.variance + weighted * null * (1.0 - null),
            self.variance_slope + weighted * (1.0 - 2.0 * null),
            self.weighted_trials + weighted,
            self.slices + 1,
        )

    @property
    def dispersion(self) -> float:
        """The mean dispersion of its slices (1 when no null was estimated)."""
        return self.weighted_trials / self.trials if self.trials > 0 else 1.0

    def design_effect(self) -> float:
        """How much more the per-slice residuals spread than the binomial model expects,
        at the fitted rate (π_k plus the mean excess): at least 1, at most the trials."""
        n = self.trials
        if n <= 0:
            return 1.0
        if self.slices < 2:
            return max(1.0, n)
        excess = self.residual / n
        spread = max(
            0.0,
            self.residual_squares
            - 2.0 * excess * self.residual_trials
            + excess * excess * self.trial_squares,
        ) * (self.slices / (self.slices - 1))
        fitted = (
            self.variance + excess * self.variance_slope - excess * excess * self.weighted_trials
        )
        edge = 0.5 / (n + 1.0)  # a rate seen as 0 or 1 may still be one trial away
        fitted = max(fitted, self.weighted_trials * edge * (1.0 - edge))
        return _shrunk(spread / fitted, self.slices, n)

    def log_e_value(self, design_effect: float = 1.0) -> float:
        """log of the mixture's likelihood ratio, each log ratio divided by the design
        effect (at least 1)."""
        terms = [
            weight + ratio / design_effect
            for weight, ratio in zip(_LOG_WEIGHTS[self.side], self.log_ratios, strict=True)
        ]
        peak = max(terms)
        return peak + math.log(sum(math.exp(term - peak) for term in terms))

    def to_list(self) -> list[float]:
        return [
            *self.log_ratios,
            self.trials,
            self.events,
            self.residual,
            self.residual_squares,
            self.residual_trials,
            self.trial_squares,
            self.variance,
            self.variance_slope,
            self.weighted_trials,
            float(self.slices),
        ]

    @classmethod
    def from_list(cls, side: Side, values: Iterable[object]) -> EProcess:
        numbers = [float(value) for value in values]  # type: ignore[arg-type]
        grid = len(_SHIFTS[side])
        if len(numbers) != grid + 10:
            raise ValueError(f"a {side.value} e-process has {grid + 10} numbers")
        sums = numbers[grid:]
        return cls(
            side,
            tuple(numbers[:grid]),
            trials=sums[0],
            events=sums[1],
            residual=sums[2],
            residual_squares=sums[3],
            residual_trials=sums[4],
            trial_squares=sums[5],
            variance=sums[6],
            variance_slope=sums[7],
            weighted_trials=sums[8],
            slices=int(sums[9]),
        )


def proportion_design_effect(clusters: Iterable[tuple[float, float]]) -> float:
    """The design effect of a rate from per-cluster (trials, events): the cluster-robust
    variance of the rate over the binomial one. At least 1, at most the trials."""
    count = 0
    trials = events = events_squared = cross = trials_squared = 0.0
    for t, e in clusters:
        if t > 0:
            count += 1
            trials += t
            events += e
            events_squared += e * e
            cross += e * t
            trials_squared += t * t
    if trials <= 0:
        return 1.0
    if count < 2:
        return max(1.0, trials)
    rate = events / trials
    # Σ (e − rate·t)², expanded
    spread = max(0.0, events_squared - 2 * rate * cross + rate * rate * trials_squared)
    spread *= count / (count - 1)
    edge = 0.5 / (trials + 1.0)
    binomial = trials * max(rate * (1.0 - rate), edge * (1.0 - edge))
    return _shrunk(spread / binomial, count, trials)


def mean_design_effect(clusters: Iterable[tuple[float, float, float]]) -> float:
    """The design effect of a mean from per-cluster (count, Σ y, Σ y²): the
    cluster-robust variance of the mean over the independent one. At least 1, at most
    the count."""
    count = 0
    n = total = squares = total_squared = cross = n_squared = 0.0
    for size, y, yy in clusters:
        if size > 0:
            count += 1
            n += size
            total += y
            squares += yy
            total_squared += y * y
            cross += y * size
            n_squared += size * size
    if n <= 0:
        return 1.0
    if count < 2:
        return max(1.0, n)
    mean = total / n
    within = squares - n * mean * mean
    if within <= 1e-12 * n:
        return 1.0  # every value the same: nothing varies, within users or across
    spread = max(0.0, total_squared - 2 * mean * cross + mean * mean * n_squared)
    spread *= count / (count - 1)
    return _shrunk(spread / within, count, n)


def _shrunk(ratio: float, clusters: int, trials: float) -> float:
    """A design effect from a variance ratio over `clusters` clusters: from
    `_SHRINK_FROM` clusters on, the ratio less half its standard error (about
    ratio · sqrt(2 / (clusters − 1)), as for a chi-square), so that the noise of the
    estimate does not pass for overdispersion (under independence the ratio is 1 give or
    take that noise); with fewer clusters the ratio as it is, as a guard. At least 1, at
    most the trials (their evidence counting as one observation)."""
    if clusters >= _SHRINK_FROM:
        ratio *= 1.0 - 0.5 * math.sqrt(2.0 / (clusters - 1))
    return min(max(1.0, ratio), max(1.0, trials))


def z_score(confidence: float) -> float:
    """The one-sided normal quantile for `confidence` (0.95 → 1.645)."""
    return _NORMAL.inv_cdf(confidence)


def wilson_bounds(events: float, trials: float, confidence: float) -> tuple[float, float]:
    """One-sided Wilson score bounds for a proportion (each side at `confidence`)."""
    if trials <= 0:
        return 0.0, 1.0
    z = z_score(confidence)
    p = min(max(events / trials, 0.0), 1.0)
    z2 = z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


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
