"""A comparison of every signal between a route's two variants, with confidence
intervals: what an A/B test ends in, and what an operator reads of a canary. Pure.

`compare()` takes the two variants' stats over one span (a rollout since it began, or
a recent window) and gives, per signal, each variant's figure with its interval and
the canary against stable: a difference for a rate, a ratio for a time or a mean.
`format_report()` prints the report's document as a table.

Rules:
1. The intervals are fixed-sample, two-sided, at `confidence`: right for one look at
   the end of a test (an A/B test's duration), too narrow for a figure watched until it
   looks good. The rollout judge's decisions are the anytime-valid ones.
2. Users are the unit where the stats allow it: a rate's sample (errors, cancels) and
   a time's are shrunk by the user-cluster design effect
   (`proxy.judge.sequential`) before an interval is read, so one heavy user does not
   narrow it. Feedback and tokens have no user sums: their samples are the ratings and
   the answers.
3. A rate: each variant's Wilson score interval; the difference canary − stable by
   Newcombe's hybrid score interval (method 10 of Newcombe 1998), good for rates near
   0 as errors are.
4. A quantile of a time: each variant's distribution-free interval, the quantiles at
   the ranks q ± z·sqrt(q(1 − q)/n) read from the histogram (9% buckets, so never
   narrower than a bucket); the ratio canary / stable with the two intervals' spreads
   combined on the log scale (delta method).
5. Output tokens per answer: each mean with its normal interval from the sums of
   squares; tokens per second, each a ratio estimator (tokens over answer time) with
   its linearised variance; both compared as ratios on the log scale.
6. A figure without data is None, and so is any comparison it is part of.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from proxy.judge.histogram import LogHistogram
from proxy.judge.sequential import (
    mean_design_effect,
    proportion_design_effect,
    wilson_bounds,
    z_score,
)
from proxy.judge.stats import (
    USER_CANCELS,
    USER_ERRORS,
    USER_LOG_SQUARES,
    USER_LOG_SUM,
    USER_REQUESTS,
    VariantStats,
)

__all__ = ["Estimate", "Signal", "compare", "format_report", "variant_summary"]

_QUANTILES: Final = ((0.5, "p50"), (0.95, "p95"), (0.99, "p99"))
_TIMES: Final = (
    ("latency", "latency"),
    ("ttft", "time to first token"),
    ("tpot", "time per token"),
)


@dataclass(frozen=True, slots=True)
class Estimate:
    """A figure with its interval, and the samples it comes from."""

    value: float | None
    low: float | None
    high: float | None
    n: int

    def to_mapping(self) -> dict[str, object]:
        return {"value": _r(self.value), "low": _r(self.low), "high": _r(self.high), "n": self.n}


_NONE: Final = Estimate(None, None, None, 0)


@dataclass(frozen=True, slots=True)
class Signal:
    """One signal of both variants, and the canary against stable."""

    name: str  # error_rate | latency_p95 | output_tokens_per_answer | ...
    label: str  # for people: "error rate", "p95 latency"
    unit: str  # share | seconds | tokens | tokens/s
    compare: str  # difference | ratio
    stable: Estimate
    canary: Estimate
    versus: Estimate  # canary − stable, or canary / stable

    def to_mapping(self) -> dict[str, object]:
        return {
            "signal": self.name,
            "label": self.label,
            "unit": self.unit,
            "compare": self.compare,
            "stable": self.stable.to_mapping(),
            "canary": self.canary.to_mapping(),
            self.compare: self.versus.to_mapping(),
        }


def variant_summary(stats: VariantStats) -> dict[str, object]:
    """Requests, the user clusters they came from, answers with tokens, and ratings."""
    return {
        "requests": stats.requests,
        "user_clusters": sum(1 for sums in stats.users.values() if sums[USER_REQUESTS] > 0),
        "token_answers": stats.token_answers,
        "feedback": stats.feedback,
    }


def compare(canary: VariantStats, stable: VariantStats, confidence: float) -> tuple[Signal, ...]:
    """Every signal of both variants, with intervals at `confidence` (two-sided)."""
    z = z_score(1.0 - (1.0 - confidence) / 2.0)
    signals = [
        _rate("error_rate", "error rate", canary, stable, z),
        _rate("cancel_rate", "cancel rate", canary, stable, z),
        _rate("feedback_negative_rate", "negative feedback rate", canary, stable, z),
    ]
    times = {id(v): _user_effect(v, "times") for v in (canary, stable)}
    for metric, words in _TIMES:
        for q, name in _QUANTILES:
            estimates = [
                _quantile(_histogram(v, metric), q, times[id(v)], z) for v in (canary, stable)
            ]
            signals.append(
                Signal(
                    f"{metric}_{name}",
                    f"{name} {words}",
                    "seconds",
                    "ratio",
                    estimates[1],
                    estimates[0],
                    _log_ratio(estimates[0], estimates[1], z),
                )
            )
    means = [_mean_tokens(v, z) for v in (canary, stable)]
    signals.append(
        Signal(
            "output_tokens_per_answer",
            "output tokens per answer",
            "tokens",
            "ratio",
            means[1][0],
            means[0][0],
            _ratio_of(means[0], means[1], z),
        )
    )
    speeds = [_tokens_per_s(v, z) for v in (canary, stable)]
    signals.append(
        Signal(
            "output_tokens_per_s",
            "output tokens per second",
            "tokens/s",
            "ratio",
            speeds[1][0],
            speeds[0][0],
            _ratio_of(speeds[0], speeds[1], z),
        )
    )
    return tuple(signals)


# --- rates (rules 2, 3) -------------------------------------------------------------------


def _counts(stats: VariantStats, name: str) -> tuple[float, float]:
    if name == "error_rate":
        return float(stats.errors), float(stats.requests - stats.cancels)
    if name == "cancel_rate":
        return float(stats.cancels), float(stats.requests)
    return float(stats.feedback_negative), float(stats.feedback)


def _rate(name: str, label: str, canary: VariantStats, stable: VariantStats, z: float) -> Signal:
    both = []
    for stats in (canary, stable):
        events, trials = _counts(stats, name)
        effect = _user_effect(stats, name)
        both.append(_wilson(events, trials, effect, z))
    return Signal(name, label, "share", "difference", both[1], both[0], _newcombe(*both))


def _wilson(events: float, trials: float, effect: float, z: float) -> Estimate:
    if trials <= 0:
        return _NONE
    rate = events / trials
    # The design effect shrinks the sample to what it is worth in independent trials.
    low, high = wilson_bounds(events / effect, trials / effect, _one_sided(z))
    return Estimate(rate, min(low, rate), max(high, rate), int(trials))


def _newcombe(canary: Estimate, stable: Estimate) -> Estimate:
    if canary.value is None or stable.value is None:
        return _NONE
    assert canary.low is not None
    assert canary.high is not None
    assert stable.low is not None
    assert stable.high is not None
    difference = canary.value - stable.value
    below = math.hypot(canary.value - canary.low, stable.high - stable.value)
    above = math.hypot(canary.high - canary.value, stable.value - stable.low)
    return Estimate(difference, difference - below, difference + above, min(canary.n, stable.n))


def _user_effect(stats: VariantStats, what: str) -> float:
    clusters = stats.users.values()
    if not stats.users or what == "feedback_negative_rate":
        return 1.0
    if what == "error_rate":
        return proportion_design_effect(
            (s[USER_REQUESTS] - s[USER_CANCELS], s[USER_ERRORS]) for s in clusters
        )
    if what == "cancel_rate":
        return proportion_design_effect((s[USER_REQUESTS], s[USER_CANCELS]) for s in clusters)
    return mean_design_effect(
        (s[USER_REQUESTS], s[USER_LOG_SUM], s[USER_LOG_SQUARES]) for s in clusters
    )


# --- quantiles (rule 4) -------------------------------------------------------------------


def _histogram(stats: VariantStats, metric: str) -> LogHistogram:
    if metric == "latency":
        return stats.latency
    return stats.ttft if metric == "ttft" else stats.tpot


def _quantile(histogram: LogHistogram, q: float, effect: float, z: float) -> Estimate:
    value = histogram.quantile(q)
    if value is None:
        return _NONE
    # The same design effect shrinks the sample; the bucket the quantile is in bounds the
    # interval from inside (a quantile is read to 9%).
    spread = z * math.sqrt(q * (1.0 - q) * effect / histogram.count)
    low = histogram.quantile(max(q - spread, 0.0))
    high = histogram.quantile(min(q + spread, 1.0))
    assert low is not None
    assert high is not None
    edge = 2.0 ** (1.0 / 16.0)  # half a bucket either way
    return Estimate(value, min(low, value / edge), max(high, value * edge), histogram.count)


def _log_ratio(canary: Estimate, stable: Estimate, z: float) -> Estimate:
    """canary / stable, each interval's spread read as a standard error on the log scale."""
    if canary.value is None or stable.value is None or canary.value <= 0 or stable.value <= 0:
        return _NONE
    errors = [_log_error(e, z) for e in (canary, stable)]
    return _log_interval(canary.value / stable.value, math.hypot(*errors), z, canary, stable)


