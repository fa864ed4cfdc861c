"""The judge: the canary's numbers against stable's and the route's checks. Pure.

Evidence is gathered one *time slice* at a time (a judgement interval's stats of both
variants): `Evidence.added` turns each slice into the steps of one always-valid test per
limit and side (`proxy.judge.sequential.EProcess`), and `judge()` reads them into, per
check, pass / fail / inconclusive with the canary's value, stable's, the limit, both
sample sizes, the evidence and the window it comes from, and an overall verdict.

Rules:
1. A check fails when a failing test rejects "the canary is within this limit": an
   e-process over the whole rollout reaches 1 / α_i, where the limits share
   α = 1 − confidence (weighted Bonferroni: an absolute `max` a quarter share, a limit
   relative to stable a whole one). The chance that a canary within all its limits is
   ever failed, by any check at any look of its rollout, stays within 1 − confidence.
   Failing needs no minimum of requests: a canary far beyond a limit is failed as soon
   as a few users' requests show it.
2. A check passes when every one of its limits' passing tests rejects "the canary is at
   or beyond this limit": an e-process over the current step reaches 1 / (1 − confidence),
   with at least `min_requests` of the check's canary samples at this step. The chance
   that a canary beyond a limit ever passes a step is within 1 − confidence (to pass,
   the test of the very limit it breaches must reject). Every step earns its own pass.
3. Each slice is compared within itself: a rate `max_increase` against stable's rate in
   the same slice plus the increase; a quantile `max_ratio` against the ratio times
   stable's quantile in the same slice (from as many recent slices as it takes to hold
   enough stable samples); an absolute `max` against the limit; the ratio of mean
   output tokens per answer (`output_tokens_ratio`) as the share of the slice's tokens
   the canary's answers produced, against the share a canary at the limit would
   (`_observe_tokens`).
4. A shared incident: in a slice where stable itself is significantly beyond an
   absolute `max`, the canary's failing test for that limit compares it with stable
   instead (only a canary worse than stable then counts against it), and its passing
   test skips the slice. While the last slice is such a one and the canary is beyond the
   limit too, the verdict is "inconclusive: shared incident": the rollout holds.
5. Evidence is discounted by a design effect (`proxy.judge.sequential`): how much more
   the numbers vary across time slices and across user clusters than independent
   requests would, so that a burst or one heavy user cannot decide a rollout.
6. Cancelled requests count in the latency checks at the time they were cancelled at,
   and in `cancel_rate`; they are not trials of the error rate.
   `feedback_negative_rate` is negative ratings of all ratings the variant's answers
   got, counted in the slice the rating came in.
7. A time-to-first-token or time-per-token check on a route that streams nothing, and
   an output tokens check on a route whose answers report no tokens, passes once the
   canary has its requests: there is nothing to judge.
8. The overall verdict fails if any check fails, passes if every check passes (with at
   least `min_requests` canary requests at this step, checks or none), and is
   inconclusive otherwise.
9. In shadow (`Evidence.shadow`), the pairs are also judged on the shadow's own
   checks: `agreement` (the share of comparable pairs that disagree, at most 1 − `min`)
   and `output_length` (the share of pairs whose lengths do not match, at most
   `max_share`), as absolute ceilings on a rate; each pair counts as one. A check with
   no comparable pair passes as in rule 7.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from proxy.config.model import (
    QUANTILE_CHECKS,
    RATIO_CHECKS,
    AutoRollout,
    Checks,
    PairChecks,
    Variant,
)
from proxy.judge.histogram import LogHistogram
from proxy.judge.sequential import (
    EProcess,
    Side,
    above,
    mean_design_effect,
    proportion_design_effect,
    wilson_bounds,
)
from proxy.judge.stats import (
    USER_CANCELS,
    USER_ERRORS,
    USER_LOG_SQUARES,
    USER_LOG_SUM,
    USER_REQUESTS,
    VariantStats,
)

__all__ = [
    "CheckResult",
    "Evidence",
    "Incident",
    "Judgement",
    "Limit",
    "LimitKind",
    "Verdict",
    "judge",
    "limits_for",
    "limits_of",
    "pair_limits",
    "token_dispersion",
]

# A slice's stable reference for a quantile holds at least this many samples above the
# quantile (p95: 100 samples; p99: 500).
_REFERENCE_TAIL: Final = 5
_REFERENCE_KEEP: Final = 4  # a reference carried on is halved past this many times that
# The measures of shadow pairs (rule 9): rates of their pairs, with no stable of their own.
DISAGREE: Final = "disagreements"
LENGTH: Final = "length"
_PAIR_METRICS: Final = (DISAGREE, LENGTH)


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


class LimitKind(StrEnum):
    MAX = "max"  # an absolute ceiling
    MAX_INCREASE = "max_increase"  # a rate: at most stable's plus this
    MAX_RATIO = "max_ratio"  # a quantile: at most this times stable's


# Rule 1's split of α: an absolute ceiling takes a quarter of a relative limit's share.
# What breaches an absolute ceiling is most often a gross failure, whose evidence grows
# by whole nats per request; a regression against stable may be slight, where every
# nat of threshold costs minutes.
_ALPHA_WEIGHTS: Final = {
    LimitKind.MAX: 0.25,
    LimitKind.MAX_INCREASE: 1.0,
    LimitKind.MAX_RATIO: 1.0,
}


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit of one check: what one pair of tests (failing, passing) is about."""

    check: str  # error_rate | cancel_rate | latency_p95 | ...
    kind: LimitKind
    value: float  # a share, a duration in seconds, or a ratio
    metric: str  # errors | cancels | feedback | latency | ttft | tpot | tokens
    quantile: float | None = None  # for the checks of a quantile

    @property
    def key(self) -> str:
        """Its evidence's name; an edited limit starts its evidence afresh."""
        return f"{self.check}.{self.kind.value}={self.value!r}"

    @property
    def is_rate(self) -> bool:
        return self.quantile is None and self.metric != "tokens"

    @property
    def is_mean(self) -> bool:
        """A ratio of means (output tokens per answer), not a rate or a quantile."""
        return self.metric == "tokens"


