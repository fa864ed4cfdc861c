"""proxy.analysis.judge: per-check verdicts with their numbers, and the overall verdict."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from proxy.analysis import Judgement, Verdict, judge
from proxy.config.model import AutoRollout, Checks, ErrorRateCheck, LatencyCheck
from proxy.stats import VariantStats

STEPS = (1.0, 5.0, 10.0, 25.0, 50.0, 100.0)

Values = Callable[[int, int], float]


def fixed(value_s: float) -> Values:
    return lambda i, n: value_s


def spread(base_s: float) -> Values:
    """Evenly from base to 2 × base: the p95 is about 1.95 × base."""
    return lambda i, n: base_s * (1 + i / n)


def stats(
    requests: int,
    errors: int = 0,
    latency: Values | None = None,
    ttft: Values | None = None,
) -> VariantStats:
    """A variant's stats from recorded requests: the first `errors` of them failed."""
    latency = latency or fixed(0.1)
    result = VariantStats()
    for i in range(requests):
        result.record(
            latency(i, requests),
            ttft(i, requests) if ttft is not None else None,
            "http_500" if i < errors else None,
            None,
        )
    return result


def auto(
    error_rate: ErrorRateCheck | None = None,
    latency_p95: LatencyCheck | None = None,
    ttft_p95: LatencyCheck | None = None,
    min_requests: int = 100,
) -> AutoRollout:
    return AutoRollout(
        steps=STEPS,
        min_requests=min_requests,
        checks=Checks(error_rate=error_rate, latency_p95=latency_p95, ttft_p95=ttft_p95),
    )


ERROR_RATE = ErrorRateCheck(max=0.05, max_increase=0.01)


def only(judgement: Judgement) -> tuple[Verdict, str]:
    (check,) = judgement.checks
    return check.verdict, check.reason


# --- too little data, and no checks -----------------------------------------------------


@pytest.mark.parametrize(
    "policy",
    [auto(), auto(error_rate=ERROR_RATE), auto(latency_p95=LatencyCheck(max_s=1.0))],
    ids=["no-checks", "error-rate", "latency"],
)
def test_judge_is_inconclusive_below_min_requests(policy: AutoRollout) -> None:
    # Even a canary failing every request is not judged before it has its requests.
    judgement = judge(stats(99, errors=99), stats(1000), policy)
    assert judgement.verdict is Verdict.INCONCLUSIVE
    assert judgement.checks == ()
    assert (judgement.canary_n, judgement.stable_n) == (99, 1000)
    assert judgement.reason == "too little data: 99 of 100 canary requests"


@pytest.mark.parametrize(
    ("requests", "verdict"),
    [(0, Verdict.INCONCLUSIVE), (99, Verdict.INCONCLUSIVE), (100, Verdict.PASS)],
)
def test_judge_without_checks_passes_once_min_requests_is_reached(
    requests: int, verdict: Verdict
) -> None:
    judgement = judge(stats(requests), stats(0), auto())
    assert judgement.verdict is verdict
    assert judgement.checks == ()
    if verdict is Verdict.PASS:
        assert judgement.reason == "100 canary requests and no checks"


# --- error rate -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("canary", "stable", "check", "verdict"),
    [
        # 30% against 1%: significantly above both limits.
        ((300, 90), (300, 3), ERROR_RATE, Verdict.FAIL),
        # 0.2% on both sides, n=1000: clearly within both limits.
        ((1000, 2), (1000, 2), ERROR_RATE, Verdict.PASS),
        # 6% against a 5% ceiling with 100 requests: cannot tell yet.
        ((100, 6), (100, 6), ERROR_RATE, Verdict.INCONCLUSIVE),
        # No errors at all, but 200 requests cannot bound the increase under 1%.
        ((200, 0), (200, 0), ERROR_RATE, Verdict.INCONCLUSIVE),
        # 10% against an absolute 5%, n=400.
        ((400, 40), (0, 0), ErrorRateCheck(max=0.05), Verdict.FAIL),
        ((400, 4), (0, 0), ErrorRateCheck(max=0.05), Verdict.PASS),
        # 8% against stable's 2% with at most +1%, n=1000 each.
        ((1000, 80), (1000, 20), ErrorRateCheck(max_increase=0.01), Verdict.FAIL),
    ],
)
def test_error_rate_verdicts(
    canary: tuple[int, int], stable: tuple[int, int], check: ErrorRateCheck, verdict: Verdict
) -> None:
    judgement = judge(stats(*canary), stats(*stable), auto(error_rate=check))
    assert judgement.verdict is verdict
    assert only(judgement)[0] is verdict


