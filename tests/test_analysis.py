"""proxy.judge.analysis: evidence gathered slice by slice, per-check verdicts with their
numbers, and the overall verdict.

The judge's `Evidence` holds each time slice's (a judgement interval's) numbers as the
steps of always-valid tests: failing ones over the rollout, passing ones over the step.
Every test here builds evidence the way the controller does, one slice at a time.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from dataclasses import replace

import numpy as np
import pytest

from proxy.config.model import AutoRollout, Checks, ErrorRateCheck, LatencyCheck
from proxy.judge.analysis import Evidence, Judgement, Verdict, judge
from proxy.judge.stats import VariantStats

STEPS = (1.0, 5.0, 10.0, 25.0, 50.0, 100.0)

Values = Callable[[int], float]


def fixed(value_s: float) -> Values:
    return lambda i: value_s


def spread(base_s: float, n: int = 100) -> Values:
    """Evenly from base to 2 × base over every n requests."""
    return lambda i: base_s * (1 + (i % n) / n)


def stats(
    requests: int,
    errors: int = 0,
    *,
    latency: Values | None = None,
    ttft: Values | None = None,
    tokens: int | None = None,
    cancels: int = 0,
    user: int | None = None,
    first_user: int = 0,
) -> VariantStats:
    """A variant's stats: the first `errors` requests failed, the next `cancels` were
    cancelled; each from a user of its own, or all from `user`."""
    if latency is None and ttft is None:
        # The same stats come back often in the simulated rollouts below: recorded once,
        # handed out as copies (recording is most of those tests' time).
        result = VariantStats()
        result.merge(_usual(requests, errors, tokens, cancels, user, first_user))
        return result
    return _recorded(requests, errors, latency, ttft, tokens, cancels, user, first_user)


@functools.lru_cache(maxsize=4096)
def _usual(
    requests: int, errors: int, tokens: int | None, cancels: int, user: int | None, first_user: int
) -> VariantStats:
    return _recorded(requests, errors, None, None, tokens, cancels, user, first_user)


def _recorded(
    requests: int,
    errors: int,
    latency: Values | None,
    ttft: Values | None,
    tokens: int | None,
    cancels: int,
    user: int | None,
    first_user: int,
) -> VariantStats:
    latency = latency or fixed(0.1)
    result = VariantStats()
    for i in range(requests):
        result.record(
            latency(i),
            ttft(i) if ttft is not None else None,
            "500" if i < errors else None,
            tokens,
            errors <= i < errors + cancels,
            user if user is not None else _scattered(first_user + i),
        )
    return result


def _scattered(user: int) -> int:
    """A user's stand-in bucket, scattered (as a hash scatters keys) so that the first
    requests of a batch do not all fall in neighbouring clusters."""
    return (user * 2_654_435_761) % 1_000_003


def gathered(auto: AutoRollout, slices: Iterable[tuple[VariantStats, VariantStats]]) -> Evidence:
    evidence = Evidence.fresh(0)
    for index, (canary, stable) in enumerate(slices, start=1):
        evidence = evidence.added(canary, stable, index, auto)
    return evidence


def policy(min_requests: int = 100, **checks: ErrorRateCheck | LatencyCheck) -> AutoRollout:
    return AutoRollout(steps=STEPS, min_requests=min_requests, checks=Checks(**checks))  # type: ignore[arg-type]


ERRORS = policy(error_rate=ErrorRateCheck(max=0.05, max_increase=0.01))


def healthy(n: int = 10) -> list[tuple[VariantStats, VariantStats]]:
    """n slices of a canary as good as stable: 1% errors, 300 and 3000 requests."""
    return [
        (stats(300, 3, first_user=k * 10_000), stats(3000, 30, first_user=k * 10_000 + 5000))
        for k in range(n)
    ]


def check(judgement: Judgement, name: str) -> dict[str, object]:
    (found,) = [c.to_mapping() for c in judgement.checks if c.check == name]
    return found


# --- requests, and failing without them ---------------------------------------------------


def test_without_checks_a_step_passes_on_its_requests() -> None:
    auto = policy(min_requests=100)
    few = judge(gathered(auto, [(stats(99), stats(1000))]), auto)
    assert (few.verdict, few.checks) == (Verdict.INCONCLUSIVE, ())
    assert few.reason == "too little data at this step: 99 of 100 canary requests"
    enough = judge(gathered(auto, [(stats(100), stats(1000))]), auto)
    assert enough.verdict is Verdict.PASS
    assert enough.reason == "100 canary requests at this step, and no checks"


def test_a_canary_failing_every_request_is_failed_long_before_min_requests() -> None:
    # One request a slice, each from another user, each failing: at 0.5 req/s and 1%,
    # what a canary that fails everything gets.
    auto = replace(ERRORS, min_requests=1000)
    slices = [(stats(1, 1, user=k), stats(50, 0, first_user=1000 * k)) for k in range(4)]
    judgement = judge(gathered(auto, slices), auto)
    assert judgement.verdict is Verdict.FAIL
    assert judgement.canary_n == 4
    result = check(judgement, "error_rate")
    assert result["window"] == "rollout"
    assert "beyond" in str(result["reason"])


def test_one_user_failing_cannot_fail_the_canary() -> None:
    # The same four failures from one user (a broken client): one user's evidence.
    auto = replace(ERRORS, min_requests=1000)
    slices = [(stats(1, 1, user=7), stats(50, 0, first_user=1000 * k)) for k in range(4)]
    assert judge(gathered(auto, slices), auto).verdict is Verdict.INCONCLUSIVE


def test_one_slice_is_one_observation_of_its_time() -> None:
    # A burst: 30 of 100 requests failing in one interval, from a hundred users.
    auto = ERRORS
    burst = gathered(auto, [(stats(100, 30), stats(1000, 10, first_user=500))])
    assert judge(burst, auto).verdict is Verdict.INCONCLUSIVE
    # The same again in the next interval is not a burst: it fails.
    again = burst.added(stats(100, 30, first_user=5000), stats(1000, 10, first_user=9000), 2, auto)
    assert judge(again, auto).verdict is Verdict.FAIL


# --- the error rate -----------------------------------------------------------------------


def test_an_error_rate_above_stable_plus_the_increase_fails_with_its_numbers() -> None:
    slices = [
        (stats(200, 12, first_user=k * 10_000), stats(2000, 20, first_user=k * 10_000 + 500))
        for k in range(10)
    ]
    judgement = judge(gathered(ERRORS, slices), ERRORS)
    assert judgement.verdict is Verdict.FAIL
    result = check(judgement, "error_rate")
    assert result["canary"] == pytest.approx(0.06)
    assert result["stable"] == pytest.approx(0.01)
    assert result["limit"] == pytest.approx(0.02)  # stable + 0.01, tighter than 0.05
    assert (result["canary_n"], result["stable_n"], result["window"]) == (2000, 20_000, "rollout")
    limits = {entry["limit"]: entry for entry in result["limits"]}  # type: ignore[attr-defined]
    increase = limits["max_increase"]
    assert increase["fail_e"] >= increase["fail_threshold"]
    # α is split 1 : 0.25 between the increase and the absolute ceiling.
    assert increase["fail_threshold"] == pytest.approx(1.25 / 0.05, rel=1e-3)
    assert limits["max"]["fail_threshold"] == pytest.approx(1.25 / (0.25 * 0.05), rel=1e-3)
    assert str(result["reason"]).startswith(
        "error rate 6.00% (n=2000) vs stable 1.00% (n=20000) over the rollout: "
        "beyond stable + 1.00% (evidence "
    )


def test_a_canary_as_good_as_stable_passes_its_step() -> None:
    judgement = judge(gathered(ERRORS, healthy()), ERRORS)
    assert judgement.verdict is Verdict.PASS
    result = check(judgement, "error_rate")
    assert result["window"] == "step"
    assert result["pass_threshold"] == pytest.approx(20)
    assert "within the limit 5.00%" in str(result["reason"])
    assert "within stable + 1.00%" in str(result["reason"])


def test_a_pass_needs_data_at_this_step_and_failures_carry_over() -> None:
    evidence = gathered(ERRORS, healthy()).new_step()
    judgement = judge(evidence, ERRORS)
    assert judgement.verdict is Verdict.INCONCLUSIVE
    assert judgement.reason == "too little data at this step: 0 of 100 canary requests"
    reason = str(check(judgement, "error_rate")["reason"])
    assert "too little data at this step (0 of 100)" in reason
    # The failing side keeps the rollout's evidence: a regression at this step adds to it.
    for k in range(10):
        evidence = evidence.added(
            stats(300, 20, first_user=100_000 + k * 1000),
            stats(3000, 30, first_user=200_000 + k * 5000),
            11 + k,
            ERRORS,
        )
    assert judge(evidence, ERRORS).verdict is Verdict.FAIL


@pytest.mark.timeout(90)  # 4,000 judgements: 7 s alone, 20 s on a busy machine
def test_a_canary_exactly_at_its_limit_rarely_passes_a_step() -> None:
    # 1% stable, 2% canary, an allowed increase of 1%: at the limit. A wrong pass would
    # step it up; the passing test allows that in at most 5% of steps.
    auto = policy(min_requests=100, error_rate=ErrorRateCheck(max_increase=0.01))
    rng = np.random.default_rng(21)
    passed = 0
    runs = 100
    for _ in range(runs):
        evidence = Evidence.fresh(0)
        for k in range(40):
            canary = stats(100, int(rng.binomial(100, 0.02)), first_user=k * 10_000)
            stable = stats(1000, int(rng.binomial(1000, 0.01)), first_user=k * 10_000 + 500)
            evidence = evidence.added(canary, stable, k + 1, auto)
            if judge(evidence, auto).verdict is Verdict.PASS:
                passed += 1
                break
    assert passed / runs <= 0.08


# --- shared incidents ---------------------------------------------------------------------


def test_a_shared_incident_holds_the_rollout_and_says_so() -> None:
    before = healthy(4)
    incident = [(stats(300, 120, first_user=90_000), stats(3000, 1200, first_user=95_000))]
    evidence = gathered(ERRORS, before + incident)
    judgement = judge(evidence, ERRORS)
    assert judgement.verdict is Verdict.INCONCLUSIVE
    assert judgement.shared_incident
    assert judgement.reason.startswith("shared incident: stable's error rate is beyond its limit")
    incidents = judgement.to_mapping()["shared_incident"]
    assert isinstance(incidents, list)
    (shown,) = incidents
    assert shown == {"check": "error_rate", "limit": 0.05, "stable": 0.4, "canary": 0.4}
    # The incident added nothing against the canary: once it is over, the canary passes.
    after = evidence
    for k in range(3):
        after = after.added(
            stats(300, 3, first_user=300_000 + k * 1000),
            stats(3000, 30, first_user=400_000 + k * 5000),
            20 + k,
            ERRORS,
        )
    over = judge(after, ERRORS)
    assert not over.shared_incident
    assert over.verdict is Verdict.PASS


def test_a_canary_worse_than_stable_in_an_incident_still_fails() -> None:
    slices = [
        (stats(300, 240, first_user=k * 10_000), stats(3000, 600, first_user=k * 10_000 + 500))
        for k in range(4)
    ]
    assert judge(gathered(ERRORS, slices), ERRORS).verdict is Verdict.FAIL


def test_stable_alone_beyond_a_limit_is_no_shared_incident() -> None:
    slices = [*healthy(4), (stats(300, 3, first_user=70000), stats(3000, 1200, first_user=80000))]
    judgement = judge(gathered(ERRORS, slices), ERRORS)
    assert not judgement.shared_incident
    assert judgement.to_mapping()["shared_incident"] == []


# --- cancels, quantiles, time per token ---------------------------------------------------


def test_cancelled_requests_count_as_cancels_and_as_slow_not_as_errors() -> None:
    auto = policy(
        error_rate=ErrorRateCheck(max_increase=0.01),
        cancel_rate=ErrorRateCheck(max_increase=0.02),
        latency_p95=LatencyCheck(max_ratio=1.25),
    )
    # 15% of the canary's users give up after 8 s; stable answers everyone in 1-2 s.
    slices = [
        (
            stats(
                200,
                2,
                cancels=30,
                latency=lambda i: 8.0 if 2 <= i < 32 else 1.0 + i / 200,
                first_user=k * 10_000,
            ),
            stats(2000, 20, latency=spread(1.0), first_user=k * 10_000 + 500),
        )
        for k in range(10)
    ]
    evidence = gathered(auto, slices)
    assert evidence.rollout_canary.cancels == 300
    judgement = judge(evidence, auto)
    assert judgement.verdict is Verdict.FAIL
    assert check(judgement, "cancel_rate")["verdict"] == "fail"
    assert check(judgement, "latency_p95")["verdict"] == "fail"
    errors = check(judgement, "error_rate")
    assert errors["verdict"] != "fail"
    assert errors["canary_n"] == 1700  # the cancels are not trials of the error rate


def test_a_tail_regression_fails_the_p99_and_not_the_p95() -> None:
    auto = policy(
        latency_p95=LatencyCheck(max_ratio=1.25), latency_p99=LatencyCheck(max_ratio=1.25)
    )
    # 3% of the canary's requests take 5 s instead of 1-2 s.
    slow_tail = lambda i: 5.0 if i % 100 < 3 else 1.0 + (i % 100) / 100  # noqa: E731
    slices = [
        (
            stats(1000, latency=slow_tail, first_user=k * 100_000),
            stats(3000, latency=spread(1.0), first_user=k * 100_000 + 5000),
        )
        for k in range(10)
    ]
    judgement = judge(gathered(auto, slices), auto)
    assert check(judgement, "latency_p99")["verdict"] == "fail"
    assert check(judgement, "latency_p95")["verdict"] != "fail"
    assert check(judgement, "latency_p99")["canary"] == pytest.approx(5.0, rel=0.1)


def test_time_per_output_token_is_compared_with_stable() -> None:
    auto = policy(tpot_p50=LatencyCheck(max_ratio=1.2))
    # Both stream 101 tokens after a 0.2 s first token; the canary decodes 1.5x slower.

    def canary(k: int) -> VariantStats:
        return stats(
            200,
            latency=lambda i: 0.2 + 100 * 0.006 * (1 + i / 400),
            ttft=fixed(0.2),
            tokens=101,
            first_user=k * 10_000,
        )

    def stable(k: int) -> VariantStats:
        return stats(
            2000,
            latency=lambda i: 0.2 + 100 * 0.004 * (1 + i / 4000),
            ttft=fixed(0.2),
            tokens=101,
            first_user=k * 10_000 + 500,
        )

    evidence = gathered(auto, [(canary(k), stable(k)) for k in range(5)])
    assert evidence.rollout_canary.tpot.count == 1000
    result = check(judge(evidence, auto), "tpot_p50")
    assert result["verdict"] == "fail"
    assert result["canary"] == pytest.approx(0.0075, rel=0.1)


def test_times_of_streams_pass_where_nothing_streams() -> None:
    auto = policy(ttft_p95=LatencyCheck(max_ratio=1.5), tpot_p95=LatencyCheck(max_s=0.05))
    judgement = judge(gathered(auto, healthy(2)), auto)
    assert judgement.verdict is Verdict.PASS
    assert check(judgement, "tpot_p95")["reason"] == (
        "p95 time per output token: no streamed requests to judge"
    )


def test_a_ratio_reads_stable_from_past_slices_when_one_is_too_small() -> None:
    auto = policy(min_requests=10, latency_p95=LatencyCheck(max_ratio=1.25))
    # Stable has 10 requests a slice (a p95 needs 100): its reference carries over.
    slices = [
        (
            stats(20, latency=spread(1.0, 20), first_user=k * 1000),
            stats(10, latency=spread(1.0, 10), first_user=k * 1000 + 500),
        )
        for k in range(20)
    ]
    evidence = gathered(auto, slices)
    assert evidence.references["latency"].count >= 100
    assert judge(evidence, auto).verdict is not Verdict.FAIL


# --- the evidence itself ------------------------------------------------------------------


def test_evidence_added_changes_nothing_it_was_given_unless_told_to() -> None:
    evidence = gathered(ERRORS, healthy(2))
    before = json.dumps(evidence.to_mapping(), sort_keys=True)
    canary, stable = stats(10, 1), stats(100, 1, first_user=50)
    after = evidence.added(canary, stable, 3, ERRORS)
    assert json.dumps(evidence.to_mapping(), sort_keys=True) == before
    assert after.rollout_canary.requests == evidence.rollout_canary.requests + 10
    assert after.step_canary.requests == evidence.step_canary.requests + 10
    assert after.next_slice == 3
    reused = evidence.added(canary, stable, 3, ERRORS, reuse=True)
    assert reused.rollout_canary is evidence.rollout_canary  # for the simulator only


def test_new_step_keeps_the_failing_tests_and_restarts_the_passing_ones() -> None:
    evidence = gathered(ERRORS, healthy(3))
    stepped = evidence.new_step()
    assert stepped.step_canary.requests == 0
    assert stepped.rollout_canary is evidence.rollout_canary
    for key, (failing, passing) in stepped.tests.items():
        assert failing == evidence.tests[key][0]
        assert (passing.trials, passing.slices) == (0.0, 0)


@pytest.mark.parametrize("via_json", [False, True])
def test_evidence_round_trips_through_its_mapping(via_json: bool) -> None:
    auto = policy(
        error_rate=ErrorRateCheck(max=0.05, max_increase=0.01),
        latency_p95=LatencyCheck(max_ratio=1.25),
    )
    evidence = gathered(auto, healthy(3))
    mapping = evidence.to_mapping()
    if via_json:
        mapping = json.loads(json.dumps(mapping))
    restored = Evidence.from_mapping(mapping)
    assert restored.to_mapping() == evidence.to_mapping()
    assert judge(restored, auto) == judge(evidence, auto)


def test_evidence_stored_before_tests_were_kept_loads_without_them() -> None:
    mapping = gathered(ERRORS, healthy(2)).to_mapping()
    for key in ("tests", "references", "incidents"):
        del mapping[key]
    restored = Evidence.from_mapping(mapping)
    assert restored.tests == {}
    assert restored.rollout_canary.requests == 600


def test_an_edited_limit_gathers_its_evidence_afresh() -> None:
    evidence = gathered(ERRORS, healthy(3))
    looser = policy(error_rate=ErrorRateCheck(max=0.05, max_increase=0.02))
    edited = evidence.added(stats(300, 3, first_user=70_000), stats(3000, 30), 4, looser)
    increase = [key for key in edited.tests if key.startswith("error_rate.max_increase")]
    assert len(increase) == 2
    fresh = next(key for key in increase if "0.02" in key)
    assert edited.tests[fresh][0].slices == 1


def test_evidence_stays_the_same_size_however_long_the_rollout() -> None:
    auto = policy(
        error_rate=ErrorRateCheck(max=0.05, max_increase=0.01),
        latency_p95=LatencyCheck(max_ratio=1.25),
    )
    rng = np.random.default_rng(2)

    def slice_(k: int) -> tuple[VariantStats, VariantStats]:
        latency = lambda i: float(rng.lognormal(0, 0.5))  # noqa: E731
        return (
            stats(50, 1, latency=latency, first_user=k * 1000),
            stats(500, 5, latency=latency, first_user=k * 1000 + 100),
        )

    evidence = gathered(auto, (slice_(k) for k in range(20)))
    early = len(json.dumps(evidence.to_mapping()))
    for k in range(20, 400):
        evidence = evidence.added(*slice_(k), k + 1, auto, reuse=True)
    late = len(json.dumps(evidence.to_mapping()))
    assert late < 1.5 * early
    assert late < 60_000
