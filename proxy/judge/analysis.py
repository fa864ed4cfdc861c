"""The judge: the canary's numbers against stable's and the route's checks. Pure.

`judge()` compares the canary with stable over the same windows and returns, per
check, pass / fail / inconclusive with the canary's value, stable's, the limit, both
sample sizes and the window they come from, and an overall verdict. Its `Evidence`
holds two windows: since the rollout began, and since its current step began.

Rules:
1. Too little data is inconclusive, never a pass and never a failure: below
   `min_requests` canary requests, and wherever a test cannot yet tell.
2. A check fails only on a breach that is significant over the whole rollout so far:
   an always-valid sequential test (mSPRT, `proxy.judge.sequential`) rejects "the canary
   is within the limit" at α = (1 − confidence) / limits. Being always valid, it may
   be looked at every interval of the rollout; split over the limits, the chance
   that a canary as good as its limits is ever failed, by any check at any look,
   stays within 1 − confidence. Data gathered at every step counts, so a regression
   is caught sooner the longer it runs, and at the lowest weight that shows it.
3. A check passes when, over the current step, the canary is within each of its
   limits with the route's confidence (one-sided upper bound at or under the limit):
   every step must earn its own pass, at its own weight.
4. Latency and time to first token are judged at the 95th percentile through the
   share of requests above the limit ("p95 ≤ T" is "at most 5% above T"); against
   stable, T is `max_ratio` × stable's p95, taken at the end of its interval at the
   route's confidence that favours the canary when failing (the high end) and the
   other one when passing.
5. A time-to-first-token check on a route that streams nothing passes once the
   canary has its requests: there is nothing to judge.
6. The overall verdict fails if any check fails, passes if every check passes, and
   is inconclusive otherwise. With no checks, enough requests are a pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from proxy.config.model import AutoRollout, ErrorRateCheck, LatencyCheck
from proxy.judge.histogram import LogHistogram
from proxy.judge.sequential import (
    above,
    difference_bounds,
    log_mixture_ratio,
    log_mixture_ratio_difference,
    quantile_bounds,
    wilson_bounds,
)
from proxy.judge.stats import VariantStats

__all__ = ["CheckResult", "Evidence", "Judgement", "Verdict", "judge"]

QUANTILE: Final = 0.95
_EXCEEDANCE: Final = 1 - QUANTILE  # the share above the p95
_MIN_SCALE: Final = 0.005


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True, slots=True)
class Evidence:
    """What the judge has seen of a rollout, per variant: since it began, and since its
    current step began. Slices of the window stats up to `next_slice` are in.

    Evidence is a value: its stats are never changed once it holds them (`added`
    builds new ones; `new_step` shares the rollout window, which stays unchanged).
    """

    rollout_canary: VariantStats = field(default_factory=VariantStats)
    rollout_stable: VariantStats = field(default_factory=VariantStats)
    step_canary: VariantStats = field(default_factory=VariantStats)
    step_stable: VariantStats = field(default_factory=VariantStats)
    next_slice: int = 0

    @classmethod
    def fresh(cls, next_slice: int) -> Evidence:
        return cls(next_slice=next_slice)

    def added(self, canary: VariantStats, stable: VariantStats, next_slice: int) -> Evidence:
        """These windows with more data in (new objects: evidence is never changed)."""
        return Evidence(
            _sum(self.rollout_canary, canary),
            _sum(self.rollout_stable, stable),
            _sum(self.step_canary, canary),
            _sum(self.step_stable, stable),
            next_slice,
        )

    def new_step(self) -> Evidence:
        """The same rollout, with the step's window started again."""
        return Evidence(self.rollout_canary, self.rollout_stable, next_slice=self.next_slice)

    def to_mapping(self) -> dict[str, object]:
        return {
            "rollout_canary": self.rollout_canary.to_mapping(),
            "rollout_stable": self.rollout_stable.to_mapping(),
            "step_canary": self.step_canary.to_mapping(),
            "step_stable": self.step_stable.to_mapping(),
            "next_slice": self.next_slice,
        }

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> Evidence:
        def stats(name: str) -> VariantStats:
            value = data[name]
            assert isinstance(value, Mapping)
            return VariantStats.from_mapping(value)

        next_slice = data["next_slice"]
        assert isinstance(next_slice, int)
        return cls(
            stats("rollout_canary"),
            stats("rollout_stable"),
            stats("step_canary"),
            stats("step_stable"),
            next_slice,
        )