def _log_error(estimate: Estimate, z: float) -> float:
    """An interval's half width on the log scale over z: a standard error of the log."""
    low, high = estimate.low, estimate.high
    if low is None or high is None or low <= 0:
        return math.inf
    return (math.log(high) - math.log(low)) / (2.0 * z)


def _log_interval(
    ratio: float, error: float, z: float, canary: Estimate, stable: Estimate
) -> Estimate:
    n = min(canary.n, stable.n)
    if not math.isfinite(error):
        return Estimate(ratio, None, None, n)
    return Estimate(ratio, ratio * math.exp(-z * error), ratio * math.exp(z * error), n)


# --- tokens (rule 5) ----------------------------------------------------------------------

Mean = tuple[Estimate, float]  # the estimate, and the standard error of its log


def _mean_tokens(stats: VariantStats, z: float) -> Mean:
    n = stats.token_answers
    if n <= 0:
        return _NONE, math.inf
    mean = stats.output_tokens / n
    if n < 2 or mean <= 0:
        return Estimate(mean, None, None, n), math.inf
    variance = max(0.0, stats.token_squares - stats.output_tokens * mean) / (n - 1)
    error = math.sqrt(variance / n)
    low, high = max(0.0, mean - z * error), mean + z * error
    return Estimate(mean, low, high, n), error / mean


