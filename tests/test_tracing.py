"""Trace context, the sampling decision (against the SDK's own samplers), and finished
spans encoded by the SDK's OTLP encoder, decoded with the official classes."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

from proxy.telemetry.settings import Sampling
from proxy.telemetry.tracing import (
    SpanKind,
    TraceContext,
    finished_span,
    format_traceparent,
    parse_traceparent,
    sample,
    sdk_sampler,
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
    context = sample(VALID, Sampling(0.0))
    assert context is not None
    assert context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert context.parent_span_id == 0xB7AD6B7169203331


def test_an_unsampled_parent_is_never_recorded() -> None:
    assert sample(VALID[:-2] + "00", Sampling(1.0)) is None


def test_without_a_parent_the_ratio_decides() -> None:
    assert all(sample(None, Sampling(1.0)) is not None for _ in range(100))
    assert all(sample(None, Sampling(0.0)) is None for _ in range(100))
    share = sum(sample(None, Sampling(0.1)) is not None for _ in range(20_000)) / 20_000
    assert 0.08 < share < 0.12


@given(
    trace_id=st.integers(min_value=1, max_value=(1 << 128) - 1),
    ratio=st.sampled_from([0.0, 0.01, 0.25, 0.5, 0.999, 1.0]),
    parent_based=st.booleans(),
    parent=st.sampled_from([None, True, False]),
)
def test_the_decision_is_the_sdk_samplers(
    trace_id: int, ratio: float, parent_based: bool, parent: bool | None
) -> None:
    """An unsampled request makes no SDK call, so the proxy decides itself: exactly as
    the SDK sampler for the same policy would."""
    sampling = Sampling(ratio, parent_based)
    sdk = sdk_sampler(sampling)
    if parent is None:
        random.seed(trace_id)
        ours = sample(None, sampling)
        if ours is None:
            return  # the id it drew is gone; the sampled ones are checked below
        context = None
        trace_id = ours.trace_id
    else:
        header = format_traceparent(trace_id, 0x1234, parent)
        ours = sample(header, sampling)
        flags = TraceFlags(TraceFlags.SAMPLED if parent else TraceFlags.DEFAULT)
        remote = SpanContext(trace_id, 0x1234, True, flags)
        context = set_span_in_context(NonRecordingSpan(remote))
    decision = sdk.should_sample(context, trace_id, "span").decision
    assert (ours is not None) == (decision is Decision.RECORD_AND_SAMPLE)


def test_a_span_decodes_with_the_official_classes() -> None:
    trace = TraceContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331)
    span = finished_span(
        Resource({"service.name": "canary-proxy"}),
        InstrumentationScope("canary-proxy", "0.1.0"),
        trace,
        0x1122334455667788,
        trace.parent_span_id,
        "chat llama-3-8b",
        SpanKind.CLIENT,
        1_700_000_000_000_000_000,
        1_700_000_000_500_000_000,
        {
            "canary.route": "chat",
            "canary.bucket": 1234,
            "canary.fallback": False,
            "gen_ai.response.finish_reasons": ("stop", "length"),
            "ratio": 0.25,
        },
        error="timeout",
        events=[
            Event(
                "first_token",
                {"gen_ai.response.time_to_first_chunk": 0.1},
                1_700_000_000_100_000_000,
            )
        ],
    )
    raw = encode_spans([span]).SerializeToString()
    request = ExportTraceServiceRequest.FromString(raw)
    (resource_spans,) = request.resource_spans
    assert resource_spans.resource.attributes[0].value.string_value == "canary-proxy"
    (scope_spans,) = resource_spans.scope_spans
    assert (scope_spans.scope.name, scope_spans.scope.version) == ("canary-proxy", "0.1.0")
    (decoded,) = scope_spans.spans
    assert decoded.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
    assert decoded.span_id.hex() == "1122334455667788"
    assert decoded.parent_span_id.hex() == "b7ad6b7169203331"
    assert decoded.kind == Span.SPAN_KIND_CLIENT
    assert decoded.end_time_unix_nano - decoded.start_time_unix_nano == 500_000_000
    values = {kv.key: kv.value for kv in decoded.attributes}
    assert values["canary.bucket"].int_value == 1234
    assert values["canary.fallback"].HasField("bool_value")
    assert [
        v.string_value for v in values["gen_ai.response.finish_reasons"].array_value.values
    ] == [
        "stop",
        "length",
    ]
    assert values["ratio"].double_value == 0.25
    (event,) = decoded.events
    assert event.name == "first_token"
    assert decoded.status.code == Status.STATUS_CODE_ERROR
    assert decoded.status.message == "timeout"


def test_a_root_span_has_no_parent() -> None:
    trace = TraceContext(1, None)
    span = finished_span(
        Resource({}),
        InstrumentationScope("canary-proxy"),
        trace,
        trace.server_span_id,
        None,
        "POST /v1/",
        SpanKind.SERVER,
        10,
        20,
        {},
    )
    (decoded,) = (
        ExportTraceServiceRequest.FromString(encode_spans([span]).SerializeToString())
        .resource_spans[0]
        .scope_spans[0]
        .spans
    )
    assert decoded.parent_span_id == b""
    assert decoded.kind == Span.SPAN_KIND_SERVER
    assert decoded.status.code == Status.STATUS_CODE_UNSET