def _sum(a: VariantStats, b: VariantStats) -> VariantStats:
    total = VariantStats()
    total.merge(a)
    total.merge(b)
    return total


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
    window: str = "step"  # the window the figures come from: step | rollout

    def to_mapping(self) -> dict[str, object]:
        return {
            "check": self.check,
            "window": self.window,
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
    canary_n: int  # canary requests over the rollout so far
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


def judge(evidence: Evidence, auto: AutoRollout) -> Judgement:
    """The verdict on a canary, from what has been seen of its rollout."""
    canary_n, stable_n = evidence.rollout_canary.requests, evidence.rollout_stable.requests
    if canary_n < auto.min_requests:
        return Judgement(
            Verdict.INCONCLUSIVE,
            (),
            canary_n,
            stable_n,
            f"too little data: {canary_n} of {auto.min_requests} canary requests",
        )
    checks = auto.checks
    threshold = math.log(_limit_count(auto) / (1 - auto.confidence))
    results: list[CheckResult] = []
    if checks.error_rate is not None:
        results.append(_error_rate(evidence, checks.error_rate, auto, threshold))
    if checks.latency_p95 is not None:
        results.append(_quantile("latency_p95", evidence, checks.latency_p95, auto, threshold))
    if checks.ttft_p95 is not None:
        results.append(_quantile("ttft_p95", evidence, checks.ttft_p95, auto, threshold))
    verdict = _combine([result.verdict for result in results]) if results else Verdict.PASS
    if verdict is Verdict.PASS and evidence.step_canary.requests < auto.min_requests:
        verdict = Verdict.INCONCLUSIVE  # even with no checks, a step needs its requests
        reason = (
            f"too little data at this step: {evidence.step_canary.requests} of "
            f"{auto.min_requests} canary requests"
        )
    elif not results:
        reason = f"{evidence.step_canary.requests} canary requests at this step, and no checks"
    else:
        reason = "; ".join(r.reason for r in results if r.verdict is verdict)
    return Judgement(verdict, tuple(results), canary_n, stable_n, reason)


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


# --- error rate --------------------------------------------------------------------------


def _error_rate(
    evidence: Evidence, check: ErrorRateCheck, auto: AutoRollout, threshold: float
) -> CheckResult:
    # Failing: over the whole rollout.
    canary, stable = evidence.rollout_canary, evidence.rollout_stable
    failed: list[str] = []
    if check.max is not None:
        scale = max(check.max, _MIN_SCALE)
        if log_mixture_ratio(canary.errors, canary.requests, check.max, scale) >= threshold:
            failed.append(f"above the limit {_pct(check.max)}, significantly")
    if check.max_increase is not None and stable.requests >= auto.min_requests:
        increase = check.max_increase
        statistic = log_mixture_ratio_difference(
            canary.errors,
            canary.requests,
            stable.errors,
            stable.requests,
            increase,
            max(increase, _MIN_SCALE),
        )
        if statistic >= threshold:
            failed.append(f"more than {_pct(increase)} above stable, significantly")
    if failed:
        return _error_result(Verdict.FAIL, canary, stable, check, auto, failed, "rollout")
    # Passing: over this step.
    canary, stable = evidence.step_canary, evidence.step_stable
    if canary.requests < auto.min_requests:
        note = f"too little data at this step ({canary.requests} of {auto.min_requests})"
        return _error_result(Verdict.INCONCLUSIVE, canary, stable, check, auto, [note], "step")
    verdicts: list[Verdict] = []
    notes: list[str] = []
    if check.max is not None:
        within = wilson_bounds(canary.errors, canary.requests, auto.confidence)[1] <= check.max
        verdicts.append(Verdict.PASS if within else Verdict.INCONCLUSIVE)
        notes.append(f"{'within' if within else 'not yet clearly within'} {_pct(check.max)}")
    if check.max_increase is not None:
        increase = check.max_increase
        if stable.requests < auto.min_requests:
            verdicts.append(Verdict.INCONCLUSIVE)
            notes.append(f"too little stable data ({stable.requests}) to compare")
        else:
            upper = difference_bounds(
                canary.errors, canary.requests, stable.errors, stable.requests, auto.confidence
            )[1]
            within = upper <= increase
            verdicts.append(Verdict.PASS if within else Verdict.INCONCLUSIVE)
            word = "within" if within else "not yet clearly within"
            notes.append(f"{word} stable + {_pct(increase)}")
    verdict = _combine(verdicts)
    return _error_result(
        verdict, canary, stable, check, auto, _deciding(verdict, verdicts, notes), "step"
    )


def _error_result(
    verdict: Verdict,
    canary: VariantStats,
    stable: VariantStats,
    check: ErrorRateCheck,
    auto: AutoRollout,
    notes: list[str] | str,
    window: str,
) -> CheckResult:
    rate_c = canary.errors / canary.requests if canary.requests else None
    rate_s = stable.errors / stable.requests if stable.requests else None
    limits = [check.max] if check.max is not None else []
    # A limit relative to stable applies only once stable has its requests.
    compared = stable.requests >= auto.min_requests
    if check.max_increase is not None and rate_s is not None and compared:
        limits.append(rate_s + check.max_increase)
    text = notes if isinstance(notes, str) else ", ".join(notes)
    over = "over the rollout" if window == "rollout" else "at this step"
    reason = (
        f"error rate {_pct(rate_c)} (n={canary.requests}) vs stable {_pct(rate_s)} "
        f"(n={stable.requests}) {over}: {text}"
    )
    return CheckResult(
        "error_rate",
        verdict,
        rate_c,
        rate_s,
        min(limits) if limits else None,
        canary.requests,
        stable.requests,
        reason,
        window,
    )


# --- latency and time to first token -----------------------------------------------------


def _histograms(
    name: str, canary: VariantStats, stable: VariantStats
) -> tuple[LogHistogram, LogHistogram]:
    if name == "latency_p95":
        return canary.latency, stable.latency
    return canary.ttft, stable.ttft


def _quantile(
    name: str, evidence: Evidence, check: LatencyCheck, auto: AutoRollout, threshold: float
) -> CheckResult:
    label = "p95 latency" if name == "latency_p95" else "p95 time to first token"
    canary, stable = _histograms(name, evidence.rollout_canary, evidence.rollout_stable)
    if canary.count == 0 and stable.count == 0 and name == "ttft_p95":
        return CheckResult(
            name,
            Verdict.PASS,
            None,
            None,
            None,
            0,
            0,
            f"{label}: no streamed requests to judge",
            "rollout",
        )
    # Failing: over the whole rollout; stable's p95 at its high bound.
    failed: list[str] = []
    if canary.count >= auto.min_requests:
        if check.max_s is not None and _exceeds(canary, check.max_s, threshold):
            failed.append(f"above {check.max_s:.3g}s, significantly")
        if check.max_ratio is not None and stable.count >= auto.min_requests:
            high = quantile_bounds(stable, QUANTILE, auto.confidence)[1]
            if high is not None and _exceeds(canary, check.max_ratio * high, threshold):
                failed.append(f"above {check.max_ratio:g}× stable, significantly")
    if failed:
        return _quantile_result(
            name, label, Verdict.FAIL, canary, stable, check, auto, failed, "rollout"
        )
    # Passing: over this step; stable's p95 at its low bound.
    canary, stable = _histograms(name, evidence.step_canary, evidence.step_stable)
    if canary.count < auto.min_requests:
        note = f"too little data at this step ({canary.count} of {auto.min_requests})"
        return _quantile_result(
            name, label, Verdict.INCONCLUSIVE, canary, stable, check, auto, [note], "step"
        )
    verdicts: list[Verdict] = []
    notes: list[str] = []
    if check.max_s is not None:
        within = _within(canary, check.max_s, auto)
        verdicts.append(Verdict.PASS if within else Verdict.INCONCLUSIVE)
        notes.append(f"{'within' if within else 'not yet clearly within'} {check.max_s:.3g}s")
    if check.max_ratio is not None:
        low = quantile_bounds(stable, QUANTILE, auto.confidence)[0]
        if low is None or stable.count < auto.min_requests:
            verdicts.append(Verdict.INCONCLUSIVE)
            notes.append(f"too little stable data ({stable.count}) to compare")
        else:
            within = _within(canary, check.max_ratio * low, auto)
            verdicts.append(Verdict.PASS if within else Verdict.INCONCLUSIVE)
            word = "within" if within else "not yet clearly within"
            notes.append(f"{word} {check.max_ratio:g}× stable")
    verdict = _combine(verdicts)
    return _quantile_result(
        name,
        label,
        verdict,
        canary,
        stable,
        check,
        auto,
        _deciding(verdict, verdicts, notes),
        "step",
    )


def _exceeds(canary: LogHistogram, limit_s: float, threshold: float) -> bool:
    """Significantly more than 5% of the canary's values above `limit_s`?"""
    over = above(canary, limit_s)
    return log_mixture_ratio(over, canary.count, _EXCEEDANCE, _EXCEEDANCE) >= threshold


def _within(canary: LogHistogram, limit_s: float, auto: AutoRollout) -> bool:
    """Confidently at most 5% of the canary's values above `limit_s`?"""
    over = above(canary, limit_s)
    return wilson_bounds(over, canary.count, auto.confidence)[1] <= _EXCEEDANCE


def _quantile_result(
    name: str,
    label: str,
    verdict: Verdict,
    canary: LogHistogram,
    stable: LogHistogram,
    check: LatencyCheck,
    auto: AutoRollout,
    notes: list[str] | str,
    window: str,
) -> CheckResult:
    value_c, value_s = canary.quantile(QUANTILE), stable.quantile(QUANTILE)
    limits = [check.max_s] if check.max_s is not None else []
    compared = stable.count >= auto.min_requests
    if check.max_ratio is not None and value_s is not None and compared:
        limits.append(check.max_ratio * value_s)
    text = notes if isinstance(notes, str) else ", ".join(notes)
    over = "over the rollout" if window == "rollout" else "at this step"
    reason = (
        f"{label} {_seconds(value_c)} (n={canary.count}) vs stable {_seconds(value_s)} "
        f"(n={stable.count}) {over}: {text}"
    )
    return CheckResult(
        name,
        verdict,
        value_c,
        value_s,
        min(limits) if limits else None,
        canary.count,
        stable.count,
        reason,
        window,
    )


def _deciding(verdict: Verdict, verdicts: list[Verdict], notes: list[str]) -> str:
    """The notes of the limits that decided the check (all of them when it is undecided)."""
    if verdict is Verdict.INCONCLUSIVE:
        return ", ".join(notes)
    return ", ".join(note for v, note in zip(verdicts, notes, strict=True) if v is verdict)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"
