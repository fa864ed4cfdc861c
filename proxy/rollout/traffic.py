"""Synthetic LLM traffic for the simulator: users, their requests, and what each variant
answers them, one judgement interval at a time. Pure (numpy draws from a given seed).

A request has a user (sticky: the user's bucket decides the variant, as in production),
a time to first token (log-normal, median 0.2 s), a number of output tokens (log-normal,
median 200) and a time per output token (log-normal, median 4 ms): its latency is the
first token plus the tokens, about 1 s. A share of requests stream (only those have a
measured time to first token, and time per output token). Errors are Bernoulli draws.

The scenarios (`SCENARIOS`), each healthy or with a regression of the canary (its
error rate, its latency):

- **iid**: every request from a different user, rates constant in time.
- **heavy-users**: requests per user follow Zipf's law (exponent 1.1 over `users`
  users, the heaviest sending a tenth of all traffic); each user has an error
  propensity of their own (a bad prompt, a broken client: gamma-distributed around
  the rate, and one user in 500 failing 90% of the time) and a latency of their own
  (log-normal, σ 0.4), whichever variant answers them.
- **bursts**: each backend, stable's and the canary's alike, has bursts of errors on
  its own (two an hour on average, 60 s at 25% errors).
- **diurnal**: traffic, error rate and latency follow the time of day (±80%, ±80%,
  ±20% over 24 hours, from a random hour).
- **shared-incident**: the model servers' common dependency fails: both variants answer
  30% errors 2.5 times slower for 5 to 15 minutes, the first within the first 40
  minutes, then one every 90 minutes on average.
- **cancels**: users give up on a request after a patience of their own (log-normal,
  median 4 s): such a request ends cancelled, at that time.
- **step-change**: the traffic mix changes for good at a random time in the first
  hour: both variants' error rate 2.5 times and latency 1.3 times what it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from proxy.config.model import Variant
from proxy.judge.histogram import LogHistogram
from proxy.judge.stats import CLUSTERS, VariantStats

if TYPE_CHECKING:
    import numpy as np

__all__ = ["SCENARIOS", "Samples", "Scenario", "Slice", "World"]

SCENARIOS: Final = (
    "iid",
    "heavy-users",
    "bursts",
    "diurnal",
    "shared-incident",
    "cancels",
    "step-change",
)

TTFT_MEDIAN_S: Final = 0.2
TOKENS_MEDIAN: Final = 200.0
TPOT_MEDIAN_S: Final = 0.004
_TTFT_SIGMA: Final = 0.5
_TOKENS_SIGMA: Final = 0.7
_TPOT_SIGMA: Final = 0.3
_PER_DOUBLING: Final = 8
_FLOOR_S: Final = 1e-6
_DAY_S: Final = 86_400.0
_ZIPF: Final = 0.9
_BROKEN_SHARE: Final = 0.002
_BROKEN_RATE: Final = 0.9
_PROPENSITY_SHAPE: Final = 0.25  # gamma shape of users' error propensity (mean 1)
_USER_LATENCY_SIGMA: Final = 0.3
_BURSTS_PER_S: Final = 2 / 3600
_BURST_S: Final = 60.0
_BURST_RATE: Final = 0.25
_INCIDENT_EVERY_S: Final = 90 * 60.0
_INCIDENT_RATE: Final = 0.30
_INCIDENT_SLOWER: Final = 2.5
_PATIENCE_MEDIAN_S: Final = 4.0
_PATIENCE_SIGMA: Final = 0.5
_STEP_ERRORS: Final = 2.5
_STEP_SLOWER: Final = 1.3


# Requests' (errors, cancels, latency, ttft, tokens, streams), one element per request.
Drawn = tuple["np.ndarray", "np.ndarray", "np.ndarray", "np.ndarray", "np.ndarray", "np.ndarray"]


@dataclass(frozen=True, slots=True)
class Scenario:
    """The synthetic traffic of one simulation."""

    name: str = "iid"
    rps: float = 10.0
    stable_error_rate: float = 0.01
    canary_error_rate: float = 0.01  # its excess over stable's is added to every request
    canary_latency_ratio: float = 1.0  # canary latencies are stable's times this
    canary_ttft_ratio: float = 1.0  # and its time to first token, this again
    stream_share: float = 0.5
    duration_s: float = 4 * 3600.0
    users: int = 50_000  # heavy-users only: the other scenarios' users send one request


@dataclass(frozen=True, slots=True)
class Slice:
    """One interval's stats of both variants, and what was true during it."""

    canary: VariantStats
    stable: VariantStats
    error_rate: float  # stable's expected error rate (shared causes only: time of day, ...)
    slower: float  # how much slower than usual both variants' times were
    canary_parts: tuple[VariantStats, ...] = ()  # the interval cut in equal parts, if asked
    stable_parts: tuple[VariantStats, ...] = ()