def test_error_rate_failure_carries_its_numbers() -> None:
    judgement = judge(stats(300, 90), stats(300, 3), auto(error_rate=ERROR_RATE))
    assert judgement.verdict is Verdict.FAIL
    (check,) = judgement.checks
    assert check.check == "error_rate"
    assert check.verdict is Verdict.FAIL
    assert check.canary_value == pytest.approx(0.30)
    assert check.stable_value == pytest.approx(0.01)
    assert check.limit == pytest.approx(0.02)  # the tighter of 5% and stable + 1%
    assert (check.canary_n, check.stable_n) == (300, 300)
    assert check.reason == (
        "error rate 30.00% (n=300) vs stable 1.00% (n=300): "
        "above the limit 5.00%, significantly, more than 1.00% above stable, significantly"
    )
    assert judgement.reason == check.reason
    assert (judgement.canary_n, judgement.stable_n) == (300, 300)
    assert check.to_mapping() == {
        "check": "error_rate",
        "verdict": "fail",
        "canary": check.canary_value,
        "stable": check.stable_value,
        "limit": check.limit,
        "canary_n": 300,
        "stable_n": 300,
        "reason": check.reason,
    }


@pytest.mark.parametrize("stable_requests", [0, 50, 99])
def test_error_rate_increase_is_inconclusive_while_stable_is_too_small(
    stable_requests: int,
) -> None:
    # Even a clearly bad canary is not failed on an increase over too little stable data.
    judgement = judge(
        stats(300, 90), stats(stable_requests), auto(error_rate=ErrorRateCheck(max_increase=0.01))
    )
    assert judgement.verdict is Verdict.INCONCLUSIVE
    (check,) = judgement.checks
    assert check.limit is None
    assert check.stable_n == stable_requests
    assert f"too little stable data ({stable_requests}) to compare" in check.reason
    if stable_requests == 0:
        assert check.stable_value is None
        assert "vs stable n/a (n=0)" in check.reason


def test_error_rate_fails_at_most_one_minus_confidence_for_a_canary_at_its_limit() -> None:
    # A canary exactly at its ceiling, judged at every look of a long rollout: SPEC §6,
    # the false-failure rate over all looks stays within 1 − confidence.
    policy = auto(error_rate=ErrorRateCheck(max=0.05))
    rng = random.Random(11)
    sequences, looks, batch = 400, 20, 100
    failed = 0
    for _ in range(sequences):
        canary = VariantStats()
        for _ in range(looks):
            canary.requests += batch
            canary.errors += sum(rng.random() < 0.05 for _ in range(batch))
            if judge(canary, VariantStats(), policy).verdict is Verdict.FAIL:
                failed += 1
                break
    assert failed / sequences <= 1 - policy.confidence


# --- latency and time to first token ----------------------------------------------------


