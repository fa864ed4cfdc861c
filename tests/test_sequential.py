"""proxy.judge.sequential: confidence bounds, the always-valid mSPRT, histogram exceedances.

The Monte Carlo tests use a fixed seed and an exact binomial sampler by inversion
(one uniform per batch), so they are deterministic and take a few seconds.
"""

from __future__ import annotations

import bisect
import math
import random
from statistics import NormalDist

import pytest

from proxy.judge.histogram import LogHistogram
from proxy.judge.sequential import (
    above,
    difference_bounds,
    log_mixture_ratio,
    log_mixture_ratio_difference,
    quantile_bounds,
    wilson_bounds,
    z_score,
)

ALPHA = 0.05
LOOKS = 40
BATCH = 50
SEQUENCES = 2000


def binomial(rng: random.Random, n: int, p: float) -> int:
    """An exact Binomial(n, p) draw by inverting its CDF (fast for small n·p)."""
    if p <= 0.0:
        return 0
    if p >= 1.0:
        return n
    u = rng.random()
    pmf = (1.0 - p) ** n
    cdf = pmf
    k = 0
    odds = p / (1.0 - p)
    while u > cdf and k < n:
        pmf *= (n - k) / (k + 1) * odds
        k += 1
        cdf += pmf
    return k


def share_ever_rejecting(p: float, null: float, scale: float, seed: int) -> float:
    """Share of sequences whose one-sample mSPRT ever crosses log(1/α) over the looks."""
    rng = random.Random(seed)
    threshold = math.log(1 / ALPHA)
    rejected = 0
    for _ in range(SEQUENCES):
        events = trials = 0
        for _ in range(LOOKS):
            events += binomial(rng, BATCH, p)
            trials += BATCH
            if log_mixture_ratio(events, trials, null, scale) >= threshold:
                rejected += 1
                break
    return rejected / SEQUENCES


def share_ever_rejecting_difference(
    p_a: float, p_b: float, null: float, scale: float, seed: int
) -> float:
    """Share of sequences whose two-sample mSPRT ever crosses log(1/α) over the looks."""
    rng = random.Random(seed)
    threshold = math.log(1 / ALPHA)
    rejected = 0
    for _ in range(SEQUENCES):
        events_a = events_b = trials = 0
        for _ in range(LOOKS):
            events_a += binomial(rng, BATCH, p_a)
            events_b += binomial(rng, BATCH, p_b)
            trials += BATCH
            if log_mixture_ratio_difference(events_a, trials, events_b, trials, null, scale) >= (
                threshold
            ):
                rejected += 1
                break
    return rejected / SEQUENCES


# --- the binomial sampler the simulations rely on ---------------------------------------


def test_binomial_sampler_has_the_right_mean_and_variance() -> None:
    rng = random.Random(7)
    draws = [binomial(rng, 50, 0.05) for _ in range(20000)]
    mean = sum(draws) / len(draws)
    variance = sum((d - mean) ** 2 for d in draws) / (len(draws) - 1)
    assert mean == pytest.approx(2.5, abs=0.05)
    assert variance == pytest.approx(50 * 0.05 * 0.95, rel=0.05)


# --- z and Wilson -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("confidence", "expected"),
    [(0.95, 1.6448536), (0.975, 1.9599640), (0.99, 2.3263479), (0.5, 0.0)],
)
def test_z_score_is_the_one_sided_normal_quantile(confidence: float, expected: float) -> None:
    assert z_score(confidence) == pytest.approx(expected, abs=1e-6)


# Hand-computed from the Wilson score formula (z = 1.6448536 at 0.95); the 0.975 row is the
# published two-sided 95% Wilson interval for 5/100, (0.0215, 0.1118).
@pytest.mark.parametrize(
    ("events", "trials", "confidence", "lower", "upper"),
    [
        (0, 10, 0.95, 0.0, 0.212942),
        (5, 100, 0.95, 0.024547, 0.099161),
        (50, 100, 0.95, 0.418848, 0.581152),
        (5, 100, 0.975, 0.021544, 0.111750),
        (10, 10, 0.95, 0.787058, 1.0),
    ],
)
def test_wilson_bounds_match_known_values(
    events: int, trials: int, confidence: float, lower: float, upper: float
) -> None:
    low, high = wilson_bounds(events, trials, confidence)
    assert low == pytest.approx(lower, abs=1e-5)
    assert high == pytest.approx(upper, abs=1e-5)


