"""The metrics as Prometheus text (parsed by prometheus_client) and as OTLP (decoded)."""

from __future__ import annotations

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from prometheus_client.parser import text_string_to_metric_families

from proxy.telemetry.metrics import Gauges, Metrics, known_method

GAUGES = Gauges(weights={"chat": 12.5}, config_version="abc123def456", fleet_version="0123456789ab")


def recorded() -> Metrics:
    metrics = Metrics(start_time_ns=1_000)
    for _ in range(3):
        metrics.record_attempt("chat", "stable", "v1", "ok", "", 0.2, None)
    metrics.record_attempt("chat", "canary", "v2", "error", "timeout", 60.0, None)
    metrics.record_attempt("chat", "canary", "v2", "ok", "", 1.5, 0.3)
    metrics.record_tokens("chat", "canary", "chat", 12, 300)
    metrics.record_request("POST", 200, "/v1/", 0.25)
    metrics.record_request("BREW", 404, "", 0.001)
    metrics.record_reload("success")
    metrics.record_decision("chat", "pass")
    return metrics


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def test_prometheus_text_parses_and_counts_what_was_recorded() -> None:
    text = recorded().prometheus_text(GAUGES)
    values = samples(text)
    stable_ok = frozenset(
        {
            ("canary_route", "chat"),
            ("canary_variant", "stable"),
            ("canary_backend", "v1"),
            ("outcome", "ok"),
        }
    )
    assert values[("canary_upstream_requests_total", stable_ok)] == 3
    timeout = frozenset(
        {
            ("canary_route", "chat"),
            ("canary_variant", "canary"),
            ("canary_backend", "v2"),
            ("outcome", "error"),
            ("error_type", "timeout"),
        }
    )
    assert values[("canary_upstream_requests_total", timeout)] == 1
    canary = frozenset(
        {("canary_route", "chat"), ("canary_variant", "canary"), ("canary_backend", "v2")}
    )
    assert values[("canary_upstream_duration_seconds_count", canary)] == 2
    assert values[("canary_upstream_duration_seconds_bucket", canary | {("le", "64.0")})] == 2
    assert values[("canary_upstream_duration_seconds_bucket", canary | {("le", "32.0")})] == 1
    assert values[("canary_upstream_duration_seconds_bucket", canary | {("le", "512.0")})] == 2
    assert values[("canary_upstream_ttft_seconds_count", canary)] == 1
    assert values[("canary_weight_percent", frozenset({("canary_route", "chat")}))] == 12.5
    assert (
        values[
            (
                "canary_config_info",
                frozenset(
                    {
                        ("canary_config_version", "abc123def456"),
                        ("canary_fleet_version", "0123456789ab"),
                    }
                ),
            )
        ]
        == 1
    )
    assert values[("canary_config_reloads_total", frozenset({("result", "success")}))] == 1
    other = frozenset(
        {
            ("http_request_method", "_OTHER"),
            ("http_response_status_code", "404"),
            ("http_route", ""),
        }
    )
    assert values[("http_server_request_duration_seconds_count", other)] == 1
    output = frozenset(
        {
            ("canary_route", "chat"),
            ("canary_variant", "canary"),
            ("gen_ai_operation_name", "chat"),
            ("gen_ai_token_type", "output"),
        }
    )
    assert values[("gen_ai_client_token_usage_sum", output)] == 300


def test_histogram_buckets_reach_llm_time_scales() -> None:
    text = recorded().prometheus_text(GAUGES)
    bounds = {
        float(sample.labels["le"])
        for family in text_string_to_metric_families(text)
        if family.name == "canary_upstream_duration_seconds"
        for sample in family.samples
        if "le" in sample.labels
    }
    assert max(b for b in bounds if b != float("inf")) >= 300


def test_label_values_are_escaped() -> None:
    metrics = Metrics(0)
    metrics.record_attempt('we"ird\\route', "stable", "v1", "ok", "", 0.1, None)
    text = metrics.prometheus_text(Gauges({}, "v"))
    routes = {
        sample.labels.get("canary_route")
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert 'we"ird\\route' in routes


def test_otlp_request_decodes_with_the_official_classes() -> None:
    raw = recorded().otlp_request(
        GAUGES, [("service.name", "canary-proxy")], "canary-proxy", "0.1", 5_000
    )
    request = ExportMetricsServiceRequest.FromString(raw)
    (resource_metrics,) = request.resource_metrics
    assert resource_metrics.resource.attributes[0].value.string_value == "canary-proxy"
    (scope_metrics,) = resource_metrics.scope_metrics
    by_name = {metric.name: metric for metric in scope_metrics.metrics}
    assert set(by_name) >= {
        "http.server.request.duration",
        "canary.upstream.duration",
        "canary.upstream.ttft",
        "canary.upstream.requests",
        "gen_ai.client.token.usage",
        "canary.weight",
        "canary.rollout.decisions",
        "canary.config.reloads",
        "canary.config.info",
    }
    requests = by_name["canary.upstream.requests"].sum
    assert requests.is_monotonic
    assert requests.aggregation_temporality == 2
    counts = {
        tuple(sorted((kv.key, kv.value.string_value) for kv in point.attributes)): point.as_double
        for point in requests.data_points
    }
    assert (
        counts[
            (
                ("canary.backend", "v1"),
                ("canary.route", "chat"),
                ("canary.variant", "stable"),
                ("outcome", "ok"),
            )
        ]
        == 3
    )
    duration = by_name["canary.upstream.duration"]
    assert duration.unit == "s"
    points = {
        tuple(sorted((kv.key, kv.value.string_value) for kv in p.attributes)): p
        for p in duration.histogram.data_points
    }
    canary = points[
        (("canary.backend", "v2"), ("canary.route", "chat"), ("canary.variant", "canary"))
    ]
    assert canary.count == 2
    assert sum(canary.bucket_counts) == 2
    assert len(canary.bucket_counts) == len(canary.explicit_bounds) + 1
    assert canary.sum == 61.5
    assert canary.start_time_unix_nano == 1_000
    assert canary.time_unix_nano == 5_000
    (info,) = by_name["canary.config.info"].gauge.data_points
    assert info.as_double == 1
    assert info.attributes[0].value.string_value == "abc123def456"


def test_known_methods_keep_their_name() -> None:
    assert known_method("POST") == "POST"
    assert known_method("post") == "_OTHER"
