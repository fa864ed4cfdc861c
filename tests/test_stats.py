"""Window stats per route and variant: slices that sum into any window, and merge."""

from __future__ import annotations

import json
import math

import pytest

from proxy.config.model import Variant
from proxy.judge.stats import (
    CLUSTERS,
    USER_CANCELS,
    USER_ERRORS,
    USER_LOG_SQUARES,
    USER_LOG_SUM,
    USER_REQUESTS,
    VariantStats,
    WindowStats,
)


def test_a_window_sums_the_slices_it_covers() -> None:
    stats = WindowStats(slice_s=5, retention_s=60)
    for second in range(30):
        stats.record("chat", Variant.CANARY, 1000.0 + second, 0.1, 0.02, None, 10)
    stats.record("chat", Variant.CANARY, 1029.0, 2.0, None, "timeout", None)
    last_ten = stats.window("chat", Variant.CANARY, 1020.0, 1029.9)
    assert last_ten.requests == 11
    assert last_ten.errors == 1
    assert last_ten.errors_by_type == {"timeout": 1}
    assert last_ten.output_tokens == 100
    assert last_ten.error_rate == pytest.approx(1 / 11)
    assert stats.window("chat", Variant.STABLE, 1000.0, 1030.0).requests == 0


def test_old_slices_are_dropped_past_the_retention() -> None:
    stats = WindowStats(slice_s=1, retention_s=10)
    for second in range(100):
        stats.record("chat", Variant.STABLE, float(second), 0.1, None, None, None)
    kept = list(stats.slices())
    assert len(kept) == 10
    assert stats.window("chat", Variant.STABLE, 0, 100).requests == 10


def test_summary_reads_quantiles_in_seconds() -> None:
    variant = VariantStats()
    for ms in range(1, 101):
        variant.record(ms / 1000, ms / 10_000, None, None)
    summary = variant.summary()
    latency = summary["latency_s"]
    assert isinstance(latency, dict)
    assert latency["p50"] == pytest.approx(0.050, rel=0.09)
    assert latency["p99"] == pytest.approx(0.099, rel=0.09)
    assert summary["error_rate"] == 0.0


def test_an_empty_variant_has_no_rate_and_no_quantiles() -> None:
    summary = VariantStats().summary()
    assert summary["error_rate"] is None
    assert summary["cancel_rate"] is None
    assert summary["latency_s"] == {"p50": None, "p95": None, "p99": None}


def test_stats_of_two_processes_merge_into_those_of_both() -> None:
    one, two, both = VariantStats(), VariantStats(), VariantStats()
    for i in range(50):
        error = "500" if i % 10 == 0 else None
        (one if i % 2 else two).record(i / 100 + 0.01, None, error, 3)
        both.record(i / 100 + 0.01, None, error, 3)
    merged = VariantStats.from_mapping(one.to_mapping())
    merged.merge(VariantStats.from_mapping(two.to_mapping()))
    assert merged.summary() == both.summary()


def test_a_cancel_counts_as_a_request_with_its_latency_and_not_as_an_error() -> None:
    variant = VariantStats()
    variant.record(2.0, None, None, None, cancelled=True, user=3)
    variant.record(0.5, 0.1, "500", None, cancelled=True, user=3)  # an error wins
    variant.record(0.5, 0.1, None, 20, user=4)
    assert (variant.requests, variant.errors, variant.cancels) == (3, 1, 1)
    assert variant.latency.count == 3
    assert variant.error_rate == pytest.approx(1 / 2)  # a cancel is not a trial
    assert variant.cancel_rate == pytest.approx(1 / 3)
    summary = variant.summary()
    assert (summary["cancels"], summary["cancel_rate"]) == (1, pytest.approx(1 / 3))