@pytest.mark.parametrize(("events", "trials"), [(1, 10), (5, 100), (50, 100), (3, 1000)])
def test_wilson_bounds_solve_the_score_equation(events: int, trials: int) -> None:
    # Each Wilson bound p solves (p̂ − p)² = z² p (1 − p) / n.
    z = z_score(0.95)
    estimate = events / trials
    for bound in wilson_bounds(events, trials, 0.95):
        assert (estimate - bound) ** 2 == pytest.approx(
            z * z * bound * (1 - bound) / trials, rel=1e-9
        )


def test_wilson_bounds_without_trials_say_nothing() -> None:
    assert wilson_bounds(0, 0, 0.95) == (0.0, 1.0)


@pytest.mark.parametrize(("events", "trials"), [(0, 20), (5, 100), (50, 100), (99, 100)])
def test_wilson_bounds_widen_as_confidence_rises(events: int, trials: int) -> None:
    widths = [
        wilson_bounds(events, trials, c)[1] - wilson_bounds(events, trials, c)[0]
        for c in (0.8, 0.9, 0.95, 0.99, 0.999)
    ]
    assert widths == sorted(widths)
    assert len(set(widths)) == len(widths)


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.5])
def test_wilson_bounds_narrow_as_trials_grow(rate: float) -> None:
    widths = []
    for trials in (20, 100, 1000, 10000):
        low, high = wilson_bounds(round(rate * trials), trials, 0.95)
        assert low <= rate <= high
        widths.append(high - low)
    assert widths == sorted(widths, reverse=True)
    assert len(set(widths)) == len(widths)


# --- Newcombe ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("events_a", "trials_a", "events_b", "trials_b"),
    [(5, 100, 5, 100), (30, 100, 1, 100), (0, 50, 3, 200), (10, 10, 0, 10)],
)
def test_difference_bounds_bracket_the_observed_difference(
    events_a: int, trials_a: int, events_b: int, trials_b: int
) -> None:
    low, high = difference_bounds(events_a, trials_a, events_b, trials_b, 0.95)
    difference = events_a / trials_a - events_b / trials_b
    assert -1.0 <= low <= difference <= high <= 1.0


def test_difference_bounds_without_trials_say_nothing() -> None:
    assert difference_bounds(0, 0, 3, 10, 0.95) == (-1.0, 1.0)
    assert difference_bounds(3, 10, 0, 0, 0.95) == (-1.0, 1.0)


def test_difference_bounds_of_equal_samples_are_symmetric() -> None:
    low, high = difference_bounds(2, 1000, 2, 1000, 0.95)
    assert low == pytest.approx(-high)
    # Newcombe: sqrt((p − l)² + (u − p)²) with both samples' Wilson bounds.
    p = 2 / 1000
    wilson_low, wilson_high = wilson_bounds(2, 1000, 0.95)
    assert high == pytest.approx(math.hypot(wilson_high - p, p - wilson_low))


@pytest.mark.parametrize(
    ("p_a", "p_b", "trials_a", "trials_b"),
    [
        (0.05, 0.05, 200, 200),
        (0.10, 0.02, 300, 300),
        (0.02, 0.01, 500, 1000),
        (0.30, 0.25, 100, 150),
    ],
)
def test_difference_bounds_cover_the_true_difference(
    p_a: float, p_b: float, trials_a: int, trials_b: int
) -> None:
    rng = random.Random(20260101)
    draws = 2000
    truth = p_a - p_b
    upper_held = lower_held = 0
    for _ in range(draws):
        low, high = difference_bounds(
            binomial(rng, trials_a, p_a), trials_a, binomial(rng, trials_b, p_b), trials_b, 0.95
        )
        upper_held += truth <= high
        lower_held += low <= truth
    assert upper_held / draws >= 0.95 - 0.02
    assert lower_held / draws >= 0.95 - 0.02


