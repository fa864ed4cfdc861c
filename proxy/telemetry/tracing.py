"""W3C trace context, parent-based sampling, and spans written as OTLP. Pure.

Rules:
1. An incoming `traceparent` is honoured: its trace continues and its sampled flag
   decides (parent-based). Without one, a new trace is sampled when the low 64 bits
   of its id fall under `ratio * 2^64`, OpenTelemetry's `TraceIdRatioBased`, so every
   replica decides the same way for the same trace.
2. An unsampled request builds nothing: no ids, no attributes, no span.
3. A span is encoded to its OTLP `Span` message when it ends; the exporter only
   concatenates them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from enum import IntEnum
from typing import Final

from proxy.telemetry.otlp_wire import (
    AttributeValue,
    attribute,
    attributes,
    field_bytes,
    field_fixed64,
    field_varint,
    resource,
    scope,
)

__all__ = [
    "SpanKind",
    "TraceContext",
    "encode_span",
    "export_request",
    "format_traceparent",
    "new_span_id",
    "parse_traceparent",
    "sample",
]

_MASK_64: Final = (1 << 64) - 1
_HEX: Final = frozenset("0123456789abcdef")
_getrandbits = random.getrandbits  # as the OpenTelemetry SDK's RandomIdGenerator


class SpanKind(IntEnum):
    INTERNAL = 1
    SERVER = 2
    CLIENT = 3


class TraceContext:
    """The trace a sampled request belongs to, and its server span."""

    __slots__ = ("parent_span_id", "server_span_id", "start_ns", "trace_id")

    def __init__(self, trace_id: int, parent_span_id: int | None) -> None:
        self.trace_id = trace_id
        self.parent_span_id = parent_span_id
        self.server_span_id = new_span_id()
        self.start_ns = time.time_ns()


def parse_traceparent(header: str | None) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) from a W3C traceparent; None when invalid."""
    if header is None or len(header) < 55:
        return None
    header = header.strip()
    version, trace_hex, span_hex, flags = (header[0:2], header[3:35], header[36:52], header[53:55])
    if header[2] != "-" or header[35] != "-" or header[52] != "-":
        return None
    if version == "ff" or (version == "00" and len(header) != 55):
        return None
    if not _HEX.issuperset(version + trace_hex + span_hex + flags):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if trace_id == 0 or span_id == 0:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def new_span_id() -> int:
    return _getrandbits(64) or 1


def sample(traceparent: str | None, ratio: float) -> TraceContext | None:
    """The trace to record this request in, or None when it is not sampled."""
    parent = parse_traceparent(traceparent)
    if parent is not None:
        trace_id, parent_span_id, sampled = parent
        return TraceContext(trace_id, parent_span_id) if sampled else None
    if ratio <= 0.0:
        return None
    trace_id = _getrandbits(128) or 1
    if ratio < 1.0 and (trace_id & _MASK_64) >= round(ratio * (1 << 64)):
        return None
    return TraceContext(trace_id, None)


def encode_span(
    trace_id: int,
    span_id: int,
    parent_span_id: int | None,
    name: str,
    kind: SpanKind,
    start_ns: int,
    end_ns: int,
    pairs: Sequence[tuple[str, AttributeValue]],
    *,
    encoded_attributes: bytes = b"",
    error: str | None = None,
    events: Sequence[tuple[int, str, Sequence[tuple[str, AttributeValue]]]] = (),
) -> bytes:
    """An OTLP `Span` message body; `encoded_attributes` are more attributes, already encoded."""
    parts = [
        field_bytes(1, trace_id.to_bytes(16, "big")),
        field_bytes(2, span_id.to_bytes(8, "big")),
    ]
    if parent_span_id is not None:
        parts.append(field_bytes(4, parent_span_id.to_bytes(8, "big")))
    parts.append(field_bytes(5, name.encode()))
    parts.append(field_varint(6, kind))
    parts.append(field_fixed64(7, start_ns))
    parts.append(field_fixed64(8, end_ns))
    parts.append(encoded_attributes)
    parts.append(attributes(9, pairs))
    for time_ns, event_name, event_pairs in events:
        body = field_fixed64(1, time_ns) + field_bytes(2, event_name.encode())
        body += b"".join(attribute(3, k, v) for k, v in event_pairs)
        parts.append(field_bytes(11, body))
    if error is not None:
        # Status{message, code: ERROR}
        parts.append(field_bytes(15, field_bytes(2, error.encode()) + field_varint(3, 2)))
    return b"".join(parts)


def export_request(
    resource_pairs: Sequence[tuple[str, AttributeValue]],
    scope_name: str,
    scope_version: str,
    spans: Sequence[bytes],
) -> bytes:
    """An `ExportTraceServiceRequest` with one resource and one scope."""
    scope_spans = field_bytes(1, scope(scope_name, scope_version)) + b"".join(
        field_bytes(2, span) for span in spans
    )
    resource_spans = field_bytes(1, resource(resource_pairs)) + field_bytes(2, scope_spans)
    return field_bytes(1, resource_spans)