@pytest.mark.parametrize(
    ("canary", "stable", "check", "verdict"),
    [
        # Canary about twice as slow at p95 as stable, at most 1.25×.
        (spread(2.0), spread(1.0), LatencyCheck(max_ratio=1.25), Verdict.FAIL),
        (spread(1.0), spread(1.0), LatencyCheck(max_ratio=1.25), Verdict.PASS),
        # Absolute ceiling of 2 s.
        (fixed(3.0), spread(1.0), LatencyCheck(max_s=2.0), Verdict.FAIL),
        (spread(0.5), spread(1.0), LatencyCheck(max_s=2.0), Verdict.PASS),
        # p95 right at the ceiling: neither clearly above nor clearly within.
        (spread(1.03), spread(1.0), LatencyCheck(max_s=2.0), Verdict.INCONCLUSIVE),
    ],
)
def test_latency_verdicts(
    canary: Values, stable: Values, check: LatencyCheck, verdict: Verdict
) -> None:
    judgement = judge(
        stats(500, latency=canary), stats(500, latency=stable), auto(latency_p95=check)
    )
    assert judgement.verdict is verdict
    result = judgement.checks[0]
    assert result.check == "latency_p95"
    assert result.verdict is verdict
    assert (result.canary_n, result.stable_n) == (500, 500)


def test_latency_regression_carries_its_numbers() -> None:
    canary, stable = stats(500, latency=spread(2.0)), stats(500, latency=spread(1.0))
    judgement = judge(canary, stable, auto(latency_p95=LatencyCheck(max_ratio=1.25)))
    (check,) = judgement.checks
    assert check.verdict is Verdict.FAIL
    assert check.canary_value == pytest.approx(canary.latency.quantile(0.95))
    assert check.stable_value == pytest.approx(stable.latency.quantile(0.95))
    assert check.canary_value == pytest.approx(3.9, rel=0.05)
    assert check.stable_value == pytest.approx(1.95, rel=0.05)
    assert check.stable_value is not None
    assert check.limit == pytest.approx(1.25 * check.stable_value)
    assert check.reason == (
        "p95 latency 3.90s (n=500) vs stable 1.95s (n=500): above 1.25× stable, significantly"
    )
    assert judgement.reason == check.reason


def test_latency_absolute_limit_is_reported() -> None:
    judgement = judge(
        stats(500, latency=fixed(3.0)), stats(0), auto(latency_p95=LatencyCheck(max_s=2.0))
    )
    (check,) = judgement.checks
    assert check.verdict is Verdict.FAIL
    assert check.limit == 2.0
    assert check.stable_value is None
    assert check.reason.endswith("above 2s, significantly")


@pytest.mark.parametrize("stable_requests", [0, 50, 100])
def test_latency_ratio_is_inconclusive_while_stable_is_too_small(stable_requests: int) -> None:
    # 100 stable requests reach min_requests but cannot yet bound stable's p95 at
    # the failing side's confidence: still too little to compare.
    judgement = judge(
        stats(500, latency=spread(2.0)),
        stats(stable_requests, latency=spread(1.0)),
        auto(latency_p95=LatencyCheck(max_ratio=1.25)),
    )
    assert judgement.verdict is Verdict.INCONCLUSIVE
    (check,) = judgement.checks
    assert check.limit is None
    assert f"too little stable data ({stable_requests}) to compare" in check.reason


def test_ttft_without_streamed_requests_passes() -> None:
    judgement = judge(stats(200), stats(200), auto(ttft_p95=LatencyCheck(max_ratio=1.5)))
    assert judgement.verdict is Verdict.PASS
    (check,) = judgement.checks
    assert check.check == "ttft_p95"
    assert check.verdict is Verdict.PASS
    assert (check.canary_value, check.stable_value, check.limit) == (None, None, None)
    assert (check.canary_n, check.stable_n) == (0, 0)
    assert check.reason == "p95 time to first token: no streamed requests to judge"


