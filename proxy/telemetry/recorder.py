"""What each request and backend attempt did, turned into stats, metrics and spans.

The forwarding code fills one `Exchange` per request and one `Attempt` per backend
attempt, and hands them over when they end; nothing here does I/O. Spans go to a
bounded queue that the exporter (`proxy.telemetry.exporter`) drains.

Rules:
1. Every attempt feeds the window stats (what the status page and the rollout judge
   read) and the metrics, from the same numbers: an attempt's error is what SPEC §5
   counts as a backend error; a client that went away is `cancelled`, not an error.
2. Only a sampled request builds span attributes; an unsampled one costs a dict
   increment or two per attempt.
3. No attribute carries a user key or prompt text: key sources are named
   (`header:x-user-id`), never their values; the client's address and the query string
   (either may be the key) are not recorded.
4. The span queue is bounded: when the collector is down or slow, spans are dropped
   and counted, and requests never wait.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import deque
from typing import Final

from proxy import __version__
from proxy.apis.answer import AnswerFacts, read_facts, request_model
from proxy.config.model import Config, Variant
from proxy.judge.stats import RETENTION_S, WindowStats
from proxy.rollout.machine import Decision
from proxy.routing.assignment import Assignment
from proxy.telemetry.metrics import Gauges, Metrics
from proxy.telemetry.otlp_wire import AttributeValue, attributes
from proxy.telemetry.tracing import SpanKind, TraceContext, encode_span, new_span_id, sample

__all__ = ["SCOPE", "Attempt", "Exchange", "Recorder", "operation_of"]

SCOPE: Final = "canary-proxy"
_SPAN_QUEUE: Final = 8192
_BATCH: Final = 512
_STATIC_BLOCKS: Final = 1024


def operation_of(path: str) -> str | None:
    """The GenAI operation of an OpenAI-style path, None for anything else."""
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/completions"):
        return "text_completion"
    if path.endswith("/embeddings"):
        return "embeddings"
    return None


class Attempt:
    """One backend attempt, as the forwarding code saw it."""

    __slots__ = (
        "backend",
        "cancelled",
        "error_type",
        "event_stream",
        "fallback",
        "first_byte_at",
        "host",
        "port",
        "route",
        "span_id",
        "started",
        "status",
        "tail",
        "variant",
    )

    def __init__(
        self, route: str, variant: Variant, backend: str, started: float, span_id: int | None
    ) -> None:
        self.route = route
        self.variant = variant
        self.backend = backend
        self.started = started
        self.span_id = span_id
        self.first_byte_at: float | None = None
        self.status: int | None = None
        self.error_type: str | None = None
        self.event_stream = False
        self.tail = b""  # the answer's last bytes, where its usage and end are
        self.cancelled = False
        self.fallback = False  # this is the retry on stable after the canary failed
        self.host = ""
        self.port = 0


class Exchange:
    """One request on the public port."""

    __slots__ = (
        "assignment",
        "body",
        "config_version",
        "fallback",
        "http_route",
        "method",
        "path",
        "route",
        "started",
        "trace",
        "user_agent",
        "variant",
    )

    def __init__(self, method: str, path: str, started: float, trace: TraceContext | None) -> None:
        self.method = method
        self.path = path
        self.started = started
        self.trace = trace
        self.route = ""
        self.http_route = ""
        self.variant: Variant | None = None
        self.assignment: Assignment | None = None
        self.body: bytes | None = None  # the request body, when it was read
        self.fallback = False
        self.config_version = ""  # of the config the request started on
        self.user_agent: str | None = None


class Recorder:
    """Stats, metrics and spans of one process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics(time.time_ns())
        self.stats = WindowStats()
        self.stats.keep_for(_retention_s(config))
        self.tracing = config.telemetry.otlp_endpoint is not None
        self.sample_ratio = config.telemetry.trace_sample_ratio
        self.resource: list[tuple[str, AttributeValue]] = [
            ("service.name", config.telemetry.service_name),
            ("service.version", __version__),
            # One identity per process: the workers and replicas of a fleet each export
            # their own cumulative series, which must not be mistaken for one another.
            ("service.instance.id", f"{socket.gethostname()}:{os.getpid()}"),
            ("host.name", socket.gethostname()),
            ("process.pid", os.getpid()),
        ]
        self._spans: deque[bytes] = deque()
        # Encoded attributes that repeat from request to request, by what they depend on.
        self._static_blocks: dict[tuple[object, ...], bytes] = {}
        self.spans_dropped = 0
        self.spans_exported = 0
        self.export_failures = 0
        self.last_export_error: str | None = None
        self.batch_ready: asyncio.Event | None = None  # set by the exporter, to be woken

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config: its sampling and service name, for what comes next."""
        self.config = config
        self.tracing = config.telemetry.otlp_endpoint is not None
        self.sample_ratio = config.telemetry.trace_sample_ratio
        self.resource[0] = ("service.name", config.telemetry.service_name)
        self.stats.keep_for(_retention_s(config))

    # --- the hot path -------------------------------------------------------------------

    def begin(self, traceparent: str | None) -> TraceContext | None:
        """The trace of a new request, or None when it is not recorded."""
        return sample(traceparent, self.sample_ratio) if self.tracing else None

    def new_attempt(
        self, exchange: Exchange, variant: Variant, backend: str, now: float
    ) -> Attempt:
        span_id = new_span_id() if exchange.trace is not None else None
        return Attempt(exchange.route, variant, backend, now, span_id)

    def attempt_done(self, exchange: Exchange, attempt: Attempt, now: float) -> None:
        status = attempt.status
        error_type = attempt.error_type
        if error_type is None and status is not None and (status >= 500 or status == 429):
            error_type = attempt.error_type = str(status)
        outcome = "error" if error_type else "cancelled" if attempt.cancelled else "ok"
        duration_s = now - attempt.started
        first_byte_at = attempt.first_byte_at
        ttft_s = (
            first_byte_at - attempt.started
            if attempt.event_stream and first_byte_at is not None
            else None
        )
        facts = read_facts(attempt.tail) if attempt.tail else None
        variant = attempt.variant.value
        self.metrics.record_attempt(
            attempt.route, variant, attempt.backend, outcome, error_type or "", duration_s, ttft_s
        )
        if facts is not None and (
            facts.input_tokens is not None or facts.output_tokens is not None
        ):
            self.metrics.record_tokens(
                attempt.route,
                variant,
                operation_of(exchange.path) or "other",
                facts.input_tokens,
                facts.output_tokens,
            )
        if not attempt.cancelled or error_type is not None:
            self.stats.record(
                attempt.route,
                variant,
                time.time(),  # wall clock: slices line up across processes and restarts
                duration_s,
                ttft_s,
                error_type,
                facts.output_tokens if facts is not None else None,
            )
        if exchange.trace is not None and attempt.span_id is not None:
            self._client_span(exchange, attempt, now, ttft_s, facts)

    def request_done(self, exchange: Exchange, status: int, now: float) -> None:
        self.metrics.record_request(
            exchange.method, status, exchange.http_route, now - exchange.started
        )
        if exchange.trace is not None:
            self._server_span(exchange, status, now)

    # --- the rollout controller ---------------------------------------------------------

    def record_judgement(self, route: str, verdict: str) -> None:
        self.metrics.record_decision(route, verdict)

    def record_decision(self, route: str, decision: Decision) -> None:
        """A span of its own for a rollout decision, with the reason as an event."""
        if not self.tracing:
            return
        now_ns = time.time_ns()
        at_ns = int(decision.at * 1e9)
        trace = TraceContext(new_span_id() << 64 | new_span_id(), None)
        self._add_span(
            encode_span(
                trace.trace_id,
                trace.server_span_id,
                None,
                f"canary.rollout {route}",
                SpanKind.INTERNAL,
                min(at_ns, now_ns),
                now_ns,
                [
                    ("canary.route", route),
                    ("canary.config_version", self.config.version),
                    ("canary.rollout.cause", decision.cause),
                    ("canary.rollout.action", decision.action),
                    ("canary.rollout.status", decision.status.value),
                    ("canary.weight.before", decision.weight_before),
                    ("canary.weight.after", decision.weight_after),
                ],
                events=[(at_ns, "decision", [("canary.rollout.reason", decision.reason)])],
            )
        )

    # --- spans ----------------------------------------------------------------------------

    def _client_span(
        self,
        exchange: Exchange,
        attempt: Attempt,
        now: float,
        ttft_s: float | None,
        facts: AnswerFacts | None,
    ) -> None:
        trace = exchange.trace
        assert trace is not None
        assert attempt.span_id is not None
        operation = operation_of(exchange.path)
        model, stream = request_model(exchange.body) if exchange.body else (None, False)
        assignment = exchange.assignment
        static_key = (
            "client",
            exchange.config_version,
            exchange.route,
            attempt.variant,
            attempt.fallback,
            attempt.backend,
            attempt.host,
            attempt.port,
            exchange.method,
            operation,
            stream,
            assignment.key_source if assignment is not None else None,
            assignment.reason if assignment is not None else None,
        )
        static = self._static_blocks.get(static_key)
        if static is None:
            pairs = self._canary_pairs(exchange, attempt.variant, attempt.fallback)
            pairs += [
                ("canary.backend", attempt.backend),
                ("http.request.method", exchange.method),
                ("server.address", attempt.host),
                ("server.port", attempt.port),
                ("gen_ai.operation.name", operation or exchange.method),
                ("gen_ai.request.stream", stream),
            ]
            static = self._remember(static_key, attributes(9, pairs))
        pairs = self._bucket(exchange)
        if model is not None:
            pairs.append(("gen_ai.request.model", model))
        if attempt.status is not None:
            pairs.append(("http.response.status_code", attempt.status))
        if attempt.error_type is not None:
            pairs.append(("error.type", attempt.error_type))
        if facts is not None:
            if facts.model is not None:
                pairs.append(("gen_ai.response.model", facts.model))
            if facts.finish_reasons:
                pairs.append(("gen_ai.response.finish_reasons", list(facts.finish_reasons)))
            if facts.input_tokens is not None:
                pairs.append(("gen_ai.usage.input_tokens", facts.input_tokens))
            if facts.output_tokens is not None:
                pairs.append(("gen_ai.usage.output_tokens", facts.output_tokens))
        events: list[tuple[int, str, list[tuple[str, AttributeValue]]]] = []
        if ttft_s is not None and attempt.first_byte_at is not None:
            events.append(
                (
                    _wall_ns(trace, exchange, attempt.first_byte_at),
                    "first_token",
                    [("gen_ai.response.time_to_first_chunk", ttft_s)],
                )
            )
        name = f"{operation} {model}" if operation and model else operation or exchange.method
        self._add_span(
            encode_span(
                trace.trace_id,
                attempt.span_id,
                trace.server_span_id,
                name,
                SpanKind.CLIENT,
                _wall_ns(trace, exchange, attempt.started),
                _wall_ns(trace, exchange, now),
                pairs,
                encoded_attributes=static,
                error=attempt.error_type,
                events=events,
            )
        )

    def _server_span(self, exchange: Exchange, status: int, now: float) -> None:
        trace = exchange.trace
        assert trace is not None
        assignment = exchange.assignment
        static_key = (
            "server",
            exchange.config_version,
            exchange.route,
            exchange.variant,
            exchange.fallback,
            exchange.method,
            exchange.http_route,
            assignment.key_source if assignment is not None else None,
            assignment.reason if assignment is not None else None,
        )
        static = self._static_blocks.get(static_key)
        if static is None:
            pairs: list[tuple[str, AttributeValue]] = [
                ("http.request.method", exchange.method),
                ("url.scheme", "http"),
            ]
            if exchange.http_route:
                pairs.append(("http.route", exchange.http_route))
            if exchange.variant is not None:
                pairs += self._canary_pairs(exchange, exchange.variant, exchange.fallback)
            static = self._remember(static_key, attributes(9, pairs))
        pairs = self._bucket(exchange)
        pairs += [("url.path", exchange.path), ("http.response.status_code", status)]
        if exchange.user_agent:
            pairs.append(("user_agent.original", exchange.user_agent))
        error = str(status) if status >= 500 else None
        if error is not None:
            pairs.append(("error.type", error))
        name = (
            f"{exchange.method} {exchange.http_route}" if exchange.http_route else exchange.method
        )
        self._add_span(
            encode_span(
                trace.trace_id,
                trace.server_span_id,
                trace.parent_span_id,
                name,
                SpanKind.SERVER,
                trace.start_ns,
                _wall_ns(trace, exchange, now),
                pairs,
                encoded_attributes=static,
                error=error,
            )
        )

    def _canary_pairs(
        self, exchange: Exchange, variant: Variant, fallback: bool
    ) -> list[tuple[str, AttributeValue]]:
        """The canary and feature-flag attributes that repeat from request to request."""
        pairs: list[tuple[str, AttributeValue]] = [
            ("canary.route", exchange.route),
            ("canary.variant", variant.value),
            ("canary.config_version", exchange.config_version),
            ("canary.fallback", fallback),
            ("feature_flag.key", exchange.route),
            ("feature_flag.result.variant", variant.value),
            ("feature_flag.provider.name", SCOPE),
        ]
        assignment = exchange.assignment
        if assignment is not None:
            if assignment.key_source is not None:
                pairs.append(("canary.key_source", assignment.key_source))
            pairs.append(("canary.assignment", assignment.reason.value))
        return pairs

    @staticmethod
    def _bucket(exchange: Exchange) -> list[tuple[str, AttributeValue]]:
        assignment = exchange.assignment
        if assignment is not None and assignment.bucket is not None:
            return [("canary.bucket", assignment.bucket)]
        return []

    def _remember(self, key: tuple[object, ...], block: bytes) -> bytes:
        """Keep an encoded attribute block; the cache is bounded (some keys hold client text)."""
        if len(self._static_blocks) >= _STATIC_BLOCKS:
            self._static_blocks.clear()
        self._static_blocks[key] = block
        return block

    # --- the span queue -------------------------------------------------------------------

    def _add_span(self, span: bytes) -> None:
        if len(self._spans) >= _SPAN_QUEUE:
            self.spans_dropped += 1
            return
        self._spans.append(span)
        if len(self._spans) >= _BATCH and self.batch_ready is not None:
            self.batch_ready.set()

    def take_spans(self, limit: int = _BATCH) -> list[bytes]:
        spans = self._spans
        return [spans.popleft() for _ in range(min(limit, len(spans)))]

    @property
    def queued_spans(self) -> int:
        return len(self._spans)

    def gauges(
        self, weights: dict[str, float], store_up: bool | None = None, leader: bool = False
    ) -> Gauges:
        return Gauges(weights, self.config.version, self.config.fleet_version, store_up, leader)


def _retention_s(config: Config) -> float:
    """How long window stats are kept: the status page's quarter hour, or twice the
    longest judgement interval, for the controller to gather them."""
    intervals = [r.rollout.auto.interval_s for r in config.routes if r.rollout.auto is not None]
    return max([RETENTION_S, *(2 * interval for interval in intervals)])


def _wall_ns(trace: TraceContext, exchange: Exchange, at: float) -> int:
    """A loop-clock instant of this request as wall-clock nanoseconds."""
    return trace.start_ns + int((at - exchange.started) * 1e9)
