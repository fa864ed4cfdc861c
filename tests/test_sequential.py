"""proxy.judge.sequential: the e-processes of the judge, their design effects, and the
fixed-sample helpers (Wilson bounds, histogram exceedances).

The Monte Carlo tests draw from seeded numpy generators with bounded counts (a few
hundred sequences of a few hundred looks), so they are deterministic and take seconds.
A test "ever rejects" when its e-value reaches 1/α at any look: the anytime guarantee
says at most α of the sequences do, under the null, and the set of nulls a sequence has
not rejected is a confidence sequence, so the same count is its miscoverage.
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from proxy.judge.histogram import LogHistogram
from proxy.judge.sequential import (
    EProcess,
    Side,
    above,
    mean_design_effect,
    proportion_design_effect,
    wilson_bounds,
    z_score,
)

ALPHA = 0.05
THRESHOLD = math.log(1 / ALPHA)


def ever_rejects(
    rng: np.random.Generator,
    side: Side,
    rate: float,
    null: float,
    *,
    sequences: int = 400,
    looks: int = 200,
    batch: int = 15,
    design_effect: bool = True,
) -> float:
    """The share of sequences of independent Bernoulli(rate) batches whose test of
    `null` ever reaches 1/α."""
    rejected = 0
    counts = rng.binomial(batch, rate, size=(sequences, looks))
    for row in counts:
        test = EProcess.start(side)
        for events in row:
            test = test.added(float(events), float(batch), null)
            effect = test.design_effect() if design_effect else 1.0
            if test.log_e_value(effect) >= THRESHOLD:
                rejected += 1
                break
    return rejected / sequences


# --- the e-process ----------------------------------------------------------------------


def test_a_new_test_has_no_evidence() -> None:
    for side in Side:
        test = EProcess.start(side)
        assert test.log_e_value() == pytest.approx(0.0)
        assert test.added(0.0, 0.0, 0.5) is test, "a slice without trials changes nothing"
        assert test.design_effect() == 1.0


def test_each_alternative_is_the_bernoulli_likelihood_ratio() -> None:
    # 3 events in 40 trials at a null of 2%: the fail side's log ratios are exactly
    # those of Bernoulli alternatives whose log-odds lie above the null's.
    test = EProcess.start(Side.FAIL).added(3.0, 40.0, 0.02)
    logit = math.log(0.02 / 0.98)
    for ratio, shift in zip(test.log_ratios, (0.125, 0.25, 0.5, 1, 2, 4, 8), strict=True):
        alt = 1 / (1 + math.exp(-(logit + shift)))
        expected = 3 * math.log(alt / 0.02) + 37 * math.log((1 - alt) / 0.98)
        assert ratio == pytest.approx(expected, rel=1e-9)


def test_dispersion_divides_a_slices_evidence() -> None:
    plain = EProcess.start(Side.FAIL).added(5.0, 50.0, 0.02)
    halved = EProcess.start(Side.FAIL).added(5.0, 50.0, 0.02, dispersion=2.0)
    for a, b in zip(plain.log_ratios, halved.log_ratios, strict=True):
        assert b == pytest.approx(a / 2)
    assert halved.dispersion == pytest.approx(2.0)


def test_a_test_round_trips_through_its_list() -> None:
    test = EProcess.start(Side.PASS)
    for events in (0.0, 1.0, 2.5):
        test = test.added(events, 30.0, 0.05, 1.2)
    assert EProcess.from_list(Side.PASS, test.to_list()) == test
    with pytest.raises(ValueError, match="numbers"):
        EProcess.from_list(Side.FAIL, test.to_list())


def test_the_e_value_is_a_weighted_mean_of_the_ratios() -> None:
    test = EProcess.start(Side.FAIL).added(10.0, 100.0, 0.05)
    weights = (0.10, 0.30, 0.30, 0.15, 0.07, 0.05, 0.03)
    expected = sum(w * math.exp(r / 2) for w, r in zip(weights, test.log_ratios, strict=True))
    assert test.log_e_value(2.0) == pytest.approx(math.log(expected))


@pytest.mark.parametrize(
    ("side", "null", "batch"),
    [
        (Side.FAIL, 0.02, 15),  # an error limit
        (Side.PASS, 0.02, 15),
        (Side.FAIL, 0.01, 5),  # a p99: small counts, where a normal approximation over-rejects
        (Side.PASS, 0.05, 5),  # a p95, a few requests a look
    ],
)
def test_a_rate_exactly_at_its_limit_is_rarely_ever_rejected(
    side: Side, null: float, batch: int
) -> None:
    share = ever_rejects(np.random.default_rng(11), side, null, null, batch=batch)
    assert share <= ALPHA + 0.02  # 400 sequences: the binomial sd at 5% is 1.1%


def test_a_null_that_moves_with_time_is_followed_slice_by_slice() -> None:
    # Stable's rate (and so the null) follows the time of day; the canary stays exactly
    # at the limit in every slice. Stratified, the test is no more often wrong.
    rng = np.random.default_rng(5)
    rejected = 0
    for _ in range(300):
        test = EProcess.start(Side.FAIL)
        for look in range(200):
            null = 0.02 * (1 + 0.8 * math.sin(look / 30))
            test = test.added(float(rng.binomial(15, null)), 15.0, null)
            if test.log_e_value(test.design_effect()) >= THRESHOLD:
                rejected += 1
                break
    assert rejected / 300 <= ALPHA + 0.02


def test_a_clear_excess_is_found_and_a_clear_margin_passes() -> None:
    rng = np.random.default_rng(3)
    assert ever_rejects(rng, Side.FAIL, 0.04, 0.02, sequences=100) >= 0.95
    assert ever_rejects(rng, Side.PASS, 0.01, 0.02, sequences=100) >= 0.95


def test_a_canary_failing_everything_is_failed_after_a_few_requests() -> None:
    # One failed request a slice (a canary on 1% of 0.5 req/s fails all it gets).
    test = EProcess.start(Side.FAIL)
    needed = 0
    while test.log_e_value(test.design_effect()) < math.log(65 / ALPHA):
        test = test.added(1.0, 1.0, 0.02)
        needed += 1
    assert needed <= 4


# --- design effects -----------------------------------------------------------------------


def test_time_design_effect_is_about_one_for_independent_slices() -> None:
    rng = np.random.default_rng(1)
    test = EProcess.start(Side.FAIL)
    for events in rng.binomial(50, 0.03, size=300):
        test = test.added(float(events), 50.0, 0.03)
    assert test.design_effect() == pytest.approx(1.0, abs=0.15)


def test_time_design_effect_grows_with_bursts() -> None:
    rng = np.random.default_rng(2)
    test = EProcess.start(Side.FAIL)
    for look in range(300):
        rate = 0.3 if look % 40 == 0 else 0.02  # a burst every 40 slices
        test = test.added(float(rng.binomial(50, rate)), 50.0, 0.03)
    assert test.design_effect() > 3


def test_one_slice_counts_as_one_observation() -> None:
    test = EProcess.start(Side.FAIL).added(30.0, 30.0, 0.02)
    assert test.design_effect() == 30.0


def test_bursty_errors_at_the_limit_are_rarely_rejected_with_the_design_effect() -> None:
    # A healthy canary whose errors come in bursts (as stable's do): overdispersed in
    # time. Without the design effect the test cries wolf; with it, it does not.
    rng = np.random.default_rng(8)

    def share(with_effect: bool) -> float:
        rejected = 0
        for _ in range(200):
            test = EProcess.start(Side.FAIL)
            for _look in range(200):
                bursting = rng.random() < 0.03
                rate = 0.25 if bursting else 0.0137  # mean 0.02, the null
                test = test.added(float(rng.binomial(15, rate)), 15.0, 0.02)
                effect = test.design_effect() if with_effect else 1.0
                if test.log_e_value(effect) >= THRESHOLD:
                    rejected += 1
                    break
        return rejected / 200

    assert share(False) > 0.1
    assert share(True) <= ALPHA + 0.03


def test_proportion_design_effect_of_independent_clusters_is_one() -> None:
    rng = np.random.default_rng(4)
    clusters = [(100.0, float(rng.binomial(100, 0.05))) for _ in range(64)]
    assert proportion_design_effect(clusters) == pytest.approx(1.0, abs=0.25)


def test_one_heavy_user_failing_inflates_the_proportion_design_effect() -> None:
    clusters = [(10.0, 0.0)] * 40 + [(400.0, 400.0)]
    assert proportion_design_effect(clusters) > 50


def test_a_single_cluster_is_one_observation_and_agreement_is_independence() -> None:
    assert proportion_design_effect([(12.0, 12.0)]) == 12.0
    assert proportion_design_effect([(1.0, 1.0)] * 5) == 1.0  # everyone fails alike
    assert proportion_design_effect([]) == 1.0


def test_mean_design_effect_sees_users_with_latencies_of_their_own() -> None:
    rng = np.random.default_rng(6)

    def clusters(user_sigma: float) -> list[tuple[float, float, float]]:
        rows = []
        for _ in range(64):
            values = rng.normal(rng.normal(0, user_sigma), 0.5, size=50)
            rows.append((50.0, float(values.sum()), float((values**2).sum())))
        return rows

    assert mean_design_effect(clusters(0.0)) == pytest.approx(1.0, abs=0.3)
    assert mean_design_effect(clusters(0.5)) > 20
    assert mean_design_effect([(5.0, 5.0, 5.0), (3.0, 3.0, 3.0)]) == 1.0  # all equal


def test_heavy_users_at_the_limit_are_rarely_rejected_with_the_user_design_effect() -> None:
    # A canary's users are a draw from a population whose users have error propensities
    # of their own (a bad prompt, a broken client) and Zipf-like request counts; the
    # population's rate is exactly the null, so the canary is as healthy as stable. With
    # few users, chance can still give it the heavy failing ones: the user design effect
    # keeps the test from taking that for a regression.
    rng = np.random.default_rng(9)
    users = 64
    rate = 0.02
    rejected_with = rejected_without = 0
    for _ in range(200):
        propensity = np.minimum(rng.gamma(0.25, 4.0, size=users) * rate, 1.0)
        share = 1 / np.arange(1, users + 1) ** 1.0
        share /= share.sum()
        test = EProcess.start(Side.FAIL)
        totals = np.zeros((users, 2))
        hit_with = hit_without = False
        for _ in range(100):
            counts = rng.poisson(15 * share)
            errors = rng.binomial(counts, propensity)
            totals += np.column_stack([counts, errors])
            test = test.added(float(errors.sum()), float(counts.sum()), rate)
            effect = max(
                test.design_effect(), proportion_design_effect((t, e) for t, e in totals.tolist())
            )
            hit_with = hit_with or test.log_e_value(effect) >= THRESHOLD
            hit_without = hit_without or test.log_e_value(test.design_effect()) >= THRESHOLD
        rejected_with += hit_with
        rejected_without += hit_without
    assert rejected_without / 200 > 0.1
    assert rejected_with / 200 <= ALPHA + 0.03


# --- fixed-sample helpers -----------------------------------------------------------------


@pytest.mark.parametrize(("confidence", "expected"), [(0.95, 1.6449), (0.99, 2.3263)])
def test_z_score_is_the_one_sided_normal_quantile(confidence: float, expected: float) -> None:
    assert z_score(confidence) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(
    ("events", "trials", "low", "high"),
    [(0, 100, 0.0, 0.0263), (5, 100, 0.0245, 0.0992), (50, 100, 0.4189, 0.5811)],
)
def test_wilson_bounds_match_known_values(
    events: int, trials: int, low: float, high: float
) -> None:
    assert wilson_bounds(events, trials, 0.95) == pytest.approx((low, high), abs=2e-4)
    assert wilson_bounds(0, 0, 0.95) == (0.0, 1.0)


def test_above_interpolates_inside_the_bucket_of_the_threshold() -> None:
    histogram = LogHistogram()
    for value in (0.5, 1.0, 2.0, 4.0):
        histogram.record(value)
    assert above(histogram, 0.0) == 4
    assert above(histogram, 1.0) == pytest.approx(2.0)  # 1.0 is a bucket's upper edge
    assert above(histogram, 100.0) == 0.0
    inside = above(histogram, 2 ** (7.5 / 8))  # half way through the bucket of 2.0
    assert inside == pytest.approx(1.5)


def test_above_falls_continuously_as_the_threshold_rises() -> None:
    rng = random.Random(4)
    histogram = LogHistogram()
    for _ in range(500):
        histogram.record(rng.lognormvariate(0, 0.5))
    thresholds = [0.2 * 1.01**i for i in range(400)]
    counts = [above(histogram, t) for t in thresholds]
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(counts))
    assert max(a - b for a, b in itertools.pairwise(counts)) < 5
