"""Window stats per route and variant: slices that sum into any window, and merge."""

from __future__ import annotations

import pytest

from proxy.judge.stats import VariantStats, WindowStats


def test_a_window_sums_the_slices_it_covers() -> None:
    stats = WindowStats(slice_s=5, retention_s=60)
    for second in range(30):
        stats.record("chat", "canary", 1000.0 + second, 0.1, 0.02, None, 10)
    stats.record("chat", "canary", 1029.0, 2.0, None, "timeout", None)
    last_ten = stats.window("chat", "canary", 1020.0, 1029.9)
    assert last_ten.requests == 11
    assert last_ten.errors == 1
    assert last_ten.errors_by_type == {"timeout": 1}
    assert last_ten.output_tokens == 100
    assert last_ten.error_rate == pytest.approx(1 / 11)
    assert stats.window("chat", "stable", 1000.0, 1030.0).requests == 0


def test_old_slices_are_dropped_past_the_retention() -> None:
    stats = WindowStats(slice_s=1, retention_s=10)
    for second in range(100):
        stats.record("chat", "stable", float(second), 0.1, None, None, None)
    kept = list(stats.slices())
    assert len(kept) == 10
    assert stats.window("chat", "stable", 0, 100).requests == 10


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