@functools.lru_cache(maxsize=64)
def limits_of(checks: Checks) -> tuple[Limit, ...]:
    """Every limit the checks name, in the order the checks are listed."""
    limits: list[Limit] = []
    for name, rate in checks.rates():
        metric = _RATE_METRICS[name]
        if rate.max is not None:
            limits.append(Limit(name, LimitKind.MAX, rate.max, metric))
        if rate.max_increase is not None:
            limits.append(Limit(name, LimitKind.MAX_INCREASE, rate.max_increase, metric))
    for name, timing in checks.quantiles():
        metric, quantile = QUANTILE_CHECKS[name]
        if timing.max_s is not None:
            limits.append(Limit(name, LimitKind.MAX, timing.max_s, metric, quantile))
        if timing.max_ratio is not None:
            limits.append(Limit(name, LimitKind.MAX_RATIO, timing.max_ratio, metric, quantile))
    for name, ratio in checks.ratios():
        limits.append(Limit(name, LimitKind.MAX_RATIO, ratio.max, RATIO_CHECKS[name]))
    return tuple(limits)


_RATE_METRICS: Final = {
    "error_rate": "errors",
    "cancel_rate": "cancels",
    "feedback_negative_rate": "feedback",
}


@functools.lru_cache(maxsize=64)
def pair_limits(checks: PairChecks) -> tuple[Limit, ...]:
    """The limits of the checks only shadow pairs can tell (rule 9): a ceiling on the
    share of pairs that disagree, and on the share whose lengths do not match."""
    limits: list[Limit] = []
    if checks.agreement is not None:
        limits.append(Limit("agreement", LimitKind.MAX, 1.0 - checks.agreement.min, DISAGREE))
    if checks.output_length is not None:
        limits.append(Limit("output_length", LimitKind.MAX, checks.output_length.max_share, LENGTH))
    return tuple(limits)


def limits_for(auto: AutoRollout, shadow: bool) -> tuple[Limit, ...]:
    """Every limit judged: the checks', and in shadow the pair checks' too."""
    limits = limits_of(auto.checks)
    if shadow and auto.shadow is not None:
        return limits + pair_limits(auto.shadow.checks)
    return limits


@dataclass(frozen=True, slots=True)
class Incident:
    """Stable beyond an absolute limit in the last slice, and the canary with it."""

    check: str
    limit: float
    stable: float  # stable's share beyond the limit (a rate, or the share above a duration)
    canary: float | None  # the canary's, None when it had no requests in the slice

    def to_mapping(self) -> dict[str, object]:
        return {
            "check": self.check,
            "limit": self.limit,
            "stable": self.stable,
            "canary": self.canary,
        }

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> Incident:
        canary = data.get("canary")
        return cls(
            str(data["check"]),
            float(data["limit"]),  # type: ignore[arg-type]
            float(data["stable"]),  # type: ignore[arg-type]
            float(canary) if isinstance(canary, int | float) else None,
        )


Tests = Mapping[str, tuple[EProcess, EProcess]]  # limit key -> (failing, passing)


