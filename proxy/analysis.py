"""The judge: the canary's numbers against stable's and the route's checks. Pure.

`judge()` compares the canary with stable over the same window and returns, per
check, pass / fail / inconclusive with the canary's value, stable's, the limit and
both sample sizes, and an overall verdict.

Rules:
1. Too little data is inconclusive, never a pass and never a failure: below
   `min_requests` canary requests, and wherever a test cannot yet tell.
2. A check fails only on a breach that is significant: an always-valid sequential
   test (mSPRT, `proxy.sequential`) rejects "the canary is within the limit" at
   α = (1 − confidence) / (steps × limits). Spread over the steps of the rollout and
   the limits judged, the chance that a canary as good as its limits is ever failed,
   by any check at any look of the whole rollout, stays within 1 − confidence.
3. A check passes when the canary is within each of its limits with the route's
   confidence (one-sided upper bound at or under the limit).
4. Latency and time to first token are judged at the 95th percentile through the
   share of requests above the limit ("p95 ≤ T" is "at most 5% above T"); against
   stable, T is `max_ratio` × stable's p95, taken at the bound of its confidence
   interval that favours the canary when failing and the other one when passing.
5. A time-to-first-token check on a route that streams nothing passes once the
   canary has its requests: there is nothing to judge.
6. The overall verdict fails if any check fails, passes if every check passes, and
   is inconclusive otherwise. With no checks, enough requests are a pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from proxy.config.model import AutoRollout, ErrorRateCheck, LatencyCheck
from proxy.histogram import LogHistogram
from proxy.sequential import (
    above,
    difference_bounds,
    log_mixture_ratio,
    log_mixture_ratio_difference,
    quantile_bounds,
    wilson_bounds,
)
from proxy.stats import VariantStats

__all__ = ["CheckResult", "Judgement", "Verdict", "judge"]

QUANTILE: Final = 0.95
_EXCEEDANCE: Final = 1 - QUANTILE  # the share above the p95
_MIN_TAU: Final = 0.005


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check's verdict and the numbers behind it."""

    check: str  # error_rate | latency_p95 | ttft_p95
    verdict: Verdict
    canary_value: float | None
    stable_value: float | None
    limit: float | None  # the tightest of the check's limits, as a value of the same kind
    canary_n: int
    stable_n: int
    reason: str

    def to_mapping(self) -> dict[str, object]:
        return {
            "check": self.check,
            "verdict": self.verdict.value,
            "canary": self.canary_value,
            "stable": self.stable_value,
            "limit": self.limit,
            "canary_n": self.canary_n,
            "stable_n": self.stable_n,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Verdict
    checks: tuple[CheckResult, ...]
    canary_n: int
    stable_n: int
    reason: str

    def to_mapping(self) -> dict[str, object]:
        return {
            "verdict": self.verdict.value,
            "canary_n": self.canary_n,
            "stable_n": self.stable_n,
            "reason": self.reason,
            "checks": [check.to_mapping() for check in self.checks],
        }


def judge(canary: VariantStats, stable: VariantStats, auto: AutoRollout) -> Judgement:
    """The verdict on the canary over a window, against stable over the same window."""
    if canary.requests < auto.min_requests:
        return Judgement(
            Verdict.INCONCLUSIVE,
            (),
            canary.requests,
            stable.requests,
            f"too little data: {canary.requests} of {auto.min_requests} canary requests",
        )
    checks = auto.checks
    limits = _limit_count(auto)
    threshold = math.log(limits * len(auto.steps) / (1 - auto.confidence))
    results: list[CheckResult] = []
    if checks.error_rate is not None:
        results.append(_error_rate(canary, stable, checks.error_rate, auto, threshold))
    if checks.latency_p95 is not None:
        results.append(
            _quantile(
                "latency_p95", canary.latency, stable.latency, checks.latency_p95, auto, threshold
            )
        )
    if checks.ttft_p95 is not None:
        results.append(
            _quantile("ttft_p95", canary.ttft, stable.ttft, checks.ttft_p95, auto, threshold)
        )
    verdicts = {result.verdict for result in results}
    if Verdict.FAIL in verdicts:
        verdict = Verdict.FAIL
    elif verdicts <= {Verdict.PASS}:
        verdict = Verdict.PASS
    else:
        verdict = Verdict.INCONCLUSIVE
    if not results:
        reason = f"{canary.requests} canary requests and no checks"
    else:
        reason = "; ".join(r.reason for r in results if r.verdict is verdict) or "no check decided"
    return Judgement(verdict, tuple(results), canary.requests, stable.requests, reason)


def _limit_count(auto: AutoRollout) -> int:
    checks = auto.checks
    count = 0
    for check in (checks.error_rate, checks.latency_p95, checks.ttft_p95):
        if isinstance(check, ErrorRateCheck):
            count += (check.max is not None) + (check.max_increase is not None)
        elif isinstance(check, LatencyCheck):
            count += (check.max_s is not None) + (check.max_ratio is not None)
    return max(1, count)


def _combine(verdicts: list[Verdict]) -> Verdict:
    if Verdict.FAIL in verdicts:
        return Verdict.FAIL
    if all(v is Verdict.PASS for v in verdicts):
        return Verdict.PASS
    return Verdict.INCONCLUSIVE


def _error_rate(
    canary: VariantStats,
    stable: VariantStats,
    check: ErrorRateCheck,
    auto: AutoRollout,
    threshold: float,
) -> CheckResult:
    k_c, n_c, k_s, n_s = canary.errors, canary.requests, stable.errors, stable.requests
    rate_c = k_c / n_c
    rate_s = k_s / n_s if n_s else None
    verdicts: list[Verdict] = []
    notes: list[str] = []
    limits: list[float] = []
    if check.max is not None:
        limits.append(check.max)
        if log_mixture_ratio(k_c, n_c, check.max, max(check.max, _MIN_TAU)) >= threshold:
            verdicts.append(Verdict.FAIL)
            notes.append(f"above the limit {_pct(check.max)}, significantly")
        elif wilson_bounds(k_c, n_c, auto.confidence)[1] <= check.max:
            verdicts.append(Verdict.PASS)
            notes.append(f"within {_pct(check.max)}")
        else:
            verdicts.append(Verdict.INCONCLUSIVE)
            notes.append(f"not yet clearly within {_pct(check.max)}")
    if check.max_increase is not None:
        if rate_s is None or n_s < auto.min_requests:
            verdicts.append(Verdict.INCONCLUSIVE)
            notes.append(f"too little stable data ({n_s}) to compare")
        else:
            increase = check.max_increase
            limits.append(rate_s + increase)
            tau = max(increase, _MIN_TAU)
            if log_mixture_ratio_difference(k_c, n_c, k_s, n_s, increase, tau) >= threshold:
                verdicts.append(Verdict.FAIL)
                notes.append(f"more than {_pct(increase)} above stable, significantly")
            elif difference_bounds(k_c, n_c, k_s, n_s, auto.confidence)[1] <= increase:
                verdicts.append(Verdict.PASS)
                notes.append(f"within stable + {_pct(increase)}")
            else:
                verdicts.append(Verdict.INCONCLUSIVE)
                notes.append(f"not yet clearly within stable + {_pct(increase)}")
    verdict = _combine(verdicts)
    stable_text = _pct(rate_s) if rate_s is not None else "n/a"
    reason = f"error rate {_pct(rate_c)} (n={n_c}) vs stable {stable_text} (n={n_s}): " + ", ".join(
        notes
    )
    return CheckResult(
        "error_rate", verdict, rate_c, rate_s, min(limits) if limits else None, n_c, n_s, reason
    )


def _quantile(
    name: str,
    canary: LogHistogram,
    stable: LogHistogram,
    check: LatencyCheck,
    auto: AutoRollout,
    threshold: float,
) -> CheckResult:
    label = "p95 latency" if name == "latency_p95" else "p95 time to first token"
    n_c, n_s = canary.count, stable.count
    value_c, value_s = canary.quantile(QUANTILE), stable.quantile(QUANTILE)
    if n_c == 0 and n_s == 0 and name == "ttft_p95":
        return CheckResult(
            name, Verdict.PASS, None, None, None, 0, 0, f"{label}: no streamed requests to judge"
        )
    if n_c < auto.min_requests:
        return CheckResult(
            name,
            Verdict.INCONCLUSIVE,
            value_c,
            value_s,
            None,
            n_c,
            n_s,
            f"{label}: too little data ({n_c} of {auto.min_requests} canary samples)",
        )
    verdicts: list[Verdict] = []
    notes: list[str] = []
    limits: list[float] = []
    tau = _EXCEEDANCE
    if check.max_s is not None:
        limits.append(check.max_s)
        verdicts.append(_exceedance_verdict(canary, check.max_s, check.max_s, auto, threshold, tau))
        notes.append(_limit_note(verdicts[-1], f"{check.max_s:.3g}s"))
    if check.max_ratio is not None:
        # Stable's p95 bounds: the high one makes failing harder, the low one passing.
        alpha = math.exp(-threshold)
        high_s = quantile_bounds(stable, QUANTILE, 1 - alpha)[1]
        low_s = quantile_bounds(stable, QUANTILE, auto.confidence)[0]
        if high_s is None or low_s is None or value_s is None or n_s < auto.min_requests:
            verdicts.append(Verdict.INCONCLUSIVE)
            notes.append(f"too little stable data ({n_s}) to compare")
        else:
            ratio = check.max_ratio
            limits.append(ratio * value_s)
            verdicts.append(
                _exceedance_verdict(canary, ratio * high_s, ratio * low_s, auto, threshold, tau)
            )
            notes.append(_limit_note(verdicts[-1], f"{ratio:g}× stable"))
    verdict = _combine(verdicts)
    reason = (
        f"{label} {_seconds(value_c)} (n={n_c}) vs stable {_seconds(value_s)} (n={n_s}): "
        + _deciding(verdict, verdicts, notes)
    )
    return CheckResult(
        name, verdict, value_c, value_s, min(limits) if limits else None, n_c, n_s, reason
    )


def _exceedance_verdict(
    canary: LogHistogram,
    fail_threshold_s: float,
    pass_threshold_s: float,
    auto: AutoRollout,
    threshold: float,
    tau: float,
) -> Verdict:
    n = canary.count
    over_surely = above(canary, fail_threshold_s, surely=True)
    if log_mixture_ratio(over_surely, n, _EXCEEDANCE, tau) >= threshold:
        return Verdict.FAIL
    over_maybe = above(canary, pass_threshold_s, surely=False)
    if wilson_bounds(over_maybe, n, auto.confidence)[1] <= _EXCEEDANCE:
        return Verdict.PASS
    return Verdict.INCONCLUSIVE


def _deciding(verdict: Verdict, verdicts: list[Verdict], notes: list[str]) -> str:
    """The notes of the limits that decided the check (all of them when it is undecided)."""
    if verdict is Verdict.INCONCLUSIVE:
        return ", ".join(notes)
    return ", ".join(note for v, note in zip(verdicts, notes, strict=True) if v is verdict)


def _limit_note(verdict: Verdict, limit: str) -> str:
    if verdict is Verdict.FAIL:
        return f"above {limit}, significantly"
    if verdict is Verdict.PASS:
        return f"within {limit}"
    return f"not yet clearly within {limit}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"
