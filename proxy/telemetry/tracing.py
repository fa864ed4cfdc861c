"""W3C trace context, the sampling decision, and finished spans as the SDK's `ReadableSpan`.

Rules:
1. An incoming `traceparent` is honoured: its trace continues. With a parent-based
   sampler its sampled flag decides; otherwise, and for a new trace, the trace id
   decides: sampled when its low 64 bits fall under `ratio * 2^64`, exactly
   OpenTelemetry's `TraceIdRatioBased`, so every replica decides alike for one trace.
2. The decision is made here, not by the SDK: an unsampled request makes no SDK
   call and builds nothing (no ids, no attributes, no span). `sdk_sampler` is the
   same policy as an SDK sampler, for the spans the SDK's tracer makes itself.
3. A sampled request's spans are built once, when they end, as `ReadableSpan`s
   with their attributes complete, and handed to the span processor.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from typing import Final

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import AttributeValue

from proxy.telemetry.settings import Sampling

__all__ = [
    "AttributeValue",
    "SpanKind",
    "TraceContext",
    "finished_span",
    "format_traceparent",
    "new_span_id",
    "parse_traceparent",
    "sample",
    "sdk_sampler",
]

_MASK_64: Final = (1 << 64) - 1
_HEX: Final = frozenset("0123456789abcdef")
_getrandbits = random.getrandbits  # as the OpenTelemetry SDK's RandomIdGenerator
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_UNSET: Final = Status(StatusCode.UNSET)


class TraceContext:
    """The trace a sampled request belongs to, and its server span."""

    __slots__ = ("parent_remote", "parent_span_id", "server_span_id", "start_ns", "trace_id")

    def __init__(self, trace_id: int, parent_span_id: int | None) -> None:
        self.trace_id = trace_id
        self.parent_span_id = parent_span_id
        self.parent_remote = parent_span_id is not None
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


def _under(trace_id: int, ratio: float) -> bool:
    """TraceIdRatioBased's decision for this trace id."""
    return (trace_id & _MASK_64) < round(ratio * (_MASK_64 + 1))


def sample(traceparent: str | None, sampling: Sampling) -> TraceContext | None:
    """The trace to record this request in, or None when it is not sampled."""
    parent = parse_traceparent(traceparent)
    if parent is not None:
        trace_id, parent_span_id, sampled = parent
        if sampling.parent_based:
            return TraceContext(trace_id, parent_span_id) if sampled else None
        return TraceContext(trace_id, parent_span_id) if _under(trace_id, sampling.ratio) else None
    ratio = sampling.ratio
    if ratio <= 0.0:
        return None
    trace_id = _getrandbits(128) or 1
    if ratio < 1.0 and not _under(trace_id, ratio):
        return None
    return TraceContext(trace_id, None)


def sdk_sampler(sampling: Sampling) -> Sampler:
    """The SDK sampler that decides as `sample` does."""
    if sampling.ratio >= 1.0:
        root: Sampler = ALWAYS_ON
    elif sampling.ratio <= 0.0:
        root = ALWAYS_OFF
    else:
        root = TraceIdRatioBased(sampling.ratio)
    return ParentBased(root) if sampling.parent_based else root


def finished_span(
    resource: Resource,
    scope: InstrumentationScope,
    trace: TraceContext,
    span_id: int,
    parent_span_id: int | None,
    name: str,
    kind: SpanKind,
    start_ns: int,
    end_ns: int,
    attributes: Mapping[str, AttributeValue],
    *,
    error: str | None = None,
    events: Sequence[Event] = (),
) -> ReadableSpan:
    """A finished span of a sampled request, ready for the span processor."""
    trace_id = trace.trace_id
    parent = None
    if parent_span_id is not None:
        remote = parent_span_id == trace.parent_span_id and trace.parent_remote
        parent = SpanContext(trace_id, parent_span_id, remote, _SAMPLED)
    return ReadableSpan(
        name,
        SpanContext(trace_id, span_id, False, _SAMPLED),
        parent,
        resource,
        attributes,
        events,
        (),
        kind,
        None,
        _UNSET if error is None else Status(StatusCode.ERROR, error),
        start_ns,
        end_ns,
        scope,
    )