@dataclass(frozen=True, slots=True)
class Evidence:
    """What the judge has seen of a rollout: per variant its stats since it began and
    since its current step began; per limit its failing test (over the rollout) and its
    passing test (over the step); stable's recent reference per measured time; and the
    shared incidents of the last slice. Slices of the window stats up to `next_slice`
    are in.

    Evidence is a value: nothing it holds is changed once it holds it (`added` builds
    new stats and tests; `new_step` shares what carries over). Its size does not grow
    with the rollout's length: histograms have a bucket per 9% of duration, user sums a
    row per cluster, and each test a fixed handful of numbers.
    """

    rollout_canary: VariantStats = field(default_factory=VariantStats)
    rollout_stable: VariantStats = field(default_factory=VariantStats)
    step_canary: VariantStats = field(default_factory=VariantStats)
    step_stable: VariantStats = field(default_factory=VariantStats)
    next_slice: int = 0
    tests: Tests = field(default_factory=dict)
    references: Mapping[str, LogHistogram] = field(default_factory=dict)
    incidents: tuple[Incident, ...] = ()
    shadow: bool = False  # of shadow pairs: the shadow's pair checks are judged too (rule 9)

    @classmethod
    def fresh(cls, next_slice: int, *, shadow: bool = False) -> Evidence:
        return cls(next_slice=next_slice, shadow=shadow)

    def added(
        self,
        canary: VariantStats,
        stable: VariantStats,
        next_slice: int,
        auto: AutoRollout,
        *,
        reuse: bool = False,
    ) -> Evidence:
        """This evidence with one more time slice of both variants, tested against the
        limits of `auto`. New objects, unless `reuse`: then this evidence's stats are
        added to in place and shared with the result, for a caller that keeps nothing
        else of it (the simulator, which cannot afford a copy per interval)."""
        limits = limits_for(auto, self.shadow)
        references = _references(self.references, limits, stable)
        spread = (
            token_dispersion(self.rollout_canary, canary, self.rollout_stable, stable)
            if any(limit.is_mean for limit in limits)
            else 1.0
        )
        tests = dict(self.tests)
        incidents: list[Incident] = []
        for limit in limits:
            failing, passing = tests.get(limit.key) or (
                EProcess.start(Side.FAIL),
                EProcess.start(Side.PASS),
            )
            observed = _observe(limit, canary, stable, references, auto.confidence, spread)
            if observed is not None:
                increase = limit.value if limit.kind is LimitKind.MAX_INCREASE else None
                failing = failing.added(
                    observed.events, observed.trials, *observed.fail_null, increase
                )
                if observed.pass_null is not None:
                    passing = passing.added(
                        observed.events, observed.trials, *observed.pass_null, increase
                    )
                if observed.incident is not None:
                    incidents.append(observed.incident)
            tests[limit.key] = (failing, passing)
        windows = [self.rollout_canary, self.rollout_stable, self.step_canary, self.step_stable]
        if not reuse:
            windows = [_copy(window) for window in windows]
        for window, new, users in zip(
            windows, (canary, stable, canary, stable), (True, True, False, False), strict=True
        ):
            window.merge(new, users=users)
        rollout_canary, rollout_stable, step_canary, step_stable = windows
        return Evidence(
            rollout_canary,
            rollout_stable,
            step_canary,
            step_stable,
            next_slice,
            tests,
            references,
            tuple(incidents),
            self.shadow,
        )

    def new_step(self) -> Evidence:
        """The same rollout, with the step's window and passing tests started again."""
        return Evidence(
            self.rollout_canary,
            self.rollout_stable,
            next_slice=self.next_slice,
            tests={
                key: (failing, EProcess.start(Side.PASS))
                for key, (failing, _) in self.tests.items()
            },
            references=self.references,
            incidents=self.incidents,
            shadow=self.shadow,
        )

    def to_mapping(self) -> dict[str, object]:
        mapping: dict[str, object] = {
            "rollout_canary": self.rollout_canary.to_mapping(),
            "rollout_stable": self.rollout_stable.to_mapping(),
            "step_canary": self.step_canary.to_mapping(),
            "step_stable": self.step_stable.to_mapping(),
            "next_slice": self.next_slice,
            "tests": {
                key: {"fail": failing.to_list(), "pass": passing.to_list()}
                for key, (failing, passing) in self.tests.items()
            },
            "references": {name: ref.to_mapping() for name, ref in self.references.items()},
            "incidents": [incident.to_mapping() for incident in self.incidents],
        }
        if self.shadow:
            mapping["shadow"] = True
        return mapping

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> Evidence:
        """From `to_mapping`'s form; evidence stored before tests were kept loads with
        none (they start from the next slice)."""

        def stats(name: str) -> VariantStats:
            value = data[name]
            assert isinstance(value, Mapping)
            return VariantStats.from_mapping(value)

        next_slice = data["next_slice"]
        assert isinstance(next_slice, int)
        tests: dict[str, tuple[EProcess, EProcess]] = {}
        stored = data.get("tests", {})
        assert isinstance(stored, Mapping)
        for key, sides in stored.items():
            assert isinstance(sides, Mapping)
            failing, passing = sides["fail"], sides["pass"]
            assert isinstance(failing, list)
            assert isinstance(passing, list)
            tests[str(key)] = (
                EProcess.from_list(Side.FAIL, failing),
                EProcess.from_list(Side.PASS, passing),
            )
        references = data.get("references", {})
        assert isinstance(references, Mapping)
        incidents = data.get("incidents", [])
        assert isinstance(incidents, list)
        return cls(
            stats("rollout_canary"),
            stats("rollout_stable"),
            stats("step_canary"),
            stats("step_stable"),
            next_slice,
            tests,
            {str(name): LogHistogram.from_mapping(ref) for name, ref in references.items()},
            tuple(Incident.from_mapping(incident) for incident in incidents),
            data.get("shadow") is True,
        )