@pytest.mark.parametrize(
    ("canary", "stable", "verdict"),
    [
        (spread(2.0), spread(1.0), Verdict.FAIL),
        (spread(1.0), spread(1.0), Verdict.PASS),
        (None, spread(1.0), Verdict.INCONCLUSIVE),  # stable streams, the canary not yet
    ],
)
def test_ttft_of_streams_is_compared_with_stable(
    canary: Values | None, stable: Values, verdict: Verdict
) -> None:
    judgement = judge(
        stats(500, ttft=canary), stats(500, ttft=stable), auto(ttft_p95=LatencyCheck(max_ratio=1.5))
    )
    assert judgement.verdict is verdict
    (check,) = judgement.checks
    assert check.check == "ttft_p95"
    assert check.canary_n == (500 if canary is not None else 0)
    assert check.stable_n == 500
    if verdict is Verdict.FAIL:
        assert check.limit is not None
        assert check.stable_value is not None
        assert check.limit == pytest.approx(1.5 * check.stable_value)
        assert "p95 time to first token" in check.reason
        assert "above 1.5× stable, significantly" in check.reason
    if canary is None:
        assert "too little data (0 of 100 canary samples)" in check.reason


# --- the overall verdict ----------------------------------------------------------------

# Errors of 1000 canary requests (stable: 2 of 1000), against a 5% ceiling.
GOOD_ERRORS = 2
BAD_ERRORS = 300
UNSURE_ERRORS = 55


@pytest.mark.parametrize(
    ("errors", "canary_latency", "verdict", "deciding"),
    [
        (GOOD_ERRORS, spread(1.0), Verdict.PASS, {"error_rate", "latency_p95"}),
        (GOOD_ERRORS, spread(2.0), Verdict.FAIL, {"latency_p95"}),
        (BAD_ERRORS, spread(1.0), Verdict.FAIL, {"error_rate"}),
        (BAD_ERRORS, spread(2.0), Verdict.FAIL, {"error_rate", "latency_p95"}),
        (UNSURE_ERRORS, spread(1.0), Verdict.INCONCLUSIVE, {"error_rate"}),
        (UNSURE_ERRORS, spread(2.0), Verdict.FAIL, {"latency_p95"}),
    ],
)
def test_overall_verdict_fails_on_any_failure_and_passes_only_when_all_pass(
    errors: int, canary_latency: Values, verdict: Verdict, deciding: set[str]
) -> None:
    canary = stats(1000, errors, latency=canary_latency)
    stable = stats(1000, 2, latency=spread(1.0))
    policy = auto(
        error_rate=ErrorRateCheck(max=0.05), latency_p95=LatencyCheck(max_ratio=1.25, max_s=20.0)
    )
    judgement = judge(canary, stable, policy)
    assert judgement.verdict is verdict
    assert {c.check for c in judgement.checks if c.verdict is verdict} == deciding
    # The overall reason is the reasons of the checks with the deciding verdict.
    assert judgement.reason == "; ".join(c.reason for c in judgement.checks if c.verdict is verdict)
    mapping = judgement.to_mapping()
    assert mapping["verdict"] == verdict.value
    assert (mapping["canary_n"], mapping["stable_n"]) == (1000, 1000)
    assert mapping["checks"] == [c.to_mapping() for c in judgement.checks]


def test_more_limits_and_steps_make_failing_harder() -> None:
    # α is spread over steps × limits: a breach that fails one limit over 2 steps
    # may be inconclusive over 6 steps and 5 limits (rule 2 of proxy.analysis).
    canary, stable = stats(300, 90), stats(300, 3)
    check = ErrorRateCheck(max_increase=0.01)
    few = AutoRollout(steps=(10.0, 100.0), checks=Checks(error_rate=check))
    many = auto(
        error_rate=ErrorRateCheck(max=0.5, max_increase=0.01),
        latency_p95=LatencyCheck(max_s=20.0, max_ratio=1.25),
        ttft_p95=LatencyCheck(max_ratio=1.5),
    )
    assert judge(canary, stable, few).verdict is Verdict.FAIL
    many_result = judge(canary, stable, many).checks[0]
    assert many_result.verdict is Verdict.INCONCLUSIVE
    assert "not yet clearly within stable + 1.00%" in many_result.reason