class World:
    """One run's traffic: its users and events, drawn from `seed`, and each interval's
    requests drawn as the rollout goes."""

    def __init__(self, scenario: Scenario, seed: int, run: int) -> None:
        import numpy as np

        if scenario.name not in SCENARIOS:
            raise ValueError(f"no scenario {scenario.name!r} (scenarios: {', '.join(SCENARIOS)})")
        self.scenario = scenario
        self.rng = np.random.default_rng([seed, run])
        rng = self.rng
        name = scenario.name
        self._phase = rng.uniform(0, 2 * math.pi) if name == "diurnal" else 0.0
        self._bursts = {
            variant: _poisson_times(rng, _BURSTS_PER_S, scenario.duration_s)
            if name == "bursts"
            else np.zeros(0)
            for variant in ("canary", "stable")
        }
        self._incidents = _incidents(rng, scenario.duration_s) if name == "shared-incident" else []
        self._change_at = rng.uniform(300, 3600) if name == "step-change" else math.inf
        self._users: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        if name == "heavy-users":
            count = scenario.users
            shares = 1.0 / np.arange(1, count + 1) ** _ZIPF
            shares /= shares.sum()
            buckets = rng.integers(0, 10_000, size=count)
            propensity = rng.gamma(_PROPENSITY_SHAPE, 1 / _PROPENSITY_SHAPE, size=count)
            rates = np.minimum(scenario.stable_error_rate * propensity, 1.0)
            broken = rng.random(count) < _BROKEN_SHARE
            rates[broken] = _BROKEN_RATE
            slowness = rng.lognormal(0.0, _USER_LATENCY_SIGMA, size=count)
            self._users = (shares, buckets, rates, slowness)
            self.user_error_rate = float((shares * rates).sum())
        else:
            self.user_error_rate = scenario.stable_error_rate
        # The share of time a backend spends in a burst raises its mean error rate.
        self._burst_share = _BURSTS_PER_S * _BURST_S if name == "bursts" else 0.0

    # --- what is true at a time ---------------------------------------------------------

    def _day(self, t: float) -> float:
        return (
            math.sin(2 * math.pi * t / _DAY_S + self._phase)
            if self.scenario.name == ("diurnal")
            else 0.0
        )

    def traffic(self, t: float) -> float:
        return 1.0 + 0.8 * self._day(t)

    def incident(self, t: float) -> bool:
        return any(start <= t < end for start, end in self._incidents)

    def _shared(self, t: float) -> float:
        """How the time of day and a change of mix scale every user's error rate."""
        factor = 1.0 + 0.8 * self._day(t)
        return factor * _STEP_ERRORS if t >= self._change_at else factor

    def stable_rate(self, t: float) -> float:
        """Stable's expected error rate at `t`: its users' mean under the shared causes
        (time of day, a change of mix, an incident), with its bursts averaged in."""
        if self.incident(t):
            return _INCIDENT_RATE
        rate = min(self.user_error_rate * self._shared(t), 1.0)
        return rate + self._burst_share * max(_BURST_RATE - rate, 0.0)

    def slower(self, t: float) -> float:
        factor = 1.0 + 0.2 * self._day(t)
        if t >= self._change_at:
            factor *= _STEP_SLOWER
        if self.incident(t):
            factor *= _INCIDENT_SLOWER
        return factor

    # --- one interval ---------------------------------------------------------------------

    def interval(self, start: float, length: float, weight: float, parts: int = 0) -> Slice:
        """The requests of [start, start + length) at `weight` percent, as stats."""
        import numpy as np

        rng = self.rng
        scenario = self.scenario
        middle = start + length / 2
        expected = scenario.rps * length * self.traffic(middle)
        threshold = round(weight * 100)
        if self._users is not None:
            shares, buckets, rates, slowness = self._users
            counts = rng.poisson(expected * shares)
            who = np.repeat(np.arange(len(shares)), counts)
            request_buckets = buckets[who]
            user_rates = rates[who]
            user_slowness = slowness[who]
        else:
            total = int(rng.poisson(expected))
            request_buckets = rng.integers(0, 10_000, size=total)
            user_rates = np.full(total, scenario.stable_error_rate)
            user_slowness = np.ones(total)
        times = start + length * rng.random(len(request_buckets))
        canary = request_buckets < threshold
        incident = self.incident(middle)
        shared = self._shared(middle)
        slower = self.slower(middle)
        out: dict[str, tuple[VariantStats, tuple[VariantStats, ...]]] = {}
        for variant, chosen in (("canary", canary), ("stable", ~canary)):
            is_canary = variant == "canary"
            rate = (
                np.full(int(chosen.sum()), _INCIDENT_RATE)
                if incident
                else user_rates[chosen] * shared
            )
            if is_canary:
                rate = rate + (scenario.canary_error_rate - scenario.stable_error_rate)
            when = times[chosen]
            bursts = self._bursts[variant]
            if len(bursts):
                rate = np.where(
                    _within(when, bursts, _BURST_S), np.maximum(rate, _BURST_RATE), rate
                )
            ratio = scenario.canary_latency_ratio if is_canary else 1.0
            ttft_ratio = ratio * (scenario.canary_ttft_ratio if is_canary else 1.0)
            out[variant] = self._stats(
                np.clip(rate, 0.0, 1.0),
                user_slowness[chosen] * slower,
                ratio,
                ttft_ratio,
                request_buckets[chosen],
                (when - start) / length,
                parts,
            )
        return Slice(
            out["canary"][0],
            out["stable"][0],
            self.stable_rate(middle),
            slower,
            out["canary"][1],
            out["stable"][1],
        )

    def _stats(
        self,
        rates: np.ndarray,
        slowness: np.ndarray,
        ratio: float,
        ttft_ratio: float,
        buckets: np.ndarray,
        position: np.ndarray,
        parts: int,
    ) -> tuple[VariantStats, tuple[VariantStats, ...]]:
        import numpy as np

        drawn = self._draw(rates, slowness, ratio, ttft_ratio)
        whole = _aggregate(*drawn, buckets)
        if parts <= 0:
            return whole, ()
        part = np.minimum((position * parts).astype(int), parts - 1)
        errors, cancels, latency, ttft, tokens, streams = drawn
        return whole, tuple(
            _aggregate(
                errors[mask],
                cancels[mask],
                latency[mask],
                ttft[mask],
                tokens[mask],
                streams[mask],
                buckets[mask],
            )
            for mask in (part == k for k in range(parts))
        )

    def _draw(
        self, rates: np.ndarray, slowness: np.ndarray, ratio: float, ttft_ratio: float
    ) -> Drawn:
        """Requests' (errors, cancels, latency, ttft, tokens, streams)."""
        import numpy as np

        rng = self.rng
        n = len(rates)
        errors = rng.random(n) < rates
        ttft = TTFT_MEDIAN_S * ttft_ratio * slowness * rng.lognormal(0.0, _TTFT_SIGMA, n)
        tokens = np.maximum(1, np.rint(TOKENS_MEDIAN * rng.lognormal(0.0, _TOKENS_SIGMA, n)))
        tpot = TPOT_MEDIAN_S * ratio * slowness * rng.lognormal(0.0, _TPOT_SIGMA, n)
        latency = ttft + tokens * tpot
        streams = rng.random(n) < self.scenario.stream_share
        cancels = np.zeros(n, dtype=bool)
        if self.scenario.name == "cancels":
            patience = _PATIENCE_MEDIAN_S * rng.lognormal(0.0, _PATIENCE_SIGMA, n)
            cancels = (latency > patience) & ~errors
            latency = np.where(cancels, patience, latency)
        return errors, cancels, latency, ttft, tokens, streams

    def usual_error_rate(self) -> float:
        """Stable's error rate on an ordinary day, what a fixed threshold is set from."""
        rate = self.user_error_rate
        return rate + self._burst_share * max(_BURST_RATE - rate, 0.0)

    def base_samples(self, count: int = 100_000) -> Samples:
        """A large sample of each variant's requests as they are in ordinary times (no
        time of day, change of mix or incident): what the oracle knows to be true."""
        import numpy as np

        rng = np.random.default_rng([7, self.scenario.users, count])
        keep, self.rng = self.rng, rng
        try:
            if self._users is not None:
                shares, _, _, slowness = self._users
                who = rng.choice(len(shares), size=count, p=shares)
                user_slowness = slowness[who]
            else:
                user_slowness = np.ones(count)
            scenario = self.scenario
            zero = np.zeros(count)
            stable = self._draw(zero, user_slowness, 1.0, 1.0)
            if scenario.name == "cancels":  # users' patience does not scale with latency
                canary = self._draw(
                    zero,
                    user_slowness,
                    scenario.canary_latency_ratio,
                    scenario.canary_latency_ratio * scenario.canary_ttft_ratio,
                )
            else:  # the same requests, slower: shares above a limit are then exact
                errors, cancels, latency, ttft, tokens, streams = stable
                ratio = scenario.canary_latency_ratio
                canary = (
                    errors,
                    cancels,
                    latency * ratio,
                    ttft * ratio * scenario.canary_ttft_ratio,
                    tokens,
                    streams,
                )
        finally:
            self.rng = keep
        return Samples(_times(*stable), _times(*canary))