def _copy(stats: VariantStats) -> VariantStats:
    copy = VariantStats()
    copy.merge(stats)
    return copy


# --- one slice ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Observed:
    """What one slice says for one limit: the canary's events of its trials, and the
    null (rate, dispersion) of each side (None: the passing test skips this slice)."""

    events: float
    trials: float
    fail_null: tuple[float, float]
    pass_null: tuple[float, float] | None
    incident: Incident | None = None


def _rate_counts(stats: VariantStats, metric: str) -> tuple[float, float]:
    """(events, trials) of a rate: errors of the attempts that ended, cancels of all,
    or negative ratings of all ratings."""
    if metric == "errors":
        return float(stats.errors), float(stats.requests - stats.cancels)
    if metric == "feedback":
        return float(stats.feedback_negative), float(stats.feedback)
    if metric == DISAGREE:
        return float(stats.disagreements), float(stats.pairs)
    if metric == LENGTH:
        return float(stats.length_mismatches), float(stats.length_pairs)
    return float(stats.cancels), float(stats.requests)


def token_dispersion(*windows: VariantStats) -> float:
    """How much more answers' output token counts vary than Poisson counts would: the
    variance over the mean, of the variant that varies most (the windows are summed by
    variant in pairs: rollout canary, slice canary, rollout stable, slice stable). At
    least 1; a variant with fewer than two answers says nothing, and with neither saying
    anything each answer's tokens count as one observation (the mean)."""
    ratios: list[float] = []
    means: list[float] = []
    for before, now in zip(windows[::2], windows[1::2], strict=True):
        n = before.token_answers + now.token_answers
        total = before.output_tokens + now.output_tokens
        squares = before.token_squares + now.token_squares
        if n <= 0 or total <= 0:
            continue
        mean = total / n
        means.append(mean)
        if n >= 2:
            variance = max(0.0, squares - total * mean) / (n - 1)
            ratios.append(variance / mean)
    if ratios:
        return max(1.0, *ratios)
    return max(1.0, *means) if means else 1.0


def _histogram(stats: VariantStats, metric: str) -> LogHistogram:
    if metric == "latency":
        return stats.latency
    return stats.ttft if metric == "ttft" else stats.tpot


def _shares(
    limit: Limit, stats: VariantStats, references: Mapping[str, LogHistogram]
) -> tuple[float, float]:
    """(events, trials) of `stats` for `limit`: a rate's, or the samples above the limit's
    duration (for a ratio: above the ratio times stable's reference quantile)."""
    if limit.is_rate:
        return _rate_counts(stats, limit.metric)
    histogram = _histogram(stats, limit.metric)
    if limit.kind is LimitKind.MAX:
        threshold = limit.value
    else:
        assert limit.quantile is not None
        reference = references[limit.metric].quantile(limit.quantile)
        assert reference is not None
        threshold = limit.value * reference
    return above(histogram, threshold), float(histogram.count)


