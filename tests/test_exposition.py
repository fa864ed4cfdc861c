"""Several workers' /metrics as one exposition (proxy.telemetry.exposition), parsed back."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from proxy.config.model import Variant
from proxy.telemetry.exposition import WORKER_ACCEPT, merge_expositions
from proxy.telemetry.metrics import Gauges, Metrics
from proxy.telemetry.prometheus import render


def worker_text(requests: int, weight: float, version: str) -> str:
    """A worker's /metrics as the supervisor asks for it (OpenMetrics)."""
    metrics = Metrics(start_time_ns=0)
    for _ in range(requests):
        metrics.record_reload("success")
    metrics.record_attempt("chat", Variant.CANARY, "v2", "chat", "ok", "", 0.25, None, (9, 10))
    body, _ = render(lambda: metrics.snapshot(Gauges({"chat": weight}, version)), WORKER_ACCEPT)
    return body.decode()


def merge(expositions: list[tuple[str, str]], accept: str = "") -> str:
    body, _ = merge_expositions(expositions, accept)
    return body.decode()


def families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def test_every_workers_series_is_kept_under_a_worker_label() -> None:
    merged = merge([("0", worker_text(3, 10.0, "aaa")), ("1", worker_text(5, 20.0, "bbb"))])
    found = families(merged)
    assert sorted(found["canary_config_reloads_total"], key=lambda s: s[0]["worker"]) == [
        ({"worker": "0", "result": "success"}, 3.0),
        ({"worker": "1", "result": "success"}, 5.0),
    ]
    assert sorted(found["canary_weight_ratio"], key=lambda s: s[0]["worker"]) == [
        ({"worker": "0", "canary_route": "chat"}, 0.1),
        ({"worker": "1", "canary_route": "chat"}, 0.2),
    ]
    assert {labels["canary_config_version"] for labels, _ in found["canary_config_info"]} == {
        "aaa",
        "bbb",
    }
    counts = found["canary_upstream_duration_seconds_count"]
    assert sorted(labels["worker"] for labels, _ in counts) == ["0", "1"]
    assert all(value == 1.0 for _, value in counts)


def test_each_family_is_declared_once() -> None:
    merged = merge([(str(n), worker_text(1, 5.0, "v")) for n in range(3)])
    type_lines = [line for line in merged.splitlines() if line.startswith("# TYPE")]
    assert len(type_lines) == len(set(type_lines))
    assert "# TYPE canary_weight_ratio gauge" in type_lines
    assert "# TYPE canary_config_reloads_total counter" in type_lines
    # Each family's samples follow its own declaration, for all three workers.
    lines = merged.splitlines()
    start = lines.index("# TYPE canary_weight_ratio gauge")
    assert [line.split("{")[0] for line in lines[start + 1 : start + 4]] == [
        "canary_weight_ratio"
    ] * 3


def test_exemplars_survive_the_merge_in_openmetrics() -> None:
    merged = merge([("0", worker_text(1, 5.0, "v"))], WORKER_ACCEPT)
    assert 'trace_id="00000000000000000000000000000009"' in merged
    assert merged.endswith("# EOF\n")


def test_samples_without_labels_get_the_worker_label() -> None:
    text = "# HELP up Whether it is up.\n# TYPE up gauge\nup 1\n# EOF\n"
    assert merge([("0", text), ("1", text)]) == (
        '# HELP up Whether it is up.\n# TYPE up gauge\nup{worker="0"} 1.0\nup{worker="1"} 1.0\n'
    )


def test_no_workers_give_an_empty_exposition() -> None:
    assert merge([]) == ""
