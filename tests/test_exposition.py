"""Several workers' /metrics as one exposition (proxy.telemetry.exposition), parsed back."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from proxy.judge.histogram import LogHistogram
from proxy.telemetry.exposition import merge_expositions
from proxy.telemetry.metrics import Gauges, Metrics


def worker_text(requests: int, weight: float, version: str) -> str:
    metrics = Metrics(start_time_ns=0)
    for _ in range(requests):
        metrics.record_reload("success")
    histogram = LogHistogram()
    histogram.record(0.25)
    metrics.upstream_duration[("chat", "canary", "v2")] = histogram
    return metrics.prometheus_text(Gauges({"chat": weight}, version))


def families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def test_every_workers_series_is_kept_under_a_worker_label() -> None:
    merged = merge_expositions(
        [("0", worker_text(3, 10.0, "aaa")), ("1", worker_text(5, 20.0, "bbb"))]
    )
    found = families(merged)
    assert sorted(found["canary_config_reloads_total"], key=lambda s: s[0]["worker"]) == [
        ({"worker": "0", "result": "success"}, 3.0),
        ({"worker": "1", "result": "success"}, 5.0),
    ]
    assert sorted(found["canary_weight_percent"], key=lambda s: s[0]["worker"]) == [
        ({"worker": "0", "canary_route": "chat"}, 10.0),
        ({"worker": "1", "canary_route": "chat"}, 20.0),
    ]
    assert {labels["canary_config_version"] for labels, _ in found["canary_config_info"]} == {
        "aaa",
        "bbb",
    }
    counts = found["canary_upstream_duration_seconds_count"]
    assert sorted(labels["worker"] for labels, _ in counts) == ["0", "1"]
    assert all(value == 1.0 for _, value in counts)


def test_each_family_is_declared_once() -> None:
    merged = merge_expositions([(str(n), worker_text(1, 5.0, "v")) for n in range(3)])
    type_lines = [line for line in merged.splitlines() if line.startswith("# TYPE")]
    assert len(type_lines) == len(set(type_lines))
    assert "# TYPE canary_weight_percent gauge" in type_lines
    # Each family's samples follow its own declaration, for all three workers.
    lines = merged.splitlines()
    start = lines.index("# TYPE canary_weight_percent gauge")
    assert [line.split("{")[0] for line in lines[start + 1 : start + 4]] == [
        "canary_weight_percent"
    ] * 3


def test_samples_without_labels_get_the_worker_label() -> None:
    text = "# HELP up Whether it is up.\n# TYPE up gauge\nup 1\n"
    assert merge_expositions([("0", text), ("1", text)]) == (
        '# HELP up Whether it is up.\n# TYPE up gauge\nup{worker="0"} 1\nup{worker="1"} 1\n'
    )


def test_no_workers_give_an_empty_exposition() -> None:
    assert merge_expositions([]) == ""