def _observe(
    limit: Limit,
    canary: VariantStats,
    stable: VariantStats,
    references: Mapping[str, LogHistogram],
    confidence: float,
    spread: float = 1.0,
) -> _Observed | None:
    if limit.is_mean:
        return _observe_tokens(limit, canary, stable, spread)
    if limit.kind is LimitKind.MAX_RATIO:
        reference = references.get(limit.metric)
        if reference is None or reference.count == 0:
            return None  # nothing of stable's to compare with yet
        events, trials = _shares(limit, canary, references)
        if trials <= 0:
            return None
        null = 1.0 - (limit.quantile or 0.0)
        # Stable's quantile is estimated from `reference.count` samples: at the null, its
        # noise adds that of a proportion of that many samples to the canary's.
        dispersion = 1.0 + trials / reference.count
        return _Observed(events, trials, (null, dispersion), (null, dispersion))
    events, trials = _shares(limit, canary, references)
    stable_events, stable_trials = _shares(limit, stable, references)
    if limit.kind is LimitKind.MAX_INCREASE:
        if stable_trials <= 0 or trials <= 0:
            return None
        stable_rate = stable_events / stable_trials
        null = min(stable_rate + limit.value, 1.0)
        smooth = (stable_events + 0.5) / (stable_trials + 1.0)
        spread = null * (1.0 - null)
        dispersion = 1.0 + (trials / stable_trials) * smooth * (1.0 - smooth) / max(spread, 1e-9)
        return _Observed(events, trials, (null, dispersion), (null, dispersion))
    # An absolute ceiling: on a share of rate, or of samples above a duration.
    ceiling = limit.value if limit.is_rate else 1.0 - (limit.quantile or 0.0)
    stable_beyond = (
        stable_trials > 0 and wilson_bounds(stable_events, stable_trials, confidence)[0] > ceiling
    )
    if not stable_beyond:
        if trials <= 0:
            return None
        return _Observed(events, trials, (ceiling, 1.0), (ceiling, 1.0))
    stable_rate = stable_events / stable_trials
    canary_rate = events / trials if trials > 0 else None
    incident = (
        Incident(limit.check, limit.value, stable_rate, canary_rate)
        if canary_rate is None or canary_rate > ceiling
        else None
    )
    if trials <= 0:
        return _Observed(0.0, 0.0, (stable_rate, 1.0), None, incident)
    # Rule 4: against stable in this slice, whose rate is an estimate (as for an increase).
    return _Observed(events, trials, (stable_rate, 1.0 + trials / stable_trials), None, incident)


def _observe_tokens(
    limit: Limit, canary: VariantStats, stable: VariantStats, spread: float
) -> _Observed | None:
    """A ratio of mean output tokens as a rate (the conditional test of two Poisson
    rates): of the slice's tokens of both variants, the share the canary's answers
    produced is, when its mean is `r` times stable's, r·n / (r·n + m) for n canary and m
    stable answers. Stable's own noise is inside that share, so nothing is estimated
    but how much more answers' lengths vary than Poisson counts (`spread`, each token's
    evidence divided by it)."""
    n, m = canary.token_answers, stable.token_answers
    events, other = float(canary.output_tokens), float(stable.output_tokens)
    if n <= 0 or m <= 0 or events + other <= 0:
        return None
    null = limit.value * n / (limit.value * n + m)
    return _Observed(events, events + other, (null, spread), (null, spread))


def _references(
    references: Mapping[str, LogHistogram], limits: Iterable[Limit], stable: VariantStats
) -> dict[str, LogHistogram]:
    """Stable's reference for each measured time a ratio compares with: this slice's
    histogram when it holds enough samples, else it added to the reference before."""
    result = dict(references)
    needed: dict[str, int] = {}
    for limit in limits:
        if limit.kind is LimitKind.MAX_RATIO and limit.quantile is not None:
            enough = math.ceil(_REFERENCE_TAIL / (1.0 - limit.quantile))
            needed[limit.metric] = max(needed.get(limit.metric, 0), enough)
    for metric, enough in needed.items():
        own = _histogram(stable, metric)
        if own.count >= enough:
            result[metric] = own
            continue
        carried = references.get(metric)
        if carried is not None and carried.count > _REFERENCE_KEEP * enough:
            carried = _halved(carried)
        result[metric] = LogHistogram.merged([carried, own] if carried is not None else [own])
    return result


