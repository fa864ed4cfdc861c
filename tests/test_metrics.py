"""The metrics as /metrics text (parsed by prometheus_client) and as the SDK's MetricsData,
encoded by the SDK's OTLP encoder and decoded with the official classes."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from proxy.config.model import Variant
from proxy.telemetry.metrics import Gauges, Metrics, known_method, metrics_data
from proxy.telemetry.prometheus import render

GAUGES = Gauges(weights={"chat": 12.5}, config_version="abc123def456", fleet_version="0123456789ab")
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def prometheus_text(metrics: Metrics, gauges: Gauges = GAUGES, accept: str = "") -> str:
    body, _ = render(lambda: metrics.snapshot(gauges), accept)
    return body.decode()


def recorded() -> Metrics:
    metrics = Metrics(start_time_ns=1_000)
    for _ in range(3):
        metrics.record_attempt("chat", Variant.STABLE, "v1", "chat", "ok", "", 0.2, None)
    metrics.record_attempt("chat", Variant.CANARY, "v2", "chat", "error", "timeout", 60.0, None)
    metrics.record_attempt("chat", Variant.CANARY, "v2", "chat", "ok", "", 1.5, 0.3, (7, 8))
    metrics.record_tokens("chat", Variant.CANARY, "chat", 12, 300)
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
    text = prometheus_text(recorded())
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
    assert values[("canary_weight_ratio", frozenset({("canary_route", "chat")}))] == 0.125
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
            ("gen_ai_provider_name", "openai"),
            ("gen_ai_token_type", "output"),
        }
    )
    assert values[("gen_ai_client_token_usage_sum", output)] == 300


def test_histogram_buckets_reach_llm_time_scales() -> None:
    text = prometheus_text(recorded())
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
    metrics.record_attempt('we"ird\\route', Variant.STABLE, "v1", None, "ok", "", 0.1, None)
    text = prometheus_text(metrics, Gauges({}, "v"))
    routes = {
        sample.labels.get("canary_route")
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert 'we"ird\\route' in routes


def test_otlp_request_decodes_with_the_official_classes() -> None:
    data = metrics_data(
        recorded().snapshot(GAUGES, now_ns=5_000),
        Resource({"service.name": "canary-proxy"}),
        InstrumentationScope("canary-proxy", "0.1"),
    )
    raw = encode_metrics(data).SerializeToString()
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
        "gen_ai.client.operation.duration",
        "gen_ai.client.operation.time_to_first_chunk",
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
        tuple(sorted((kv.key, kv.value.string_value) for kv in point.attributes)): point.as_int
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
    assert (canary.min, canary.max) == (1.5, 60.0)
    (exemplar,) = canary.exemplars
    assert (exemplar.trace_id.hex(), exemplar.span_id.hex()) == (f"{7:032x}", f"{8:016x}")
    (info,) = by_name["canary.config.info"].gauge.data_points
    assert info.as_double == 1
    assert info.attributes[0].value.string_value == "abc123def456"
    (weight,) = by_name["canary.weight"].gauge.data_points
    assert (by_name["canary.weight"].unit, weight.as_double) == ("1", 0.125)


def test_counters_are_typed_with_total() -> None:
    # Parsers read a counter whose TYPE line lacks `_total` as untyped.
    lines = prometheus_text(recorded()).splitlines()
    assert "# TYPE canary_upstream_requests_total counter" in lines
    assert "# TYPE canary_config_reloads_total counter" in lines


def test_openmetrics_carries_exemplars_with_trace_ids() -> None:
    text = prometheus_text(recorded(), accept=OPENMETRICS)
    assert text.endswith("# EOF\n")
    exemplars = [
        sample.exemplar
        for family in openmetrics_families(text)  # type: ignore[no-untyped-call]
        if family.name == "canary_upstream_duration_seconds"
        for sample in family.samples
        if sample.exemplar is not None
    ]
    # One sampled attempt (1.5 s): its trace is the exemplar of the 2 s bucket only.
    (exemplar,) = exemplars
    assert exemplar.labels == {"trace_id": f"{7:032x}", "span_id": f"{8:016x}"}
    assert exemplar.value == 1.5


def test_known_methods_keep_their_name() -> None:
    assert known_method("POST") == "POST"
    assert known_method("post") == "_OTHER"


def test_each_family_is_the_attempts_merged_by_its_own_labels() -> None:
    metrics = Metrics(0)
    metrics.record_attempt("chat", Variant.CANARY, "v2", "chat", "ok", "", 0.5, 0.1)
    metrics.record_attempt("chat", Variant.CANARY, "v2", "chat", "error", "502", 0.25, None)
    metrics.record_attempt("chat", Variant.CANARY, "v2", "chat", "cancelled", "", 0.125, None)
    metrics.record_attempt("chat", Variant.CANARY, "v2", None, "ok", "", 0.5, None)  # /v1/models
    values = samples(prometheus_text(metrics))
    backend = frozenset(
        {("canary_route", "chat"), ("canary_variant", "canary"), ("canary_backend", "v2")}
    )
    assert values[("canary_upstream_duration_seconds_count", backend)] == 4
    assert values[("canary_upstream_duration_seconds_sum", backend)] == 1.375
    assert values[("canary_upstream_requests_total", backend | {("outcome", "ok")})] == 2
    operation = frozenset(
        {
            ("canary_route", "chat"),
            ("canary_variant", "canary"),
            ("gen_ai_operation_name", "chat"),
            ("gen_ai_provider_name", "openai"),
        }
    )
    # A client that left is no GenAI operation's duration; a path that is no operation neither.
    assert values[("gen_ai_client_operation_duration_seconds_count", operation)] == 1
    failed = operation | {("error_type", "502")}
    assert values[("gen_ai_client_operation_duration_seconds_count", failed)] == 1
    assert values[("gen_ai_client_operation_time_to_first_chunk_seconds_count", operation)] == 1