def test_time_per_output_token_is_read_from_streams_of_two_tokens_or_more() -> None:
    variant = VariantStats()
    variant.record(2.1, 0.1, None, 101)  # 100 tokens after the first in 2 s
    variant.record(1.0, None, None, 50)  # not a stream: no first token time
    variant.record(0.3, 0.1, None, 1)  # one token: nothing after the first
    variant.record(1.0, 0.1, None, 40, cancelled=True)  # cut short by its client
    assert variant.tpot.count == 1
    assert variant.tpot.quantile(0.5) == pytest.approx(0.02, rel=0.05)
    assert variant.summary()["tpot_s"]["p50"] == pytest.approx(0.02, rel=0.05)  # type: ignore[index]


def test_users_are_summed_by_cluster_of_their_bucket() -> None:
    variant = VariantStats()
    variant.record(math.e, None, "500", None, user=5)
    variant.record(1.0, None, None, None, cancelled=True, user=5 + CLUSTERS)  # same cluster
    variant.record(1.0, None, None, None, user=6)
    variant.record(1.0, None, None, None)  # no user given: counted nowhere by user
    row = variant.users[5]
    assert row[USER_REQUESTS] == 2
    assert (row[USER_ERRORS], row[USER_CANCELS]) == (1, 1)
    assert row[USER_LOG_SUM] == pytest.approx(1.0)
    assert row[USER_LOG_SQUARES] == pytest.approx(1.0)
    assert set(variant.users) == {5, 6}


def test_user_sums_merge_and_round_trip() -> None:
    one, two, both = VariantStats(), VariantStats(), VariantStats()
    for i in range(200):
        args = (0.1 + i / 1000, 0.05 if i % 2 else None, "500" if i % 7 == 0 else None, 12)
        (one if i % 3 else two).record(*args, cancelled=i % 11 == 0, user=i * 37)
        both.record(*args, cancelled=i % 11 == 0, user=i * 37)
    merged = VariantStats.from_mapping(json.loads(json.dumps(one.to_mapping())))
    merged.merge(VariantStats.from_mapping(two.to_mapping()))
    assert merged.to_mapping().keys() == both.to_mapping().keys()
    assert merged.summary() == both.summary()
    assert merged.users.keys() == both.users.keys()
    for cluster, row in both.users.items():
        assert merged.users[cluster] == pytest.approx(row)
    without = VariantStats()
    without.merge(both, users=False)
    assert without.users == {}
    assert without.requests == both.requests


def test_stats_published_before_cancels_and_users_were_kept_still_load() -> None:
    old = VariantStats()
    old.record(0.2, None, None, 3)
    mapping = old.to_mapping()
    for key in ("cancels", "tpot", "users"):
        del mapping[key]
    loaded = VariantStats.from_mapping(mapping)
    assert (loaded.requests, loaded.cancels, loaded.tpot.count, loaded.users) == (1, 0, 0, {})


def test_slices_written_before_feedback_and_token_counts_still_load() -> None:
    new = VariantStats()
    new.record(0.5, None, None, 40)
    new.record_feedback(negative=True)
    old_format = {
        key: value
        for key, value in new.to_mapping().items()
        if key
        not in (
            "token_answers",
            "token_seconds",
            "token_squares",
            "token_seconds_squares",
            "token_cross",
            "feedback",
            "feedback_negative",
        )
    }
    old = VariantStats.from_mapping(old_format)
    assert (old.requests, old.output_tokens, old.feedback, old.token_answers) == (1, 40, 0, 0)
    summary = old.summary()
    assert summary["output_tokens_per_request"] is None
    assert summary["feedback_negative_rate"] is None
    old.merge(VariantStats.from_mapping(new.to_mapping()))
    assert (old.feedback, old.feedback_negative, old.token_answers) == (1, 1, 1)
    assert old.output_tokens_per_request == 80
    assert old.output_tokens_per_s == pytest.approx(80 / 0.5)
    assert old.token_squares == 40 * 40  # the new slice's answer only
    assert (old.token_seconds_squares, old.token_cross) == (0.25, 20.0)