def _halved(histogram: LogHistogram) -> LogHistogram:
    """Half of every bucket (rounded down): older samples weigh less as new ones come."""
    half = LogHistogram()
    half.buckets = {index: count // 2 for index, count in histogram.buckets.items() if count > 1}
    half.count = sum(half.buckets.values())
    half.sum = histogram.sum * (half.count / histogram.count) if histogram.count else 0.0
    return half


# --- the verdict --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LimitResult:
    """One limit's tests as the judge read them."""

    limit: Limit
    fail_e: float  # the failing test's e-value (exponentiated from its log, capped)
    fail_threshold: float  # what it must reach to fail the check
    pass_e: float
    design_effect: float

    def to_mapping(self) -> dict[str, object]:
        return {
            "limit": self.limit.kind.value,
            "value": self.limit.value,
            "fail_e": _rounded(self.fail_e),
            "fail_threshold": _rounded(self.fail_threshold),
            "pass_e": _rounded(self.pass_e),
            "design_effect": _rounded(self.design_effect),
        }


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check's verdict and the numbers behind it."""

    check: str  # error_rate | cancel_rate | latency_p95 | ...
    verdict: Verdict
    canary_value: float | None
    stable_value: float | None
    limit: float | None  # the tightest of the check's limits, as a value of the same kind
    canary_n: int
    stable_n: int
    reason: str
    window: str = "step"  # the window the figures come from: step | rollout
    limits: tuple[LimitResult, ...] = ()
    pass_threshold: float = 0.0  # what each limit's passing e-value must reach

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
            "pass_threshold": _rounded(self.pass_threshold),
            "limits": [result.to_mapping() for result in self.limits],
        }


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Verdict
    checks: tuple[CheckResult, ...]
    canary_n: int  # canary requests over the rollout so far
    stable_n: int
    reason: str
    incidents: tuple[Incident, ...] = ()  # the shared incidents the verdict holds for

    @property
    def shared_incident(self) -> bool:
        return bool(self.incidents) and self.verdict is Verdict.INCONCLUSIVE

    def to_mapping(self) -> dict[str, object]:
        return {
            "verdict": self.verdict.value,
            "canary_n": self.canary_n,
            "stable_n": self.stable_n,
            "reason": self.reason,
            "shared_incident": [incident.to_mapping() for incident in self.incidents],
            "checks": [check.to_mapping() for check in self.checks],
        }


def judge(evidence: Evidence, auto: AutoRollout) -> Judgement:
    """The verdict on a canary, from what has been seen of its rollout."""
    canary_n, stable_n = evidence.rollout_canary.requests, evidence.rollout_stable.requests
    limits = limits_for(auto, evidence.shadow)
    alpha = 1.0 - auto.confidence
    shares = {limit.key: _ALPHA_WEIGHTS[limit.kind] for limit in limits}
    total = sum(shares.values())
    # Rule 1: α is split between the limits (weighted Bonferroni); each gets its share.
    fail_log = {key: math.log(total / (weight * alpha)) for key, weight in shares.items()}
    pass_log = math.log(1.0 / alpha)
    users = _UserEffects(evidence)
    results: list[CheckResult] = []
    for check in _check_names(limits):
        mine = [limit for limit in limits if limit.check == check]
        results.append(_judge_check(check, mine, evidence, auto, users, fail_log, pass_log))
    verdicts = [result.verdict for result in results]
    step_n = evidence.step_canary.requests
    incidents = tuple(
        incident
        for incident in evidence.incidents
        if any(r.check == incident.check for r in results)
    )
    if Verdict.FAIL in verdicts:
        verdict = Verdict.FAIL
        reason = "; ".join(r.reason for r in results if r.verdict is Verdict.FAIL)
    elif incidents:
        verdict = Verdict.INCONCLUSIVE
        reason = "shared incident: " + "; ".join(_incident_text(i) for i in incidents)
    elif all(v is Verdict.PASS for v in verdicts) and step_n >= auto.min_requests:
        verdict = Verdict.PASS
        reason = (
            "; ".join(r.reason for r in results)
            if results
            else f"{step_n} canary requests at this step, and no checks"
        )
    elif step_n < auto.min_requests:
        verdict = Verdict.INCONCLUSIVE
        reason = f"too little data at this step: {step_n} of {auto.min_requests} canary requests"
    else:
        verdict = Verdict.INCONCLUSIVE
        reason = "; ".join(r.reason for r in results if r.verdict is Verdict.INCONCLUSIVE)
    return Judgement(
        verdict,
        tuple(results),
        canary_n,
        stable_n,
        reason,
        incidents if verdict is Verdict.INCONCLUSIVE else (),
    )


def _check_names(limits: Iterable[Limit]) -> list[str]:
    names: list[str] = []
    for limit in limits:
        if limit.check not in names:
            names.append(limit.check)
    return names


class _UserEffects:
    """The user-cluster design effect of each measure, per variant, read once."""

    def __init__(self, evidence: Evidence) -> None:
        self._stats = {
            Variant.CANARY: evidence.rollout_canary,
            Variant.STABLE: evidence.rollout_stable,
        }
        self._cache: dict[tuple[str, str], float] = {}

    def of(self, variant: Variant, metric: str) -> float:
        key = (variant, metric if metric in _UNTIMED else "times")
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = _user_effect(self._stats[variant], metric)
        return found

    def combined(self, metric: str, dispersion: float) -> float:
        """The canary's, with stable's in the share of the variance its estimate adds."""
        canary = self.of(Variant.CANARY, metric)
        if dispersion <= 1.0:
            return canary
        return (canary + (dispersion - 1.0) * self.of(Variant.STABLE, metric)) / dispersion


# Measures not of times, each with a user design effect of its own (or none).
_UNTIMED: Final = ("errors", "cancels", "feedback", "tokens", *_PAIR_METRICS)