# --- the mSPRT --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "trials", "null"),
    [(0, 0, 0.05), (0, 100, 0.05), (5, 100, 0.05), (4, 100, 0.05), (50, 100, 0.5)],
)
def test_mixture_ratio_is_zero_at_or_below_the_null(events: int, trials: int, null: float) -> None:
    assert log_mixture_ratio(events, trials, null, scale=0.05) == 0.0


@pytest.mark.parametrize(
    ("events_a", "events_b", "trials", "null"),
    [(5, 5, 100, 0.0), (3, 5, 100, 0.0), (6, 5, 100, 0.01), (0, 0, 100, 0.0), (1, 0, 0, 0.0)],
)
def test_mixture_ratio_difference_is_zero_at_or_below_the_null(
    events_a: int, events_b: int, trials: int, null: float
) -> None:
    assert log_mixture_ratio_difference(events_a, trials, events_b, trials, null, 0.01) == 0.0


def test_mixture_ratio_grows_with_evidence() -> None:
    # The same 10% rate against a 5% null, seen over more and more requests.
    ratios = [log_mixture_ratio(n // 10, n, 0.05, 0.05) for n in (100, 200, 400, 800, 1600)]
    assert ratios == sorted(ratios)
    assert ratios[-1] > math.log(1 / ALPHA) > ratios[0]
    # At a fixed n, a larger excess is stronger evidence.
    by_events = [log_mixture_ratio(k, 400, 0.05, 0.05) for k in (24, 30, 40, 60)]
    assert by_events == sorted(by_events)


def test_mixture_ratio_difference_grows_with_evidence() -> None:
    ratios = [
        log_mixture_ratio_difference(n // 10, n, n // 20, n, 0.0, 0.05)
        for n in (100, 200, 400, 800, 1600)
    ]
    assert ratios == sorted(ratios)
    assert ratios[-1] > math.log(1 / ALPHA) > ratios[0]


def test_mixture_ratio_matches_the_closed_form() -> None:
    # The mean over spreads τ = scale × (0.5, 1, 2, 4, 8) of the one-sided mixture
    # 2 · sqrt(V / (V + τ²)) · exp(τ² d² / (2 V (V + τ²))) · Φ(d τ / sqrt(V (V + τ²))),
    # with V = p0 (1 − p0) / n.
    events, trials, null, scale = 30, 300, 0.05, 0.05
    variance = null * (1 - null) / trials
    excess = events / trials - null
    ratios = []
    for factor in (0.5, 1.0, 2.0, 4.0, 8.0):
        tau2 = (factor * scale) ** 2
        total = variance + tau2
        ratios.append(
            2
            * math.sqrt(variance / total)
            * math.exp(tau2 * excess**2 / (2 * variance * total))
            * NormalDist().cdf(excess * math.sqrt(tau2 / (variance * total)))
        )
    expected = math.log(sum(ratios) / len(ratios))
    assert log_mixture_ratio(events, trials, null, scale) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("p", "scale", "seed"),
    [(0.05, 0.05, 1), (0.05, 0.005, 2), (0.01, 0.01, 3), (0.20, 0.20, 4)],
)
def test_mixture_ratio_is_always_valid_under_the_null(p: float, scale: float, seed: int) -> None:
    # 40 looks of 50 requests at exactly the null rate: crossing log(1/α) at any look
    # must stay within α over the whole sequence (+ Monte Carlo slack).
    assert share_ever_rejecting(p, p, scale, seed) <= ALPHA + 0.01


@pytest.mark.parametrize(
    ("p", "scale", "seed"),
    [(0.05, 0.01, 5), (0.05, 0.05, 6), (0.01, 0.005, 7)],
)
def test_mixture_ratio_difference_is_always_valid_under_the_null(
    p: float, scale: float, seed: int
) -> None:
    assert share_ever_rejecting_difference(p, p, 0.0, scale, seed) <= ALPHA + 0.01


def test_mixture_ratio_has_power_at_twice_the_null() -> None:
    assert share_ever_rejecting(0.10, 0.05, 0.05, seed=8) >= 0.9


def test_mixture_ratio_difference_has_power_at_twice_the_rate() -> None:
    assert share_ever_rejecting_difference(0.10, 0.05, 0.0, 0.05, seed=9) >= 0.9


# --- histograms: exceedances and quantile bounds ----------------------------------------


def histogram_of(*values_s: float) -> LogHistogram:
    histogram = LogHistogram()
    for value in values_s:
        histogram.record(value)
    return histogram


# Bucket i holds (2^(i/8), 2^((i+1)/8)]: bucket 0 is (1, 1.0905], bucket -1 is (0.917, 1],
# bucket 2 is (1.1892, 1.2968], bucket 8 is (2, 2.18]. A threshold of 1.03 sits
# log2(1.03) · 8 = 0.341 of the way up bucket 0 on its log scale: 65.9% of the bucket's
# values are taken as above it.
ABOVE_1_03 = 1 - math.log2(1.03) * 8


@pytest.mark.parametrize(
    ("values_s", "threshold_s", "expected", "surely", "maybe"),
    [
        # A threshold on a bucket edge: the count is exact.
        ((1.0, 1.05), 1.0, 1.0, 1, 1),
        ((0.99, 1.0, 1.02, 1.05, 1.09), 1.0, 3.0, 3, 3),
        ((2.0, 2.1), 2.0, 1.0, 1, 1),
        # A threshold inside bucket 0: its values count by where the threshold sits.
        ((1.02, 1.05), 1.03, 2 * ABOVE_1_03, 0, 2),
        ((1.0, 1.02, 1.05, 1.2), 1.03, 1 + 2 * ABOVE_1_03, 1, 3),
        # Well away from the values.
        ((0.1, 0.2, 0.3), 10.0, 0.0, 0, 0),
        ((0.1, 0.2, 0.3), 0.01, 3.0, 3, 3),
        # Zero or negative thresholds: everything is above.
        ((0.1, 0.2), 0.0, 2.0, 2, 2),
        ((0.1, 0.2), -1.0, 2.0, 2, 2),
    ],
)
def test_above_interpolates_inside_the_bucket_of_the_threshold(
    values_s: tuple[float, ...], threshold_s: float, expected: float, surely: int, maybe: int
) -> None:
    histogram = histogram_of(*values_s)
    count = above(histogram, threshold_s)
    assert isinstance(count, float)
    assert count == pytest.approx(expected, rel=1e-12)
    # Never below what is surely above (whole buckets past the threshold), never above
    # what may be (those and the threshold's bucket), and the truth lies there too.
    truly = sum(value > threshold_s for value in values_s)
    assert surely <= count <= maybe
    assert surely <= truly <= maybe
    if surely == maybe:
        assert count == truly  # exactly, not approximately


@pytest.mark.parametrize("index", [-40, -9, -1, 0, 3, 8, 13])
def test_above_counts_half_a_bucket_from_the_middle_of_its_log_scale(index: int) -> None:
    # 1000 values spread evenly over one bucket's log scale.
    values = [2 ** ((index + (k + 0.5) / 1000) / 8) for k in range(1000)]
    histogram = histogram_of(*values)
    assert set(histogram.buckets) == {index}
    for share in (0.5, 0.25, 0.75, 0.1):
        threshold = 2 ** ((index + share) / 8)
        assert above(histogram, threshold) == pytest.approx(1000 * (1 - share), abs=1e-6)
        assert sum(value > threshold for value in values) == pytest.approx(
            1000 * (1 - share), abs=1
        )
    # Values in buckets further up all count; further down, none.
    histogram.merge(histogram_of(2 ** ((index + 20.5) / 8), 2 ** ((index - 20.5) / 8)))
    assert above(histogram, 2 ** ((index + 0.5) / 8)) == pytest.approx(501, abs=1e-6)


def test_above_is_exact_on_power_of_two_edges_and_close_inside_buckets() -> None:
    rng = random.Random(5)
    values = sorted(rng.lognormvariate(math.log(0.8), 0.6) for _ in range(20000))
    values += [0.5, 1.0, 2.0]  # on edges: they belong to the bucket below (upper bound in)
    values.sort()
    histogram = histogram_of(*values)

    def truly_above(threshold: float) -> int:
        return len(values) - bisect.bisect_right(values, threshold)

    for exponent in range(-6, 5):
        edge = 2.0**exponent
        assert above(histogram, edge) == truly_above(edge)
    # Inside buckets, the interpolated count is off by a small share of the bucket (the
    # density is not log-uniform there), far less than the bucket's half a sure/maybe
    # reading would leave open.
    errors = bucketed = 0.0
    for index in range(-16, 16):
        for share in (0.1, 0.3, 0.5, 0.7, 0.9):
            threshold = 2 ** ((index + share) / 8)
            errors += abs(above(histogram, threshold) - truly_above(threshold))
            bucketed += histogram.buckets.get(index, 0)
    assert errors <= 0.05 * bucketed


def test_above_falls_continuously_as_the_threshold_rises() -> None:
    rng = random.Random(6)
    histogram = histogram_of(*(rng.lognormvariate(0.0, 0.5) for _ in range(2000)))
    thresholds = [2 ** (step / 64) for step in range(-160, 160)]  # 8 points per bucket
    counts = [above(histogram, threshold) for threshold in thresholds]
    assert counts == sorted(counts, reverse=True)
    # No jump at a bucket edge: just under and just over an edge count the same.
    for index in range(-20, 20):
        edge = 2 ** (index / 8)
        assert above(histogram, edge * (1 - 1e-9)) == pytest.approx(
            above(histogram, edge * (1 + 1e-9)), abs=1e-3
        )


def test_quantile_bounds_of_an_empty_histogram_are_unknown() -> None:
    assert quantile_bounds(LogHistogram(), 0.95, 0.95) == (None, None)


def test_quantile_bounds_need_enough_values_for_each_side() -> None:
    # 20 values cannot put a 95% upper bound on a p95: the rank would be past the last.
    low, high = quantile_bounds(histogram_of(*(0.1 * i for i in range(1, 21))), 0.95, 0.95)
    assert high is None
    assert low is not None


def test_quantile_bounds_read_their_ranks_interpolated_inside_buckets() -> None:
    rng = random.Random(2)
    histogram = histogram_of(*(rng.lognormvariate(0.0, 0.6) for _ in range(400)))
    # n = 400, q = 0.95, z = 1.645: n·q ∓ z·sqrt(n·q·(1 − q)) = 380 ∓ 7.17, so the low
    # rank is 372 and the high one ceil(387.17) + 1 = 389.
    low, high = quantile_bounds(histogram, 0.95, 0.95)
    assert low == histogram.quantile(372 / 400)
    assert high == histogram.quantile(389 / 400)
    estimate = histogram.quantile(0.95)
    assert low is not None
    assert high is not None
    assert estimate is not None
    assert low < estimate < high
    # Here both ranks fall inside their buckets: the bounds are not bucket edges.
    for bound in (low, high):
        position = math.log2(bound) * 8
        assert abs(position - round(position)) > 1e-6


@pytest.mark.parametrize(
    ("n", "q", "most"),
    [
        (400, 0.95, 0.995),
        (200, 0.5, 0.995),
        # Few values above a p99 of 1000: the rounded-up rank makes the high side looser.
        (1000, 0.99, 1.0),
    ],
)
def test_quantile_bounds_bracket_the_true_quantile(n: int, q: float, most: float) -> None:
    rng = random.Random(42)
    mu, sigma = math.log(0.8), 0.6
    truth = math.exp(mu + sigma * NormalDist().inv_cdf(q))
    samples = 400
    low_held = high_held = 0
    for _ in range(samples):
        histogram = histogram_of(*(rng.lognormvariate(mu, sigma) for _ in range(n)))
        low, high = quantile_bounds(histogram, q, 0.95)
        assert low is not None
        assert high is not None
        estimate = histogram.quantile(q)
        assert estimate is not None
        assert low <= estimate <= high
        low_held += low <= truth
        high_held += truth <= high
    # Each side is a one-sided 95% bound, read interpolated inside its bucket: its
    # coverage is near 95%, neither clearly under it nor needlessly over it.
    for held in (low_held, high_held):
        assert 0.95 - 0.03 <= held / samples <= most