def _tokens_per_s(stats: VariantStats, z: float) -> Mean:
    n, seconds = stats.token_answers, stats.token_seconds
    if n <= 0 or seconds <= 0:
        return _NONE, math.inf
    ratio = stats.output_tokens / seconds
    if n < 2 or ratio <= 0:
        return Estimate(ratio, None, None, n), math.inf
    # Σ (tokens − ratio · seconds)², the ratio estimator's residuals, expanded.
    residuals = max(
        0.0,
        stats.token_squares
        - 2.0 * ratio * stats.token_cross
        + ratio * ratio * stats.token_seconds_squares,
    )
    mean_seconds = seconds / n
    error = math.sqrt(residuals / (n - 1) / n) / mean_seconds
    return Estimate(ratio, max(0.0, ratio - z * error), ratio + z * error, n), error / ratio


def _ratio_of(canary: Mean, stable: Mean, z: float) -> Estimate:
    (c, c_error), (s, s_error) = canary, stable
    if c.value is None or s.value is None or c.value <= 0 or s.value <= 0:
        return _NONE
    return _log_interval(c.value / s.value, math.hypot(c_error, s_error), z, c, s)


# --- text ---------------------------------------------------------------------------------


def format_report(document: Mapping[str, object]) -> str:
    """The report document (GET /api/routes/{name}/report) as a table."""
    lines = [str(document.get("headline", ""))]
    variants = document["variants"]
    assert isinstance(variants, Mapping)
    stable, canary = variants["stable"], variants["canary"]
    assert isinstance(stable, Mapping)
    assert isinstance(canary, Mapping)
    rows: list[Sequence[str]] = [("", "stable", "canary", "canary vs stable")]
    rows.append(
        (
            "requests (user clusters)",
            f"{stable['requests']} ({stable['user_clusters']})",
            f"{canary['requests']} ({canary['user_clusters']})",
            "",
        )
    )
    signals = document["signals"]
    assert isinstance(signals, list)
    for signal in signals:
        assert isinstance(signal, Mapping)
        unit, how = str(signal["unit"]), str(signal["compare"])
        rows.append(
            (
                str(signal["label"]),
                _shown(signal["stable"], unit),
                _shown(signal["canary"], unit),
                _shown(signal[how], "difference" if how == "difference" else "ratio"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
        lines.append("  ".join([*cells, row[3]]).rstrip())
    note = document.get("intervals")
    if note:
        lines.append("")
        lines.append(str(note))
    return "\n".join(lines)


def _shown(estimate: object, unit: str) -> str:
    assert isinstance(estimate, Mapping)
    value, low, high, n = estimate["value"], estimate["low"], estimate["high"], estimate["n"]
    if value is None:
        return "-"
    assert isinstance(value, float | int)
    text = _number(float(value), unit)
    if low is not None and high is not None:
        assert isinstance(low, float | int)
        assert isinstance(high, float | int)
        text += f" [{_number(float(low), unit)}, {_number(float(high), unit)}]"
    if unit not in ("difference", "ratio"):
        text += f" n={n}"
    return text


def _number(value: float, unit: str) -> str:
    if unit == "share":
        return f"{100 * value:.2f}%"
    if unit == "difference":
        return f"{100 * value:+.2f}pp"
    if unit == "ratio":
        return f"x{value:.3f}"
    if unit == "seconds":
        return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"
    return f"{value:.1f}"


def _one_sided(z: float) -> float:
    """The one-sided confidence whose normal quantile is `z` (a two-sided interval's
    bounds are each one-sided bounds at that confidence)."""
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _r(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.6g}")