def _user_effect(stats: VariantStats, metric: str) -> float:
    clusters = stats.users.values()
    if metric in ("feedback", "tokens"):
        # Ratings come after the answer, with its request id only, and tokens are not
        # in the user sums: neither is known per user cluster. Their design effect is
        # the time slices' alone (rule 5).
        return 1.0
    if metric in _PAIR_METRICS:
        return 1.0  # pairs keep no user sums: each pair counts as one
    if not stats.users:
        return 1.0  # no user sums (numbers recorded without them): requests as users
    if metric == "errors":
        return proportion_design_effect(
            (s[USER_REQUESTS] - s[USER_CANCELS], s[USER_ERRORS]) for s in clusters
        )
    if metric == "cancels":
        return proportion_design_effect((s[USER_REQUESTS], s[USER_CANCELS]) for s in clusters)
    # Times: how a user's latencies hang together (log scale) stands for all of them.
    return mean_design_effect(
        (s[USER_REQUESTS], s[USER_LOG_SUM], s[USER_LOG_SQUARES]) for s in clusters
    )


def _judge_check(
    check: str,
    limits: list[Limit],
    evidence: Evidence,
    auto: AutoRollout,
    users: _UserEffects,
    fail_log: Mapping[str, float],
    pass_log: float,
) -> CheckResult:
    read: list[LimitResult] = []
    failed: list[Limit] = []
    passed: list[bool] = []
    for limit in limits:
        failing, passing = evidence.tests.get(limit.key) or (
            EProcess.start(Side.FAIL),
            EProcess.start(Side.PASS),
        )
        fail_effect = max(failing.design_effect(), users.combined(limit.metric, failing.dispersion))
        pass_effect = max(passing.design_effect(), users.combined(limit.metric, passing.dispersion))
        fail_e = failing.log_e_value(fail_effect)
        pass_e = passing.log_e_value(pass_effect)
        threshold = fail_log[limit.key]
        read.append(LimitResult(limit, _exp(fail_e), _exp(threshold), _exp(pass_e), fail_effect))
        if fail_e >= threshold:
            failed.append(limit)
        passed.append(pass_e >= pass_log)
    outcome = _Outcome(check, limits[0], evidence, tuple(read), _exp(pass_log))
    if failed:
        return outcome.result(Verdict.FAIL, "rollout", [outcome.note(x, "beyond") for x in failed])
    first = limits[0]
    if _streams_nothing(first, evidence):
        nothing = "answers reporting tokens" if first.is_mean else "streamed requests"
        return outcome.nothing_streamed(auto.min_requests, f"no {nothing} to judge")
    if first.metric in _PAIR_METRICS and _samples(first, evidence.rollout_canary) == 0:
        return outcome.nothing_streamed(auto.min_requests, "no pairs it could compare")
    samples = _samples(first, evidence.step_canary)
    if samples < auto.min_requests:
        note = f"too little data at this step ({samples:g} of {auto.min_requests})"
        return outcome.result(Verdict.INCONCLUSIVE, "step", [note])
    if all(passed):
        return outcome.result(Verdict.PASS, "step", [outcome.note(x, "within") for x in limits])
    notes = [
        outcome.note(limit, "not yet clearly within")
        for limit, ok in zip(limits, passed, strict=True)
        if not ok
    ]
    return outcome.result(Verdict.INCONCLUSIVE, "step", notes)


def _streams_nothing(limit: Limit, evidence: Evidence) -> bool:
    """Rule 7: a check of streams' times on a route where neither variant streamed, or
    of output tokens where neither reported any."""
    if limit.is_mean:
        return evidence.rollout_canary.token_answers == 0 == evidence.rollout_stable.token_answers
    if limit.is_rate or limit.metric == "latency":
        return False
    return (
        _histogram(evidence.rollout_canary, limit.metric).count == 0
        and _histogram(evidence.rollout_stable, limit.metric).count == 0
    )


def _samples(limit: Limit, stats: VariantStats) -> float:
    """The canary samples a check is judged on: a rate's trials, a time's histogram,
    the answers that reported their tokens."""
    if limit.is_mean:
        return float(stats.token_answers)
    if limit.is_rate:
        return _rate_counts(stats, limit.metric)[1]
    return float(_histogram(stats, limit.metric).count)


