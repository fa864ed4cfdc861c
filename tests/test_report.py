"""proxy.judge.report: every signal of two variants compared, with intervals that cover
what they claim, widen for heavy users, and say nothing where there is no data."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from proxy.judge.report import compare, format_report, variant_summary
from proxy.judge.stats import VariantStats


def counted(requests: int, errors: int, users: int | None = None) -> VariantStats:
    """`requests` at 100 ms, the first `errors` failing; users: one each, or `users`
    users taking the requests in turn."""
    stats = VariantStats()
    for i in range(requests):
        user = i if users is None else i % users
        stats.record(0.1, None, "500" if i < errors else None, None, user=user * 7919)
    return stats


def timed(latencies: Any, tokens: Any = None) -> VariantStats:
    stats = VariantStats()
    for i, latency in enumerate(latencies):
        count = None if tokens is None else int(tokens[i])
        stats.record(float(latency), float(latency) / 4, None, count, user=i * 7919)
    return stats


def signal(signals: Any, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [s.to_mapping() for s in signals if s.name == name]
    assert len(found) == 1
    return found[0]


def test_a_difference_of_rates_has_newcombes_interval() -> None:
    # Newcombe (1998), table II, example (a): 56/70 against 48/80, method 10:
    # difference 0.2, interval 0.0524 to 0.3339. Independent requests: no user effect.
    canary, stable = VariantStats(), VariantStats()
    canary.requests, canary.errors = 70, 56
    stable.requests, stable.errors = 80, 48
    found = signal(compare(canary, stable, 0.95), "error_rate")
    assert found["compare"] == "difference"
    difference = found["difference"]
    assert difference["value"] == pytest.approx(0.2)
    assert difference["low"] == pytest.approx(0.0524, abs=5e-4)
    assert difference["high"] == pytest.approx(0.3339, abs=5e-4)
    assert (found["canary"]["n"], found["stable"]["n"]) == (70, 80)


def test_rate_intervals_cover_the_true_difference_as_often_as_they_say() -> None:
    rng = np.random.default_rng(11)
    covered = 0
    runs = 300
    for _ in range(runs):
        canary, stable = VariantStats(), VariantStats()
        canary.requests, canary.errors = 400, int(rng.binomial(400, 0.03))
        stable.requests, stable.errors = 4000, int(rng.binomial(4000, 0.01))
        difference = signal(compare(canary, stable, 0.9), "error_rate")["difference"]
        covered += difference["low"] <= 0.02 <= difference["high"]
    assert 0.86 <= covered / runs <= 0.95


def test_errors_of_one_heavy_user_widen_the_interval() -> None:
    spread_out = signal(compare(counted(2000, 60), counted(2000, 20), 0.95), "error_rate")
    # The same counts, but 60 users each sending ~33 requests, the errors all theirs
    # in a few clusters: the sample is worth fewer users than requests.
    heavy = VariantStats()
    for i in range(2000):
        heavy.record(0.1, None, "500" if i < 60 else None, None, user=0 if i < 60 else i)
    clustered = signal(compare(heavy, counted(2000, 20), 0.95), "error_rate")
    width = spread_out["difference"]["high"] - spread_out["difference"]["low"]
    wider = clustered["difference"]["high"] - clustered["difference"]["low"]
    assert clustered["difference"]["value"] == spread_out["difference"]["value"]
    assert wider > 2 * width


def test_quantiles_are_compared_as_ratios_with_intervals() -> None:
    rng = np.random.default_rng(12)
    stable = timed(rng.lognormal(np.log(0.2), 0.5, size=4000))
    canary = timed(rng.lognormal(np.log(0.4), 0.5, size=1000))
    signals = compare(canary, stable, 0.95)
    for name in ("latency_p50", "latency_p95", "ttft_p50", "ttft_p99"):
        found = signal(signals, name)
        ratio = found["ratio"]
        assert found["unit"] == "seconds"
        assert ratio["low"] < ratio["value"] < ratio["high"]
        assert 1.6 < ratio["value"] < 2.5, name
        assert ratio["low"] > 1.0, name  # clearly slower
    p50 = signal(signals, "latency_p50")["canary"]
    assert p50["low"] < 0.4 < p50["high"]
    assert p50["n"] == 1000
    # No streams of two tokens: no time per token on either side, so no comparison.
    tpot = signal(signals, "tpot_p95")
    assert tpot["canary"]["value"] is None
    assert tpot["ratio"] == {"value": None, "low": None, "high": None, "n": 0}


def test_output_tokens_and_their_speed_are_compared_as_ratios() -> None:
    rng = np.random.default_rng(13)
    stable = timed(np.full(2000, 1.0), rng.poisson(100, size=2000))
    canary = timed(np.full(500, 1.0), rng.poisson(200, size=500))
    signals = compare(canary, stable, 0.95)
    per_answer = signal(signals, "output_tokens_per_answer")
    assert per_answer["canary"]["value"] == pytest.approx(200, rel=0.03)
    assert per_answer["canary"]["low"] < 200 < per_answer["canary"]["high"]
    assert per_answer["ratio"]["low"] < 2.0 < per_answer["ratio"]["high"]
    assert per_answer["ratio"]["high"] - per_answer["ratio"]["low"] < 0.1
    speed = signal(signals, "output_tokens_per_s")
    assert speed["unit"] == "tokens/s"
    assert speed["ratio"]["low"] < 2.0 < speed["ratio"]["high"]
    # One answer of each: a figure, no interval.
    one = signal(compare(timed([1.0], [50]), timed([1.0], [25]), 0.95), "output_tokens_per_s")
    assert (one["ratio"]["value"], one["ratio"]["low"]) == (2.0, None)


def test_a_variant_without_data_has_no_figure_and_no_comparison() -> None:
    signals = compare(VariantStats(), counted(100, 1), 0.95)
    found = signal(signals, "error_rate")
    assert found["stable"]["value"] == 0.01
    assert found["canary"] == {"value": None, "low": None, "high": None, "n": 0}
    assert found["difference"]["value"] is None
    feedback = signal(signals, "feedback_negative_rate")
    assert feedback["stable"]["value"] is None  # nobody rated
    assert variant_summary(counted(100, 1, users=10)) == {
        "requests": 100,
        "user_clusters": 10,
        "token_answers": 0,
        "feedback": 0,
    }


def test_the_report_prints_as_a_table() -> None:
    canary, stable = counted(300, 9), counted(3000, 30)
    canary.record_feedback(negative=True)
    stable.record_feedback(negative=False)
    document = {
        "headline": "route chat: canary v2 at 10% (progressing)",
        "intervals": "[low, high]: two-sided 95% intervals",
        "variants": {"stable": variant_summary(stable), "canary": variant_summary(canary)},
        "signals": [s.to_mapping() for s in compare(canary, stable, 0.95)],
    }
    text = format_report(document)
    lines = text.splitlines()
    assert lines[0] == "route chat: canary v2 at 10% (progressing)"
    assert lines[1].split() == ["stable", "canary", "canary", "vs", "stable"]
    (errors,) = [line for line in lines if line.startswith("error rate")]
    assert "1.00% [" in errors
    assert "3.00% [" in errors
    assert "+2.00pp [" in errors
    (latency,) = [line for line in lines if line.startswith("p50 latency")]
    assert "x1.000" in latency
    assert "101ms [" in latency  # 100 ms, read from its 9% bucket
    (tokens,) = [line for line in lines if line.startswith("output tokens per answer")]
    assert tokens.split()[-3:] == ["-", "-", "-"]
    assert lines[-1] == "[low, high]: two-sided 95% intervals"
