"""The log-bucketed histogram: quantiles within 4.4%, exact merges, exact export buckets."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.judge.histogram import EXPORT_BOUNDS_S, LogHistogram

durations = st.floats(min_value=1e-5, max_value=1000, allow_nan=False)


def exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.5) - 1))]


@pytest.mark.parametrize("q", [0.5, 0.9, 0.95, 0.99])
def test_quantiles_are_within_the_bucket_error(q: float) -> None:
    rng = random.Random(4)
    values = [rng.lognormvariate(0, 1.2) for _ in range(20_000)]
    histogram = LogHistogram()
    for value in values:
        histogram.record(value)
    estimate = histogram.quantile(q)
    assert estimate is not None
    assert abs(estimate / exact_quantile(values, q) - 1) < 0.09


def test_an_empty_histogram_has_no_quantile() -> None:
    assert LogHistogram().quantile(0.5) is None


@settings(max_examples=200)
@given(st.lists(durations, max_size=50), st.lists(durations, max_size=50))
def test_merging_equals_recording_everything_in_one(left: list[float], right: list[float]) -> None:
    a, b, both = LogHistogram(), LogHistogram(), LogHistogram()
    for value in left:
        a.record(value)
        both.record(value)
    for value in right:
        b.record(value)
        both.record(value)
    merged = LogHistogram.merged([a, b])
    assert merged.buckets == both.buckets
    assert merged.count == both.count == len(left) + len(right)
    assert merged.sum == pytest.approx(both.sum)


@settings(max_examples=200)
@given(st.lists(durations, min_size=1, max_size=100))
def test_export_buckets_count_exactly_what_is_at_or_below_each_bound(values: list[float]) -> None:
    histogram = LogHistogram()
    for value in values:
        histogram.record(value)
    expected = [sum(1 for v in values if v <= bound) for bound in EXPORT_BOUNDS_S]
    assert histogram.cumulative(EXPORT_BOUNDS_S) == expected


def test_a_value_on_a_bound_counts_at_that_bound() -> None:
    histogram = LogHistogram()
    histogram.record(1.0)
    histogram.record(0.5)
    cumulative = dict(zip(EXPORT_BOUNDS_S, histogram.cumulative(EXPORT_BOUNDS_S), strict=True))
    assert cumulative[0.25] == 0
    assert cumulative[0.5] == 1
    assert cumulative[1.0] == 2


def test_export_bounds_reach_llm_time_scales() -> None:
    assert EXPORT_BOUNDS_S[0] < 0.005
    assert EXPORT_BOUNDS_S[-1] >= 300


def test_zero_and_tiny_values_are_counted() -> None:
    histogram = LogHistogram()
    histogram.record(0.0)
    histogram.record(1e-9)
    assert histogram.count == 2
    assert histogram.cumulative(EXPORT_BOUNDS_S)[0] == 2


def test_round_trips_through_its_plain_form() -> None:
    histogram = LogHistogram()
    for value in (0.01, 0.2, 3.0, 3.0):
        histogram.record(value)
    copy = LogHistogram.from_mapping(histogram.to_mapping())
    assert copy.buckets == histogram.buckets
    assert (copy.count, copy.sum) == (histogram.count, histogram.sum)