class Samples:
    """Each variant's sorted times (and cancel rate), for true shares and quantiles."""

    def __init__(
        self, stable: dict[str, np.ndarray | float], canary: dict[str, np.ndarray | float]
    ) -> None:
        self._of = {"stable": stable, "canary": canary}

    def share(self, variant: Variant, metric: str, threshold: float | None) -> float:
        """The share of a variant's requests above `threshold` (cancels: cancelled)."""
        import numpy as np

        values = self._of[variant][metric]
        if isinstance(values, float):
            return values
        assert threshold is not None
        if len(values) == 0:
            return 0.0
        return float(1.0 - np.searchsorted(values, threshold, side="right") / len(values))

    def quantile(self, variant: Variant, metric: str, q: float) -> float:
        import numpy as np

        values = self._of[variant][metric]
        assert not isinstance(values, float)
        return float(np.quantile(values, q)) if len(values) else 0.0


def _times(
    errors: np.ndarray,
    cancels: np.ndarray,
    latency: np.ndarray,
    ttft: np.ndarray,
    tokens: np.ndarray,
    streams: np.ndarray,
) -> dict[str, np.ndarray | float]:
    """The sorted times the checks read, as `_aggregate` would record them."""
    import numpy as np

    seen = streams & (~cancels | (ttft < latency))
    decoded = streams & ~cancels & (tokens > 1)
    return {
        "latency": np.sort(latency),
        "ttft": np.sort(ttft[seen]),
        "tpot": np.sort(np.maximum(latency - ttft, 0.0)[decoded] / (tokens[decoded] - 1)),
        "cancels": float(cancels.mean()) if len(cancels) else 0.0,
    }


