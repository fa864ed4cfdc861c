"""proxy.judge.analysis.judge: per-check verdicts with their numbers, and the overall verdict.

The judge reads an `Evidence`: the canary's and stable's numbers since the rollout
began (where checks fail) and since the current step began (where they pass).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable
from statistics import NormalDist

import pytest

from proxy.config.model import AutoRollout, Checks, ErrorRateCheck, LatencyCheck
from proxy.judge.analysis import CheckResult, Evidence, Judgement, Verdict, judge
from proxy.judge.sequential import log_mixture_ratio
from proxy.judge.stats import VariantStats

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


def evidence(canary: VariantStats, stable: VariantStats | None = None) -> Evidence:
    """A rollout still at its first step: both windows hold the same numbers."""
    return Evidence.fresh(0).added(canary, stable if stable is not None else VariantStats(), 1)


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
MAX_5 = auto(error_rate=ErrorRateCheck(max=0.05))


def only(judgement: Judgement) -> CheckResult:
    (check,) = judgement.checks
    return check


def assert_window(check: CheckResult) -> None:
    """Failures come from the rollout's window; everything else from the step's (but
    "nothing streamed", which is read over the rollout)."""
    if check.reason.endswith("no streamed requests to judge"):
        assert check.window == "rollout"
        return
    expected = "rollout" if check.verdict is Verdict.FAIL else "step"
    assert check.window == expected
    assert check.to_mapping()["window"] == expected
    assert ("over the rollout:" if expected == "rollout" else "at this step:") in check.reason


def mapping(stats_: VariantStats) -> dict[str, object]:
    return json.loads(json.dumps(stats_.to_mapping()))  # type: ignore[no-any-return]


EMPTY = mapping(VariantStats())


# --- too little data, and no checks -----------------------------------------------------


@pytest.mark.parametrize(
    "policy",
    [auto(), auto(error_rate=ERROR_RATE), auto(latency_p95=LatencyCheck(max_s=1.0))],
    ids=["no-checks", "error-rate", "latency"],
)
def test_judge_is_inconclusive_below_min_requests(policy: AutoRollout) -> None:
    # Even a canary failing every request is not judged before it has its requests.
    judgement = judge(evidence(stats(99, errors=99), stats(1000)), policy)
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
    judgement = judge(evidence(stats(requests)), auto())
    assert judgement.verdict is verdict
    assert judgement.checks == ()
    if verdict is Verdict.PASS:
        assert judgement.reason == "100 canary requests at this step, and no checks"


@pytest.mark.parametrize(
    ("step_requests", "verdict", "reason"),
    [
        (0, Verdict.INCONCLUSIVE, "too little data at this step: 0 of 100 canary requests"),
        (99, Verdict.INCONCLUSIVE, "too little data at this step: 99 of 100 canary requests"),
        (100, Verdict.PASS, "100 canary requests at this step, and no checks"),
    ],
)
def test_judge_without_checks_needs_min_requests_at_this_step(
    step_requests: int, verdict: Verdict, reason: str
) -> None:
    # 1000 requests at earlier steps do not pass this one.
    earlier = evidence(stats(1000), stats(1000)).new_step()
    judgement = judge(earlier.added(stats(step_requests), stats(step_requests), 2), auto())
    assert judgement.verdict is verdict
    assert judgement.checks == ()
    assert judgement.reason == reason
    assert (judgement.canary_n, judgement.stable_n) == (1000 + step_requests,) * 2


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
    judgement = judge(evidence(stats(*canary), stats(*stable)), auto(error_rate=check))
    assert judgement.verdict is verdict
    result = only(judgement)
    assert result.verdict is verdict
    assert_window(result)


def test_error_rate_failure_carries_its_numbers() -> None:
    judgement = judge(evidence(stats(300, 90), stats(300, 3)), auto(error_rate=ERROR_RATE))
    assert judgement.verdict is Verdict.FAIL
    check = only(judgement)
    assert check.check == "error_rate"
    assert check.verdict is Verdict.FAIL
    assert check.window == "rollout"
    assert check.canary_value == pytest.approx(0.30)
    assert check.stable_value == pytest.approx(0.01)
    assert check.limit == pytest.approx(0.02)  # the tighter of 5% and stable + 1%
    assert (check.canary_n, check.stable_n) == (300, 300)
    assert check.reason == (
        "error rate 30.00% (n=300) vs stable 1.00% (n=300) over the rollout: "
        "above the limit 5.00%, significantly, more than 1.00% above stable, significantly"
    )
    assert judgement.reason == check.reason
    assert (judgement.canary_n, judgement.stable_n) == (300, 300)
    assert check.to_mapping() == {
        "check": "error_rate",
        "window": "rollout",
        "verdict": "fail",
        "canary": check.canary_value,
        "stable": check.stable_value,
        "limit": check.limit,
        "canary_n": 300,
        "stable_n": 300,
        "reason": check.reason,
    }


def test_error_rate_pass_carries_the_numbers_of_this_step() -> None:
    # 5600 requests over the rollout, 1000 of them at this step: the pass is this step's.
    earlier = evidence(stats(4600, 9), stats(4600, 9)).new_step()
    judgement = judge(earlier.added(stats(1000, 2), stats(1000, 2), 2), auto(error_rate=ERROR_RATE))
    assert judgement.verdict is Verdict.PASS
    check = only(judgement)
    assert check.window == "step"
    assert (check.canary_n, check.stable_n) == (1000, 1000)
    assert check.canary_value == pytest.approx(0.002)
    assert (judgement.canary_n, judgement.stable_n) == (5600, 5600)
    assert check.reason == (
        "error rate 0.20% (n=1000) vs stable 0.20% (n=1000) at this step: "
        "within 5.00%, within stable + 1.00%"
    )
    assert judgement.reason == check.reason


@pytest.mark.parametrize("stable_requests", [0, 50, 99])
def test_error_rate_increase_is_inconclusive_while_stable_is_too_small(
    stable_requests: int,
) -> None:
    # Even a clearly bad canary is not failed on an increase over too little stable data.
    judgement = judge(
        evidence(stats(300, 90), stats(stable_requests)),
        auto(error_rate=ErrorRateCheck(max_increase=0.01)),
    )
    assert judgement.verdict is Verdict.INCONCLUSIVE
    check = only(judgement)
    assert_window(check)
    assert check.stable_n == stable_requests
    assert f"too little stable data ({stable_requests}) to compare" in check.reason
    if stable_requests == 0:
        assert check.stable_value is None
        assert "vs stable n/a (n=0)" in check.reason
    # No limit is reported that the check could not apply.
    assert check.limit is None


def test_error_rate_fails_at_most_one_minus_confidence_for_a_canary_at_its_limit() -> None:
    # A canary exactly at its ceiling, judged at every look of a long rollout that moves
    # up a step every 4 looks: SPEC §6, the false-failure rate over all looks and steps
    # stays within 1 − confidence (here all of it is the one limit's).
    rng = random.Random(11)
    sequences, looks, batch = 1000, 20, 100
    failed = 0
    for _ in range(sequences):
        seen = Evidence.fresh(0)
        for look in range(looks):
            canary = VariantStats()
            canary.requests = batch
            canary.errors = sum(rng.random() < 0.05 for _ in range(batch))
            seen = seen.added(canary, VariantStats(), look + 1)
            if judge(seen, MAX_5).verdict is Verdict.FAIL:
                failed += 1
                break
            if look % 4 == 3:
                seen = seen.new_step()
    assert failed / sequences <= 1 - MAX_5.confidence


@pytest.mark.parametrize(
    ("limits", "confidence"),
    [
        (ErrorRateCheck(max=0.05), 0.95),
        (ErrorRateCheck(max=0.05), 0.99),
        (ErrorRateCheck(max=0.05, max_increase=0.5), 0.95),
    ],
)
def test_error_rate_fails_exactly_where_the_msprt_crosses_its_threshold(
    limits: ErrorRateCheck, confidence: float
) -> None:
    # α = (1 − confidence) / limits, whatever the number of steps: the canary fails as
    # soon as log Λ ≥ log(1/α) over the rollout, and not before.
    count = (limits.max is not None) + (limits.max_increase is not None)
    threshold = math.log(count / (1 - confidence))
    for steps in (STEPS, (10.0, 100.0)):
        policy = AutoRollout(steps=steps, confidence=confidence, checks=Checks(error_rate=limits))
        crossings = []
        for errors in range(10, 60):
            statistic = log_mixture_ratio(errors, 400, 0.05, 0.05)
            verdict = judge(evidence(stats(400, errors), stats(400)), policy).verdict
            assert (verdict is Verdict.FAIL) == (statistic >= threshold)
            crossings.append(verdict is Verdict.FAIL)
        assert crossings == sorted(crossings)
        assert any(crossings)
        assert not all(crossings)


# --- two windows: failing over the rollout, passing at this step -------------------------


def test_a_regression_accumulates_over_steps_until_it_fails() -> None:
    # 10% errors against a 5% ceiling, 100 requests a step: no single step's numbers
    # show it, the rollout's two steps together do.
    first = evidence(stats(100, 10), stats(100, 1))
    assert judge(first, MAX_5).verdict is Verdict.INCONCLUSIVE
    second = first.new_step().added(stats(100, 10), stats(100, 1), 2)
    judgement = judge(second, MAX_5)
    assert judgement.verdict is Verdict.FAIL
    check = only(judgement)
    assert check.window == "rollout"
    assert (check.canary_n, check.stable_n) == (200, 200)
    assert check.canary_value == pytest.approx(0.10)
    assert check.reason == (
        "error rate 10.00% (n=200) vs stable 1.00% (n=200) over the rollout: "
        "above the limit 5.00%, significantly"
    )
    # The second step alone, as a fresh rollout, cannot tell.
    alone = judge(evidence(stats(100, 10), stats(100, 1)), MAX_5)
    assert alone.verdict is Verdict.INCONCLUSIVE


def test_a_regression_at_earlier_steps_still_fails_a_clean_later_step() -> None:
    # 15% errors at the earlier step; this step's 100 requests are clean and would pass
    # on their own, but the rollout still shows the breach.
    earlier = evidence(stats(200, 30), stats(200, 2))
    assert judge(earlier, MAX_5).verdict is Verdict.FAIL
    later = earlier.new_step().added(stats(100), stats(100), 2)
    judgement = judge(later, MAX_5)
    assert judgement.verdict is Verdict.FAIL
    check = only(judgement)
    assert check.window == "rollout"
    assert check.canary_n == 300
    assert check.canary_value == pytest.approx(0.10)
    assert judge(evidence(stats(100), stats(100)), MAX_5).verdict is Verdict.PASS


def test_a_pass_needs_fresh_data_at_each_step() -> None:
    policy = auto(error_rate=ERROR_RATE, latency_p95=LatencyCheck(max_ratio=1.25, max_s=5.0))
    good = evidence(stats(1000, 2, spread(1.0)), stats(1000, 2, spread(1.0)))
    assert judge(good, policy).verdict is Verdict.PASS
    stepped = good.new_step()
    judgement = judge(stepped, policy)
    assert judgement.verdict is Verdict.INCONCLUSIVE
    assert (judgement.canary_n, judgement.stable_n) == (1000, 1000)
    for check in judgement.checks:
        assert check.verdict is Verdict.INCONCLUSIVE
        assert check.window == "step"
        assert (check.canary_n, check.stable_n) == (0, 0)
        assert check.reason.endswith("at this step: too little data at this step (0 of 100)")
    # The verdict's reason is its inconclusive checks'.
    assert judgement.reason == "; ".join(c.reason for c in judgement.checks)
    almost = stepped.added(stats(99, 0, spread(1.0)), stats(1000, 2, spread(1.0)), 2)
    assert judge(almost, policy).verdict is Verdict.INCONCLUSIVE
    enough = stepped.added(stats(1000, 2, spread(1.0)), stats(1000, 2, spread(1.0)), 2)
    assert judge(enough, policy).verdict is Verdict.PASS


@pytest.mark.parametrize(
    ("policy", "bad_canary", "bad_stable"),
    [
        (auto(error_rate=ERROR_RATE), stats(300, 90), stats(300, 3)),
        (
            auto(latency_p95=LatencyCheck(max_ratio=1.25, max_s=2.0)),
            stats(500, latency=spread(2.0)),
            stats(500, latency=spread(1.0)),
        ),
        (
            auto(ttft_p95=LatencyCheck(max_ratio=1.5)),
            stats(500, ttft=spread(2.0)),
            stats(500, ttft=spread(1.0)),
        ),
    ],
    ids=["error-rate", "latency", "ttft"],
)
def test_the_step_window_alone_cannot_fail_a_check(
    policy: AutoRollout, bad_canary: VariantStats, bad_stable: VariantStats
) -> None:
    # The same numbers fail over the rollout...
    assert judge(evidence(bad_canary, bad_stable), policy).verdict is Verdict.FAIL
    # ...but in the step's window only (a clean rollout), they leave the check open.
    clean = stats(5000, 0, spread(1.0), spread(1.0))
    split = Evidence(clean, clean, bad_canary, bad_stable, 1)
    judgement = judge(split, policy)
    assert judgement.verdict is Verdict.INCONCLUSIVE
    check = only(judgement)
    assert check.verdict is Verdict.INCONCLUSIVE
    assert check.window == "step"
    assert "not yet clearly within" in check.reason
    assert "significantly" not in check.reason


def test_failing_reads_the_rollout_window_even_with_an_empty_step() -> None:
    judgement = judge(evidence(stats(400, 40)).new_step(), MAX_5)
    assert judgement.verdict is Verdict.FAIL
    assert only(judgement).window == "rollout"
    assert only(judgement).canary_n == 400


# --- evidence ---------------------------------------------------------------------------


def full_stats(requests: int, errors: int, base_s: float) -> VariantStats:
    """Stats with every field filled: errors by type, latency, time to first token, tokens."""
    result = VariantStats()
    for i in range(requests):
        error = ("timeout" if i % 2 else "http_503") if i < errors else None
        result.record(base_s * (1 + i / requests), base_s / 4, error, 10 + i % 3)
    return result


def test_fresh_evidence_is_empty_from_its_slice() -> None:
    fresh = Evidence.fresh(1_800_000_001)
    assert fresh.next_slice == 1_800_000_001
    for window in (fresh.rollout_canary, fresh.rollout_stable, fresh.step_canary):
        assert mapping(window) == EMPTY
    assert mapping(fresh.step_stable) == EMPTY
    assert len({id(fresh.rollout_canary), id(fresh.step_canary), id(Evidence().step_canary)}) == 3


def test_evidence_added_sums_both_windows_and_changes_nothing_it_was_given() -> None:
    before = (
        evidence(full_stats(300, 12, 0.5), full_stats(900, 9, 0.4))
        .new_step()
        .added(full_stats(100, 4, 0.6), full_stats(300, 3, 0.4), 5)
    )
    canary, stable = full_stats(50, 5, 0.8), full_stats(150, 1, 0.4)
    given = {
        "before": before.to_mapping(),
        "canary": mapping(canary),
        "stable": mapping(stable),
    }
    after = before.added(canary, stable, 9)
    # Its inputs are as they were: the evidence, and the stats added to it.
    assert {
        "before": before.to_mapping(),
        "canary": mapping(canary),
        "stable": mapping(stable),
    } == given
    assert after is not before
    assert after.next_slice == 9
    assert before.next_slice == 5
    windows = ("rollout_canary", "rollout_stable", "step_canary", "step_stable")
    for name in windows:
        new = getattr(after, name)
        assert new is not getattr(before, name)
        assert new is not canary
        assert new is not stable
    # Both windows gain the same numbers.
    for name, part in zip(windows, (canary, stable, canary, stable), strict=True):
        old, new = getattr(before, name), getattr(after, name)
        assert new.requests == old.requests + part.requests
        assert new.errors == old.errors + part.errors
        assert new.output_tokens == old.output_tokens + part.output_tokens
        assert new.errors_by_type == {
            kind: old.errors_by_type.get(kind, 0) + part.errors_by_type.get(kind, 0)
            for kind in {*old.errors_by_type, *part.errors_by_type}
        }
        for histogram in ("latency", "ttft"):
            a, b, total = (getattr(x, histogram) for x in (old, part, new))
            assert total.count == a.count + b.count
            assert total.sum == pytest.approx(a.sum + b.sum)
            assert total.buckets == {
                i: a.buckets.get(i, 0) + b.buckets.get(i, 0) for i in {*a.buckets, *b.buckets}
            }
    assert (after.rollout_canary.requests, after.step_canary.requests) == (450, 150)
    assert (after.rollout_stable.requests, after.step_stable.requests) == (1350, 450)
    # Later changes to what was added do not reach the evidence.
    canary.record(1.0, None, "timeout", None)
    assert after.rollout_canary.requests == 450
    assert after.step_canary.requests == 150


def test_new_step_keeps_the_rollout_window_and_empties_the_step_window() -> None:
    before = evidence(full_stats(300, 12, 0.5), full_stats(900, 9, 0.4)).added(
        full_stats(100, 4, 0.6), full_stats(300, 3, 0.4), 7
    )
    given = before.to_mapping()
    stepped = before.new_step()
    assert before.to_mapping() == given
    assert stepped.next_slice == 7
    assert mapping(stepped.rollout_canary) == mapping(before.rollout_canary)
    assert mapping(stepped.rollout_stable) == mapping(before.rollout_stable)
    assert mapping(stepped.step_canary) == EMPTY
    assert mapping(stepped.step_stable) == EMPTY
    # What comes next lands in both windows.
    more = stepped.added(full_stats(20, 1, 0.5), full_stats(60, 0, 0.4), 8)
    assert (more.rollout_canary.requests, more.step_canary.requests) == (420, 20)
    assert (more.rollout_stable.requests, more.step_stable.requests) == (1260, 60)
    assert before.to_mapping() == given


def test_evidence_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Evidence.fresh(3).next_slice = 4  # type: ignore[misc]


@pytest.mark.parametrize("via_json", [False, True])
def test_evidence_round_trips_through_its_mapping(via_json: bool) -> None:
    original = (
        evidence(full_stats(300, 12, 0.5), full_stats(900, 9, 0.4))
        .new_step()
        .added(full_stats(100, 4, 0.6), full_stats(300, 3, 0.4), 1_800_000_042)
    )
    data = original.to_mapping()
    assert set(data) == {
        "rollout_canary",
        "rollout_stable",
        "step_canary",
        "step_stable",
        "next_slice",
    }
    if via_json:
        data = json.loads(json.dumps(data))
    restored = Evidence.from_mapping(data)
    assert restored.to_mapping() == original.to_mapping()
    assert restored.next_slice == 1_800_000_042
    # The restored evidence judges as the original does.
    policy = auto(error_rate=ERROR_RATE, latency_p95=LatencyCheck(max_ratio=1.25))
    assert judge(restored, policy) == judge(original, policy)


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
        evidence(stats(500, latency=canary), stats(500, latency=stable)), auto(latency_p95=check)
    )
    assert judgement.verdict is verdict
    result = judgement.checks[0]
    assert result.check == "latency_p95"
    assert result.verdict is verdict
    assert (result.canary_n, result.stable_n) == (500, 500)
    assert_window(result)


def test_latency_regression_carries_its_numbers() -> None:
    canary, stable = stats(500, latency=spread(2.0)), stats(500, latency=spread(1.0))
    judgement = judge(evidence(canary, stable), auto(latency_p95=LatencyCheck(max_ratio=1.25)))
    check = only(judgement)
    assert check.verdict is Verdict.FAIL
    assert check.window == "rollout"
    assert check.canary_value == pytest.approx(canary.latency.quantile(0.95))
    assert check.stable_value == pytest.approx(stable.latency.quantile(0.95))
    assert check.canary_value == pytest.approx(3.9, rel=0.05)
    assert check.stable_value == pytest.approx(1.95, rel=0.05)
    assert check.stable_value is not None
    assert check.limit == pytest.approx(1.25 * check.stable_value)
    assert check.reason == (
        "p95 latency 3.90s (n=500) vs stable 1.95s (n=500) over the rollout: "
        "above 1.25× stable, significantly"
    )
    assert judgement.reason == check.reason


def test_latency_absolute_limit_is_reported() -> None:
    judgement = judge(
        evidence(stats(500, latency=fixed(3.0)), stats(0)),
        auto(latency_p95=LatencyCheck(max_s=2.0)),
    )
    check = only(judgement)
    assert check.verdict is Verdict.FAIL
    assert check.window == "rollout"
    assert check.limit == 2.0
    assert check.stable_value is None
    assert check.reason.endswith("over the rollout: above 2s, significantly")


@pytest.mark.parametrize("stable_requests", [0, 50, 99])
def test_latency_ratio_is_inconclusive_while_stable_is_too_small(stable_requests: int) -> None:
    judgement = judge(
        evidence(stats(500, latency=spread(2.0)), stats(stable_requests, latency=spread(1.0))),
        auto(latency_p95=LatencyCheck(max_ratio=1.25)),
    )
    assert judgement.verdict is Verdict.INCONCLUSIVE
    check = only(judgement)
    assert_window(check)
    assert f"too little stable data ({stable_requests}) to compare" in check.reason
    # No limit is reported that the check could not apply.
    assert check.limit is None


def test_latency_ratio_can_fail_once_stable_has_min_requests() -> None:
    # Stable's p95 is bounded at the route's confidence (rule 4 of proxy.judge.analysis): with
    # 100 values its high bound is read at rank 100, so min_requests is all it takes.
    judgement = judge(
        evidence(stats(500, latency=spread(2.0)), stats(100, latency=spread(1.0))),
        auto(latency_p95=LatencyCheck(max_ratio=1.25)),
    )
    assert judgement.verdict is Verdict.FAIL
    assert only(judgement).window == "rollout"
    assert only(judgement).stable_n == 100


def test_latency_fails_at_most_one_minus_confidence_for_a_canary_at_its_limit() -> None:
    # Lognormal latencies whose p95 is exactly the 2 s ceiling: the share above it is read
    # interpolated inside its bucket, and looking at every interval must still fail
    # within 1 − confidence.
    policy = auto(latency_p95=LatencyCheck(max_s=2.0))
    sigma = 0.6
    mu = math.log(2.0) - sigma * NormalDist().inv_cdf(0.95)
    rng = random.Random(12)
    sequences, looks, batch = 300, 20, 100
    failed = 0
    for _ in range(sequences):
        seen = Evidence.fresh(0)
        for look in range(looks):
            canary = VariantStats()
            canary.requests = batch
            for _ in range(batch):
                canary.latency.record(rng.lognormvariate(mu, sigma))
            seen = seen.added(canary, VariantStats(), look + 1)
            if judge(seen, policy).verdict is Verdict.FAIL:
                failed += 1
                break
            if look % 4 == 3:
                seen = seen.new_step()
    assert failed / sequences <= 1 - policy.confidence


def test_ttft_without_streamed_requests_passes() -> None:
    judgement = judge(evidence(stats(200), stats(200)), auto(ttft_p95=LatencyCheck(max_ratio=1.5)))
    assert judgement.verdict is Verdict.PASS
    check = only(judgement)
    assert check.check == "ttft_p95"
    assert check.verdict is Verdict.PASS
    assert check.window == "rollout"
    assert (check.canary_value, check.stable_value, check.limit) == (None, None, None)
    assert (check.canary_n, check.stable_n) == (0, 0)
    assert check.reason == "p95 time to first token: no streamed requests to judge"


def test_ttft_without_streamed_requests_still_needs_this_steps_requests() -> None:
    stepped = evidence(stats(200), stats(200)).new_step()
    judgement = judge(stepped, auto(ttft_p95=LatencyCheck(max_ratio=1.5)))
    assert judgement.verdict is Verdict.INCONCLUSIVE
    assert only(judgement).verdict is Verdict.PASS  # nothing to judge...
    assert judgement.reason == "too little data at this step: 0 of 100 canary requests"


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
        evidence(stats(500, ttft=canary), stats(500, ttft=stable)),
        auto(ttft_p95=LatencyCheck(max_ratio=1.5)),
    )
    assert judgement.verdict is verdict
    check = only(judgement)
    assert check.check == "ttft_p95"
    assert check.canary_n == (500 if canary is not None else 0)
    assert check.stable_n == 500
    assert_window(check)
    if verdict is Verdict.FAIL:
        assert check.limit is not None
        assert check.stable_value is not None
        assert check.limit == pytest.approx(1.5 * check.stable_value)
        assert "p95 time to first token" in check.reason
        assert "above 1.5× stable, significantly" in check.reason
    if canary is None:
        assert "too little data at this step (0 of 100)" in check.reason


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
    judgement = judge(evidence(canary, stable), policy)
    assert judgement.verdict is verdict
    assert {c.check for c in judgement.checks if c.verdict is verdict} == deciding
    for check in judgement.checks:
        assert_window(check)
    # The overall reason is the reasons of the checks with the deciding verdict.
    assert judgement.reason == "; ".join(c.reason for c in judgement.checks if c.verdict is verdict)
    mapping_ = judgement.to_mapping()
    assert mapping_["verdict"] == verdict.value
    assert (mapping_["canary_n"], mapping_["stable_n"]) == (1000, 1000)
    assert mapping_["checks"] == [c.to_mapping() for c in judgement.checks]


def test_more_limits_make_failing_harder_and_steps_do_not() -> None:
    # α is split over the limits (rule 2 of proxy.judge.analysis), not over the steps: a breach
    # that fails one limit may be inconclusive among five, however many steps there are.
    canary, stable = stats(300, 22), stats(300, 3)  # 7.3% against 1% + 1%
    check = ErrorRateCheck(max_increase=0.01)
    few_steps = AutoRollout(steps=(10.0, 100.0), checks=Checks(error_rate=check))
    many_steps = auto(error_rate=check)
    many_limits = auto(
        error_rate=ErrorRateCheck(max=0.5, max_increase=0.01),
        latency_p95=LatencyCheck(max_s=20.0, max_ratio=1.25),
        ttft_p95=LatencyCheck(max_ratio=1.5),
    )
    assert judge(evidence(canary, stable), few_steps).verdict is Verdict.FAIL
    assert judge(evidence(canary, stable), many_steps).verdict is Verdict.FAIL
    many_result = judge(evidence(canary, stable), many_limits).checks[0]
    assert many_result.verdict is Verdict.INCONCLUSIVE
    assert many_result.window == "step"
    assert "not yet clearly within stable + 1.00%" in many_result.reason
