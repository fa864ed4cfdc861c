"""proxy.judge.analysis on the signals of users and resources: `feedback_negative_rate`
(negative ratings of a variant's answers) and `output_tokens_ratio` (the canary's mean
output tokens per answer over stable's), judged like the other checks, one time slice
at a time against stable in the same slice."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest

from proxy.config.model import AutoRollout, Checks, ErrorRateCheck, RatioCheck
from proxy.judge.analysis import Evidence, Judgement, Verdict, judge, token_dispersion
from proxy.judge.stats import VariantStats

STEPS = (1.0, 5.0, 10.0, 25.0, 50.0, 100.0)
FEEDBACK = AutoRollout(
    steps=STEPS,
    min_requests=50,
    checks=Checks(feedback_negative_rate=ErrorRateCheck(max_increase=0.05)),
)
TOKENS = AutoRollout(
    steps=STEPS, min_requests=50, checks=Checks(output_tokens_ratio=RatioCheck(max=1.5))
)


def rated(answers: int, ratings: int, negative: int) -> VariantStats:
    """`answers` answered requests, `ratings` of them rated, the first `negative` badly."""
    stats = VariantStats()
    for i in range(answers):
        stats.record(0.1, None, None, None, user=i)
    for i in range(ratings):
        stats.record_feedback(negative=i < negative)
    return stats


def answered(tokens: Iterable[int]) -> VariantStats:
    stats = VariantStats()
    for i, count in enumerate(tokens):
        stats.record(0.5, None, None, int(count), user=i)
    return stats


def gathered(auto: AutoRollout, slices: Iterable[tuple[VariantStats, VariantStats]]) -> Evidence:
    evidence = Evidence.fresh(0)
    for index, (canary, stable) in enumerate(slices, start=1):
        evidence = evidence.added(canary, stable, index, auto)
    return evidence


def check(judgement: Judgement, name: str) -> dict[str, object]:
    (found,) = [c.to_mapping() for c in judgement.checks if c.check == name]
    return found


# --- negative feedback --------------------------------------------------------------------


def test_a_canary_its_users_rate_badly_fails_with_its_numbers() -> None:
    # Stable: 5% of ratings negative; the canary: 30%, 60 ratings a slice.
    slices = [(rated(200, 60, 18), rated(2000, 600, 30)) for _ in range(4)]
    judgement = judge(gathered(FEEDBACK, slices), FEEDBACK)
    assert judgement.verdict is Verdict.FAIL
    result = check(judgement, "feedback_negative_rate")
    assert result["verdict"] == "fail"
    assert result["canary"] == pytest.approx(0.30)
    assert result["stable"] == pytest.approx(0.05)
    assert result["canary_n"] == 240  # ratings, not requests
    assert "negative feedback rate 30.00% (n=240) vs stable 5.00%" in str(result["reason"])
    assert "beyond stable + 5.00%" in str(result["reason"])


def test_a_canary_rated_as_well_as_stable_passes_on_enough_ratings() -> None:
    slices = [(rated(200, 100, 5), rated(2000, 1000, 50)) for _ in range(6)]
    judgement = judge(gathered(FEEDBACK, slices), FEEDBACK)
    assert check(judgement, "feedback_negative_rate")["verdict"] == "pass"
    assert judgement.verdict is Verdict.PASS


def test_without_ratings_the_feedback_check_waits_for_them() -> None:
    # Requests aplenty, nobody rates: the check has no samples, the verdict holds.
    slices = [(rated(500, 0, 0), rated(5000, 0, 0)) for _ in range(5)]
    judgement = judge(gathered(FEEDBACK, slices), FEEDBACK)
    assert judgement.verdict is Verdict.INCONCLUSIVE
    result = check(judgement, "feedback_negative_rate")
    assert result["canary"] is None
    assert "too little data at this step (0 of 50)" in str(result["reason"])


def test_an_absolute_ceiling_on_negative_feedback_fails_a_canary_above_it() -> None:
    auto = AutoRollout(steps=STEPS, checks=Checks(feedback_negative_rate=ErrorRateCheck(max=0.1)))
    slices = [(rated(100, 40, 20), rated(1000, 400, 20)) for _ in range(3)]
    assert judge(gathered(auto, slices), auto).verdict is Verdict.FAIL


# --- output tokens ------------------------------------------------------------------------


def lengths(rng: np.random.Generator, mean: float, n: int) -> list[int]:
    """Answer lengths as LLMs give them: widely spread (a gamma of shape 2, so the
    standard deviation is 70% of the mean), never Poisson-tight."""
    return [max(1, int(x)) for x in rng.gamma(2.0, mean / 2.0, size=n)]


def test_a_canary_answering_twice_as_long_fails_the_ratio() -> None:
    rng = np.random.default_rng(3)
    slices = [(answered(lengths(rng, 400, 40)), answered(lengths(rng, 200, 400))) for _ in range(6)]
    judgement = judge(gathered(TOKENS, slices), TOKENS)
    assert judgement.verdict is Verdict.FAIL
    result = check(judgement, "output_tokens_ratio")
    assert result["window"] == "rollout"
    assert 1.7 < result["canary"] / result["stable"] < 2.3  # type: ignore[operator]
    assert result["limit"] == pytest.approx(1.5 * result["stable"])  # type: ignore[operator]
    assert "output tokens per answer" in str(result["reason"])
    assert "beyond 1.5x stable" in str(result["reason"])


def test_a_canary_answering_as_long_as_stable_passes_the_ratio() -> None:
    rng = np.random.default_rng(4)
    slices = [
        (answered(lengths(rng, 200, 100)), answered(lengths(rng, 200, 1000))) for _ in range(6)
    ]
    judgement = judge(gathered(TOKENS, slices), TOKENS)
    result = check(judgement, "output_tokens_ratio")
    assert result["verdict"] == "pass", result["reason"]
    assert "within 1.5x stable" in str(result["reason"])


def test_a_canary_at_the_ratio_is_rarely_failed() -> None:
    # Exactly 1.5x as long, with lengths far more spread than Poisson counts: without
    # the dispersion the test would fail most such canaries within a few slices.
    rng = np.random.default_rng(5)
    failed = 0
    runs = 60
    for _ in range(runs):
        evidence = Evidence.fresh(0)
        for k in range(15):
            canary = answered(lengths(rng, 300, 30))
            stable = answered(lengths(rng, 200, 300))
            evidence = evidence.added(canary, stable, k + 1, TOKENS)
            if judge(evidence, TOKENS).verdict is Verdict.FAIL:
                failed += 1
                break
    assert failed / runs <= 0.1


def test_token_dispersion_is_the_spread_of_answer_lengths_over_poisson() -> None:
    rng = np.random.default_rng(6)
    poisson = answered(int(x) for x in rng.poisson(200, size=2000))
    assert token_dispersion(poisson, VariantStats(), VariantStats(), VariantStats()) == (
        pytest.approx(1.0, abs=0.15)
    )
    wide = answered(lengths(rng, 200, 2000))  # variance 0.5 mean², over the mean: ~100
    assert 80 < token_dispersion(VariantStats(), wide, poisson, VariantStats()) < 120
    one = answered([150])  # one answer says nothing of spread: its length stands for it
    assert token_dispersion(one, VariantStats(), VariantStats(), VariantStats()) == 150
    assert token_dispersion(*(VariantStats() for _ in range(4))) == 1.0


def test_an_output_tokens_check_passes_where_no_answer_reports_tokens() -> None:
    slices = [(rated(60, 0, 0), rated(600, 0, 0)) for _ in range(2)]
    judgement = judge(gathered(TOKENS, slices), TOKENS)
    assert judgement.verdict is Verdict.PASS
    assert judgement.reason == "output tokens per answer: no answers reporting tokens to judge"


def test_the_new_checks_round_trip_in_evidence() -> None:
    auto = AutoRollout(
        steps=STEPS,
        checks=Checks(
            feedback_negative_rate=ErrorRateCheck(max=0.2, max_increase=0.05),
            output_tokens_ratio=RatioCheck(max=1.5),
        ),
    )
    rng = np.random.default_rng(7)
    canary, stable = answered(lengths(rng, 200, 50)), answered(lengths(rng, 200, 500))
    canary.record_feedback(negative=True)
    stable.record_feedback(negative=False)
    evidence = gathered(auto, [(canary, stable)])
    again = Evidence.from_mapping(evidence.to_mapping())
    assert again == evidence
    assert judge(again, auto) == judge(evidence, auto)