def _aggregate(
    errors: np.ndarray,
    cancels: np.ndarray,
    latency: np.ndarray,
    ttft: np.ndarray,
    tokens: np.ndarray,
    streams: np.ndarray,
    buckets: np.ndarray,
) -> VariantStats:
    """The stats `VariantStats.record` would build from these requests, in bulk."""
    import numpy as np

    stats = VariantStats()
    n = len(errors)
    if n == 0:
        return stats
    stats.requests = n
    stats.errors = int(errors.sum())
    if stats.errors:
        stats.errors_by_type["500"] = stats.errors
    stats.cancels = int(cancels.sum())
    stats.latency = _histogram(latency)
    seen = streams & (
        ~cancels | (ttft < latency)
    )  # a cancelled stream may have had its first token
    stats.ttft = _histogram(ttft[seen])
    decoded = streams & ~cancels & (tokens > 1)
    stats.tpot = _histogram(np.maximum(latency - ttft, 0.0)[decoded] / (tokens[decoded] - 1))
    stats.output_tokens = int(tokens[~cancels].sum())
    clusters = buckets % CLUSTERS
    logs = np.log(np.maximum(latency, _FLOOR_S))
    sums = (
        np.bincount(clusters, minlength=CLUSTERS),
        np.bincount(clusters, weights=errors, minlength=CLUSTERS),
        np.bincount(clusters, weights=cancels, minlength=CLUSTERS),
        np.bincount(clusters, weights=logs, minlength=CLUSTERS),
        np.bincount(clusters, weights=logs * logs, minlength=CLUSTERS),
    )
    present = np.nonzero(sums[0])[0]
    columns = [column[present].tolist() for column in sums]
    stats.users = {
        cluster: [float(v) for v in row]
        for cluster, *row in zip(present.tolist(), *columns, strict=True)
    }
    return stats