@dataclass(frozen=True, slots=True)
class _Outcome:
    """Builds a check's result, with the figures of the window it comes from."""

    check: str
    first: Limit
    evidence: Evidence
    read: tuple[LimitResult, ...]
    pass_threshold: float

    def note(self, limit: Limit, word: str) -> str:
        """e.g. "beyond stable + 1.00% (evidence 52 >= 40)"."""
        found = next(r for r in self.read if r.limit is limit)
        if word == "beyond":
            evidence = f"evidence {_number(found.fail_e)} >= {_number(found.fail_threshold)}"
        elif word == "within":
            evidence = f"evidence {_number(found.pass_e)} >= {_number(self.pass_threshold)}"
        else:
            evidence = f"evidence {_number(found.pass_e)} of {_number(self.pass_threshold)}"
        if found.design_effect > 1.05:
            evidence += f", design effect {found.design_effect:.3g}"
        return f"{word} {_limit_words(limit)} ({evidence})"

    def result(self, verdict: Verdict, window: str, notes: list[str]) -> CheckResult:
        over = self.evidence.rollout_canary if window == "rollout" else self.evidence.step_canary
        base = self.evidence.rollout_stable if window == "rollout" else self.evidence.step_stable
        first = self.first
        canary_value, canary_n = _value(first, over)
        stable_value, stable_n = _value(first, base)
        limits = []
        for result in self.read:
            limit = result.limit
            if limit.kind is LimitKind.MAX:
                limits.append(limit.value)
            elif stable_value is not None and limit.kind is LimitKind.MAX_INCREASE:
                limits.append(stable_value + limit.value)
            elif stable_value is not None:
                limits.append(stable_value * limit.value)
        where = "over the rollout" if window == "rollout" else "at this step"
        show = _pct if first.is_rate else _tokens if first.is_mean else _seconds
        versus = (
            ""
            if first.metric in _PAIR_METRICS
            else f" vs stable {show(stable_value)} (n={stable_n})"
        )
        reason = (
            f"{_label(first)} {show(canary_value)} (n={canary_n}){versus} {where}: "
            f"{', '.join(notes)}"
        )
        return CheckResult(
            self.check,
            verdict,
            canary_value,
            stable_value,
            min(limits) if limits else None,
            canary_n,
            stable_n,
            reason,
            window,
            self.read,
            self.pass_threshold,
        )

    def nothing_streamed(self, min_requests: int, why: str) -> CheckResult:
        step_n = self.evidence.step_canary.requests
        verdict = Verdict.PASS if step_n >= min_requests else Verdict.INCONCLUSIVE
        note = f"{_label(self.first)}: {why}"
        if verdict is Verdict.INCONCLUSIVE:
            note += f" ({step_n} of {min_requests} canary requests at this step)"
        return CheckResult(
            self.check,
            verdict,
            None,
            None,
            None,
            step_n,
            0,
            note,
            "rollout",
            self.read,
            self.pass_threshold,
        )


def _value(limit: Limit, stats: VariantStats) -> tuple[float | None, int]:
    """A check's figure for one variant's window (a rate, the quantile, or the mean), and
    its n."""
    if limit.is_mean:
        return stats.output_tokens_per_request, stats.token_answers
    if limit.is_rate:
        events, trials = _rate_counts(stats, limit.metric)
        return (events / trials if trials > 0 else None), int(trials)
    histogram = _histogram(stats, limit.metric)
    assert limit.quantile is not None
    return histogram.quantile(limit.quantile), histogram.count


_METRIC_WORDS: Final = {
    "errors": "error rate",
    "cancels": "cancel rate",
    "feedback": "negative feedback rate",
    "tokens": "output tokens per answer",
    "latency": "latency",
    "ttft": "time to first token",
    "tpot": "time per output token",
    DISAGREE: "answer disagreement",
    LENGTH: "output length mismatch",
}


def _label(limit: Limit) -> str:
    if limit.quantile is None:
        return _METRIC_WORDS[limit.metric]
    return f"p{round(limit.quantile * 100)} {_METRIC_WORDS[limit.metric]}"


def _limit_words(limit: Limit) -> str:
    if limit.kind is LimitKind.MAX_INCREASE:
        return f"stable + {_pct(limit.value)}"
    if limit.kind is LimitKind.MAX_RATIO:
        return f"{limit.value:g}x stable"
    return f"the limit {_pct(limit.value) if limit.is_rate else _seconds(limit.value)}"


def _incident_text(incident: Incident) -> str:
    canary = "no requests" if incident.canary is None else _pct(incident.canary)
    what = incident.check.replace("_", " ")
    return (
        f"stable's {what} is beyond its limit as much as the canary's "
        f"(limit {incident.limit:g}: stable {_pct(incident.stable)}, canary {canary} "
        "in the last interval); holding"
    )


def _tokens(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _exp(log_value: float) -> float:
    return math.exp(min(log_value, 700.0))


def _rounded(value: float) -> float:
    return float(f"{value:.4g}")


def _number(value: float) -> str:
    return f"{value:.3g}" if value < 1e4 else f"{value:.2e}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"
