"""Trace context, sampling and span encoding, decoded with the official OTLP classes."""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from proxy.telemetry.tracing import (
    SpanKind,
    encode_span,
    export_request,
    format_traceparent,
    parse_traceparent,
    sample,
)

VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (VALID, (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True)),
        (VALID[:-2] + "00", (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, False)),
        (None, None),
        ("", None),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331", None),  # no flags
        ("00-" + "0" * 32 + "-b7ad6b7169203331-01", None),  # zero trace id
        ("00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01", None),  # zero span id
        ("ff" + VALID[2:], None),  # forbidden version
        (VALID.upper(), None),  # upper case is invalid
        (VALID + "-extra", None),  # version 00 has exactly four parts
        (
            "01" + VALID[2:] + "-future",
            (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True),
        ),
        ("00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", None),
    ],
)
def test_parse_traceparent(header: str | None, expected: tuple[int, int, bool] | None) -> None:
    assert parse_traceparent(header) == expected


def test_format_traceparent_round_trips() -> None:
    assert format_traceparent(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True) == VALID
    assert parse_traceparent(format_traceparent(5, 6, False)) == (5, 6, False)


def test_a_sampled_parent_is_always_continued() -> None:
    context = sample(VALID, ratio=0.0)
    assert context is not None
    assert context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert context.parent_span_id == 0xB7AD6B7169203331


def test_an_unsampled_parent_is_never_recorded() -> None:
    assert sample(VALID[:-2] + "00", ratio=1.0) is None


def test_without_a_parent_the_ratio_decides() -> None:
    assert all(sample(None, 1.0) is not None for _ in range(100))
    assert all(sample(None, 0.0) is None for _ in range(100))
    share = sum(sample(None, 0.1) is not None for _ in range(20_000)) / 20_000
    assert 0.08 < share < 0.12


def test_a_span_decodes_with_the_official_classes() -> None:
    body = encode_span(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0x1122334455667788,
        parent_span_id=0xB7AD6B7169203331,
        name="chat llama-3-8b",
        kind=SpanKind.CLIENT,
        start_ns=1_700_000_000_000_000_000,
        end_ns=1_700_000_000_500_000_000,
        pairs=[
            ("canary.route", "chat"),
            ("canary.bucket", 1234),
            ("canary.fallback", False),
            ("gen_ai.request.stream", True),
            ("gen_ai.response.finish_reasons", ["stop", "length"]),
            ("ratio", 0.25),
            ("negative", -5),
        ],
        error="timeout",
        events=[
            (
                1_700_000_000_100_000_000,
                "first_token",
                [("gen_ai.response.time_to_first_chunk", 0.1)],
            )
        ],
    )
    span = Span.FromString(body)
    assert span.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
    assert span.span_id.hex() == "1122334455667788"
    assert span.parent_span_id.hex() == "b7ad6b7169203331"
    assert span.name == "chat llama-3-8b"
    assert span.kind == Span.SPAN_KIND_CLIENT
    assert span.end_time_unix_nano - span.start_time_unix_nano == 500_000_000
    values = {kv.key: kv.value for kv in span.attributes}
    assert values["canary.route"].string_value == "chat"
    assert values["canary.bucket"].int_value == 1234
    assert values["canary.fallback"].HasField("bool_value")
    assert not values["canary.fallback"].bool_value
    assert values["gen_ai.request.stream"].bool_value
    assert [
        v.string_value for v in values["gen_ai.response.finish_reasons"].array_value.values
    ] == [
        "stop",
        "length",
    ]
    assert values["ratio"].double_value == 0.25
    assert values["negative"].int_value == -5
    (event,) = span.events
    assert event.name == "first_token"
    assert event.attributes[0].value.double_value == 0.1
    assert span.status.code == Status.STATUS_CODE_ERROR
    assert span.status.message == "timeout"


def test_a_root_span_has_no_parent() -> None:
    body = encode_span(1, 2, None, "POST /v1/", SpanKind.SERVER, 10, 20, [])
    span = Span.FromString(body)
    assert span.parent_span_id == b""
    assert span.kind == Span.SPAN_KIND_SERVER
    assert not span.HasField("status")


def test_an_export_request_carries_resource_scope_and_spans() -> None:
    spans = [encode_span(1, n, None, f"s{n}", SpanKind.SERVER, 10, 20, []) for n in (1, 2, 3)]
    raw = export_request([("service.name", "canary-proxy")], "canary-proxy", "0.1.0", spans)
    request = ExportTraceServiceRequest.FromString(raw)
    (resource_spans,) = request.resource_spans
    assert resource_spans.resource.attributes[0].key == "service.name"
    assert resource_spans.resource.attributes[0].value.string_value == "canary-proxy"
    (scope_spans,) = resource_spans.scope_spans
    assert (scope_spans.scope.name, scope_spans.scope.version) == ("canary-proxy", "0.1.0")
    assert [span.name for span in scope_spans.spans] == ["s1", "s2", "s3"]