def _histogram(values: np.ndarray) -> LogHistogram:
    import numpy as np

    histogram = LogHistogram()
    if len(values) == 0:
        return histogram
    floored = np.maximum(values, _FLOOR_S)
    indices = np.ceil(np.log2(floored) * _PER_DOUBLING).astype(np.int64) - 1
    low = int(indices.min())
    counts = np.bincount(indices - low)
    present = np.nonzero(counts)[0]
    histogram.buckets = dict(zip((present + low).tolist(), counts[present].tolist(), strict=True))
    histogram.count = len(values)
    histogram.sum = float(values.sum())
    return histogram


def _poisson_times(rng: np.random.Generator, rate: float, duration_s: float) -> np.ndarray:
    import numpy as np

    count = int(rng.poisson(rate * duration_s))
    return np.sort(rng.uniform(0, duration_s, size=count))


def _within(times: np.ndarray, starts: np.ndarray, length: float) -> np.ndarray:
    """Whether each time falls in one of the windows [start, start + length)."""
    import numpy as np

    index = np.searchsorted(starts, times, side="right") - 1
    valid = index >= 0
    result = np.zeros(len(times), dtype=bool)
    result[valid] = times[valid] < starts[index[valid]] + length
    return result


def _incidents(rng: np.random.Generator, duration_s: float) -> list[tuple[float, float]]:
    """The first within 40 minutes, then one every 90 minutes on average; 5 to 15 long."""
    incidents = []
    start = rng.uniform(600, 2400)
    while start < duration_s:
        end = start + rng.uniform(300, 900)
        incidents.append((start, end))
        start = end + rng.exponential(_INCIDENT_EVERY_S)
    return incidents
