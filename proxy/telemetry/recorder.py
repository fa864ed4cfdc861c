"""The one owner of a process's telemetry state, fed by the request path and the controller.

The forwarding code fills one `Exchange` per request and one `Attempt` per backend
attempt, and hands them over when they end; nothing here does I/O. Readers (the
admin port, the OTLP export, the rollout judge) take snapshots of what is here and
never change it.

Rules:
1. Every attempt feeds the window stats (what the status page and the rollout judge
   read) and the metrics, from the same numbers: an attempt's error is what SPEC §5
   counts as a backend error; a client that went away is `cancelled`, not an error,
   recorded with the time it went away at. The stats know the user by the sticky
   bucket (never the key); requests without a key take clusters in turn.
   An attempt `rejected` because no connection came free (`pool_timeout`) never
   reached its backend: it is counted in the metrics under its own outcome and error
   type, and never in the window stats, so the judge never holds it against a variant.
2. Only a sampled request builds spans: an unsampled one makes no OpenTelemetry SDK
   call and costs a dict increment or two per attempt. A sampled one's spans are
   built whole when they end and handed to the span sink (`proxy.telemetry.export`).
3. No attribute carries a user key or prompt text: key sources are named
   (`header:x-user-id`), never their values; the client's address and the query string
   (either may be the key) are not recorded.
4. GenAI semantic conventions as published: `gen_ai.operation.name` only for the
   operations they define (chat: OpenAI chat, Anthropic messages, Ollama chat;
   text_completion: OpenAI completions, llama.cpp, TGI, Ollama generate; embeddings);
   other paths (`/v1/models`, `/v1/responses`, ...) are plain HTTP client spans.
   `gen_ai.provider.name` is the backend's `api` (openai unless told).
5. Usage, finish reasons and model are read in each API's own words
   (`proxy.apis.answer`, by the request's path); a stream's time per output token is
   (last byte - first byte) / (output tokens - 1).
6. A shadow pair (`proxy.http.shadow`) is stable's answer to a user and the canary's
   to the same request sent again: it lands in the stats variants `shadow_stable` and
   `shadow_canary` (the rollout judge's evidence in shadow), never in `stable` or
   `canary`, and shadow requests count in `canary.shadow.requests` only, never as
   served; a traced user request's shadow request is a span of its own
   (`canary.shadow: true`).
7. An upgraded session (WebSocket) is one attempt, recorded when it ends
   (`session_done`): in the window stats and the attempt metrics with the time to its
   101 as its duration (a session's length says nothing of the backend's speed), and
   as an error (`session_reset`) only when the backend's connection failed mid-session;
   any close by either side, or silence past `upgrade_idle`, ends it cleanly, and a
   stop of the proxy cancels it. The whole session's duration and its bytes each way
   are in the session metrics, under a `canary.operation` of the proxy's own
   (`realtime` for a path ending in /realtime, else `websocket`; rule 4); a sampled
   one's client span covers the whole session.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Mapping
from typing import Final, NamedTuple, Protocol

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Tracer

from proxy.apis.answer import AnswerFacts, read_facts, request_model
from proxy.apis.streams import api_of
from proxy.config.model import Config, Variant
from proxy.judge.analysis import Verdict
from proxy.judge.stats import RETENTION_S, ShadowSide, WindowStats
from proxy.rollout.machine import Decision
from proxy.routing.assignment import Assignment
from proxy.telemetry.feedback import RecentRequests, Score
from proxy.telemetry.logs import ACCESS_LOGGER, access_line
from proxy.telemetry.metrics import PROVIDER, Gauges, Metrics, PoolGauge, Snapshot
from proxy.telemetry.settings import Sampling
from proxy.telemetry.tracing import (
    AttributeValue,
    SpanKind,
    TraceContext,
    finished_span,
    new_span_id,
    sample,
)

__all__ = [
    "FEATURE_FLAG_PROVIDER",
    "SESSION_RESET",
    "Attempt",
    "Exchange",
    "PairSide",
    "Recorder",
    "SpanSink",
    "operation_of",
    "session_operation",
]

FEATURE_FLAG_PROVIDER: Final = "canary-proxy"
_STATIC: Final = 1024
_OFF: Final = Sampling(0.0, parent_based=True)
_random = random.random
access_log = logging.getLogger(ACCESS_LOGGER)

Attributes = dict[str, AttributeValue]


_OPERATIONS: Final = (
    ("/chat/completions", "chat"),
    ("/completions", "text_completion"),
    ("/embeddings", "embeddings"),
    ("/messages", "chat"),
    ("/api/chat", "chat"),
    ("/api/generate", "text_completion"),
    ("/completion", "text_completion"),
    ("/generate_stream", "text_completion"),
    ("/generate", "text_completion"),
)


def operation_of(path: str) -> str | None:
    """The GenAI operation of a path, None for anything else (rule 4)."""
    for suffix, operation in _OPERATIONS:
        if path.endswith(suffix):
            return operation
    return None


SESSION_RESET: Final = "session_reset"
# How an upgraded session ended (`proxy.http.tunnel.End`), as rule 7 counts it.
_SESSION_FAILED: Final = "backend_reset"
_SESSION_CUT_BY_PROXY: Final = "shutdown"


def session_operation(path: str) -> str:
    """The `canary.operation` of an upgraded session (rule 7)."""
    return "realtime" if path.endswith("/realtime") else "websocket"


class SpanSink(Protocol):
    """Where finished spans go: the OTLP export's span processor."""

    @property
    def resource(self) -> Resource: ...

    @property
    def scope(self) -> InstrumentationScope: ...

    @property
    def tracer(self) -> Tracer | None: ...

    def emit(self, span: ReadableSpan) -> None: ...


class Attempt:
    """One backend attempt, as the forwarding code saw it."""

    __slots__ = (
        "backend",
        "cancelled",
        "error_type",
        "event_stream",
        "fallback",
        "first_byte_at",
        "head",
        "host",
        "pool_wait_s",
        "port",
        "queued_ahead",
        "rejected",
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
        self.head = b""  # its first chunk, where some APIs say their input tokens
        self.cancelled = False
        self.fallback = False  # this is the retry on stable after the canary failed
        self.host = ""
        self.port = 0
        self.pool_wait_s = 0.0  # queued this long for a connection (0: did not queue)
        self.queued_ahead = 0  # others queued ahead of it when it joined the queue
        self.rejected = False  # no connection came free: it never reached the backend


class Exchange:
    """One request on the public port."""

    __slots__ = (
        "assignment",
        "body",
        "config_version",
        "fallback",
        "http_route",
        "input_tokens",
        "method",
        "output_tokens",
        "path",
        "route",
        "started",
        "trace",
        "traceparent",
        "ttft_s",
        "user_agent",
        "variant",
    )

    def __init__(
        self,
        method: str,
        path: str,
        started: float,
        trace: TraceContext | None,
        traceparent: str | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.started = started
        self.trace = trace
        self.traceparent = traceparent  # as it came, for the log lines of unsampled requests
        self.route = ""
        self.http_route = ""
        self.variant: Variant | None = None
        self.assignment: Assignment | None = None
        self.body: bytes | None = None  # the request body, when it was read
        self.fallback = False
        self.config_version = ""  # of the config the request started on
        self.user_agent: str | None = None
        # Of the attempt that answered, for the access log.
        self.ttft_s: float | None = None
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None


class PairSide(NamedTuple):
    """What one side of a shadow pair did (rule 6)."""

    latency_s: float
    ttft_s: float | None
    error_type: str | None
    output_tokens: int | None


class Recorder:
    """Stats, metrics and spans of one process."""

    def __init__(self, config: Config, sampling: Sampling = _OFF) -> None:
        self.config = config
        self.metrics = Metrics(time.time_ns())
        self.stats = WindowStats()
        self.stats.keep_for(_retention_s(config))
        self.recent = RecentRequests(config.limits.feedback_ids)
        self.sampling = sampling
        self.access_ratio = config.telemetry.access_log
        self.sink: SpanSink | None = None
        self._providers = _providers(config)
        # Attributes that repeat from request to request, by what they depend on.
        self._static: dict[tuple[object, ...], Attributes] = {}
        self._keyless = itertools.count()  # the user clusters of requests without a key

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config, for what comes next."""
        self.config = config
        self.access_ratio = config.telemetry.access_log
        self.stats.keep_for(_retention_s(config))
        self._providers = _providers(config)
        self.recent.resize(config.limits.feedback_ids)

    def trace_to(self, sink: SpanSink | None, sampling: Sampling) -> None:
        """Send sampled requests' spans to `sink` from now on (None: trace nothing)."""
        self.sink = sink
        self.sampling = sampling if sink is not None else _OFF
        self._static.clear()

    def snapshot(self, gauges: Gauges) -> Snapshot:
        return self.metrics.snapshot(gauges)

    # --- the hot path -------------------------------------------------------------------

    def begin(self, traceparent: str | None) -> TraceContext | None:
        """The trace of a new request, or None when it is not recorded."""
        return sample(traceparent, self.sampling) if self.sink is not None else None

    def new_attempt(
        self, exchange: Exchange, variant: Variant, backend: str, now: float
    ) -> Attempt:
        span_id = new_span_id() if exchange.trace is not None else None
        return Attempt(exchange.route, variant, backend, now, span_id)

    def attempt_done(
        self, exchange: Exchange, attempt: Attempt, now: float, *, span: bool = True
    ) -> None:
        status = attempt.status
        error_type = attempt.error_type
        if error_type is None and status is not None and (status >= 500 or status == 429):
            error_type = attempt.error_type = str(status)
        if attempt.rejected:
            outcome = "rejected"
        else:
            outcome = "error" if error_type else "cancelled" if attempt.cancelled else "ok"
        duration_s = now - attempt.started
        first_byte_at = attempt.first_byte_at
        ttft_s = (
            first_byte_at - attempt.started
            if attempt.event_stream and first_byte_at is not None
            else None
        )
        path = exchange.path
        trace = exchange.trace
        span_id = attempt.span_id
        # Finish reasons and model go only into a span: an untraced answer is read for
        # its usage alone.
        usage_only = trace is None or span_id is None
        facts = (
            read_facts(attempt.tail, api_of(path), attempt.head, usage_only=usage_only)
            if attempt.tail
            else None
        )
        variant = attempt.variant
        operation = operation_of(path)
        provider = self._providers.get(attempt.backend, PROVIDER)
        tpot_s = None
        if ttft_s is not None and facts is not None and first_byte_at is not None:
            output_tokens = facts.output_tokens
            if output_tokens is not None and output_tokens > 1:
                tpot_s = (now - first_byte_at) / (output_tokens - 1)
                self.metrics.record_tpot(attempt.route, variant, attempt.backend, tpot_s)
        self.metrics.record_attempt(
            attempt.route,
            variant,
            attempt.backend,
            operation,
            outcome,
            error_type or "",
            duration_s,
            ttft_s,
            (trace.trace_id, span_id) if trace is not None and span_id is not None else None,
            provider,
        )
        if attempt.pool_wait_s:
            self.metrics.record_pool_wait(attempt.backend, attempt.pool_wait_s)
        exchange.ttft_s = ttft_s
        if facts is not None:
            exchange.input_tokens, exchange.output_tokens = facts.input_tokens, facts.output_tokens
        if (
            operation is not None
            and facts is not None
            and (facts.input_tokens is not None or facts.output_tokens is not None)
        ):
            self.metrics.record_tokens(
                attempt.route,
                variant,
                operation,
                facts.input_tokens,
                facts.output_tokens,
                provider,
                duration_s,
            )
        # A cancelled attempt counts too, at the time it was cancelled (its latency is
        # a lower bound of the answer's); the judge counts its user by the sticky bucket.
        # A rejected one never reached its backend (rule 1).
        if not attempt.rejected:
            assignment = exchange.assignment
            bucket = assignment.bucket if assignment is not None else None
            self.stats.record(
                attempt.route,
                variant,
                time.time(),  # wall clock: slices line up across processes and restarts
                duration_s,
                ttft_s,
                error_type,
                facts.output_tokens if facts is not None else None,
                attempt.cancelled,
                bucket if bucket is not None else next(self._keyless),
            )
        if trace is not None and span_id is not None and span:
            self._client_span(exchange, attempt, now, ttft_s, facts, operation, provider, tpot_s)

    def record_shadow(self, route: str, outcome: str) -> None:
        """A shadow request dispatched, dropped, completed or failed (rule 6)."""
        self.metrics.record_shadow(route, outcome)

    def record_pair(
        self,
        route: str,
        stable: PairSide,
        canary: PairSide,
        user: int | None,
        agreed: bool | None = None,
        length_matched: bool | None = None,
    ) -> None:
        """A shadow pair, into the shadow variants of the window stats (rule 6), with
        what comparing it found (None: not compared)."""
        now = time.time()
        if agreed is not None or length_matched is not None:
            self.stats.record_pair(route, now, agreed, length_matched)
        if user is None:
            user = next(self._keyless)
        for variant, side in ((ShadowSide.STABLE, stable), (ShadowSide.CANARY, canary)):
            self.stats.record(
                route,
                variant,
                now,
                side.latency_s,
                side.ttft_s,
                side.error_type,
                side.output_tokens,
                False,
                user,
            )

    def shadow_span(
        self,
        exchange: Exchange,
        backend: str,
        canary: PairSide,
        status: int | None,
        started: float,
        ended: float,
    ) -> None:
        """A traced user request's shadow request, as a span of its trace (rule 6)."""
        sink, trace = self.sink, exchange.trace
        if sink is None or trace is None:
            return
        # Not a feature flag's evaluation: the user was served by stable.
        attributes: Attributes = {
            "canary.route": exchange.route,
            "canary.variant": Variant.CANARY.value,
            "canary.shadow": True,
            "canary.config_version": exchange.config_version,
            "canary.backend": backend,
            "http.request.method": exchange.method,
        }
        if status is not None:
            attributes["http.response.status_code"] = status
        if canary.error_type is not None:
            attributes["error.type"] = canary.error_type
        if canary.output_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = canary.output_tokens
        if canary.ttft_s is not None:
            attributes["gen_ai.response.time_to_first_chunk"] = canary.ttft_s
        operation = operation_of(exchange.path)
        sink.emit(
            finished_span(
                sink.resource,
                sink.scope,
                trace,
                new_span_id(),
                trace.server_span_id,
                f"shadow {operation or exchange.method}",
                SpanKind.CLIENT,
                _wall_ns(trace, exchange, started),
                _wall_ns(trace, exchange, ended),
                attributes,
                error=canary.error_type,
            )
        )

    def session_done(
        self,
        exchange: Exchange,
        attempt: Attempt,
        end: str | None,
        to_backend: int,
        to_client: int,
        now: float,
    ) -> None:
        """An upgraded session ended (rule 7); `end` says how (None: it never began)."""
        if end == _SESSION_FAILED:
            attempt.error_type = SESSION_RESET
        elif end is None or end == _SESSION_CUT_BY_PROXY:
            attempt.cancelled = True
        switched_at = attempt.first_byte_at if attempt.first_byte_at is not None else now
        self.attempt_done(exchange, attempt, switched_at, span=False)
        error_type = attempt.error_type
        outcome = "error" if error_type else "cancelled" if attempt.cancelled else "ok"
        trace = exchange.trace
        span_id = attempt.span_id
        traced = (trace.trace_id, span_id) if trace is not None and span_id is not None else None
        self.metrics.record_session(
            attempt.route,
            attempt.variant,
            attempt.backend,
            session_operation(exchange.path),
            outcome,
            error_type or "",
            now - attempt.started,
            to_backend,
            to_client,
            traced,
        )
        if traced is not None:
            session: Attributes = {
                "canary.session.end": end or _SESSION_CUT_BY_PROXY,
                "canary.session.handshake": switched_at - attempt.started,
                "canary.session.bytes_to_backend": to_backend,
                "canary.session.bytes_to_client": to_client,
            }
            provider = self._providers.get(attempt.backend, PROVIDER)
            self._client_span(
                exchange, attempt, now, None, None, None, provider, None, extra=session
            )

    def feedback(self, request_id: str, score: Score) -> tuple[str, Variant] | None:
        """Count a score for the variant that served `request_id`; None when this process
        does not remember it (`proxy.telemetry.feedback`)."""
        served = self.recent.take(request_id)
        if served is None:
            return None
        route, variant = served
        self.stats.record_feedback(route, variant, time.time(), score is Score.NEGATIVE)
        self.metrics.record_feedback(route, variant, score.value)
        return served

    def request_done(self, exchange: Exchange, status: int, now: float) -> None:
        trace = exchange.trace
        self.metrics.record_request(
            exchange.method,
            status,
            exchange.http_route,
            now - exchange.started,
            (trace.trace_id, trace.server_span_id) if trace is not None else None,
        )
        if trace is not None:
            self._server_span(exchange, status, now)
        ratio = self.access_ratio
        if ratio and (ratio >= 1.0 or _random() < ratio):
            self._access(exchange, status, now)

    @staticmethod
    def _access(exchange: Exchange, status: int, now: float) -> None:
        """One access log line (proxy.telemetry.logs, rule 4)."""
        ttft_s = exchange.ttft_s
        message, extra = access_line(
            {
                "method": exchange.method,
                "path": exchange.path,
                "route": exchange.route or None,
                "variant": exchange.variant.value if exchange.variant is not None else None,
                "fallback": exchange.fallback or None,
                "status": status,
                "duration_ms": round((now - exchange.started) * 1000, 1),
                "ttft_ms": round(ttft_s * 1000, 1) if ttft_s is not None else None,
                "input_tokens": exchange.input_tokens,
                "output_tokens": exchange.output_tokens,
            }
        )
        access_log.info(message, extra=extra)

    # --- the rollout controller ---------------------------------------------------------

    def record_judgement(self, route: str, verdict: Verdict | None) -> None:
        """Count a judgement (None: the first step, taken without one, counted as advance)."""
        self.metrics.record_decision(route, verdict.value if verdict is not None else "advance")

    def record_decision(self, route: str, decision: Decision) -> None:
        """A span of its own for a rollout decision, with the reason as an event; the
        SDK's tracer makes it, sampled as a new trace."""
        sink = self.sink
        tracer = sink.tracer if sink is not None else None
        if tracer is None:
            return
        now_ns = time.time_ns()
        at_ns = int(decision.at * 1e9)
        span = tracer.start_span(
            f"canary.rollout {route}",
            kind=SpanKind.INTERNAL,
            attributes={
                "canary.route": route,
                "canary.config_version": self.config.version,
                "canary.rollout.cause": str(decision.cause),
                "canary.rollout.action": str(decision.action),
                "canary.rollout.status": decision.status.value,
                "canary.weight.before": decision.weight_before,
                "canary.weight.after": decision.weight_after,
            },
            start_time=min(at_ns, now_ns),
        )
        span.add_event("decision", {"canary.rollout.reason": decision.reason}, at_ns)
        span.end(now_ns)

    # --- spans ----------------------------------------------------------------------------

    def _client_span(
        self,
        exchange: Exchange,
        attempt: Attempt,
        now: float,
        ttft_s: float | None,
        facts: AnswerFacts | None,
        operation: str | None,
        provider: str,
        tpot_s: float | None,
        extra: Attributes | None = None,
    ) -> None:
        sink = self.sink
        trace = exchange.trace
        if sink is None or trace is None or attempt.span_id is None:
            return
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
        static = self._static.get(static_key)
        if static is None:
            static = self._canary_attributes(exchange, attempt.variant, attempt.fallback)
            static["canary.backend"] = attempt.backend
            static["http.request.method"] = exchange.method
            static["server.address"] = attempt.host
            static["server.port"] = attempt.port
            if operation is not None:
                static["gen_ai.operation.name"] = operation
                static["gen_ai.provider.name"] = provider
                static["gen_ai.request.stream"] = stream
            self._remember(static_key, static)
        attributes = dict(static)
        self._bucket(exchange, attributes)
        if model is not None and operation is not None:
            attributes["gen_ai.request.model"] = model
        if attempt.status is not None:
            attributes["http.response.status_code"] = attempt.status
        if attempt.error_type is not None:
            attributes["error.type"] = attempt.error_type
        if attempt.pool_wait_s:
            attributes["canary.pool.wait"] = attempt.pool_wait_s
            attributes["canary.pool.queued_ahead"] = attempt.queued_ahead
        if extra is not None:
            attributes.update(extra)
        if facts is not None and operation is not None:
            if facts.model is not None:
                attributes["gen_ai.response.model"] = facts.model
            if facts.finish_reasons:
                attributes["gen_ai.response.finish_reasons"] = tuple(facts.finish_reasons)
            if facts.input_tokens is not None:
                attributes["gen_ai.usage.input_tokens"] = facts.input_tokens
            if facts.output_tokens is not None:
                attributes["gen_ai.usage.output_tokens"] = facts.output_tokens
        events: tuple[Event, ...] = ()
        if ttft_s is not None and attempt.first_byte_at is not None:
            attributes["gen_ai.response.time_to_first_chunk"] = ttft_s
            if tpot_s is not None:
                attributes["canary.time_per_output_token"] = tpot_s
            events = (
                Event(
                    "first_token",
                    {"gen_ai.response.time_to_first_chunk": ttft_s},
                    _wall_ns(trace, exchange, attempt.first_byte_at),
                ),
            )
        if operation is None:
            name = exchange.method
        else:
            name = f"{operation} {model}" if model else operation
        sink.emit(
            finished_span(
                sink.resource,
                sink.scope,
                trace,
                attempt.span_id,
                trace.server_span_id,
                name,
                SpanKind.CLIENT,
                _wall_ns(trace, exchange, attempt.started),
                _wall_ns(trace, exchange, now),
                attributes,
                error=attempt.error_type,
                events=events,
            )
        )

    def _server_span(self, exchange: Exchange, status: int, now: float) -> None:
        sink = self.sink
        trace = exchange.trace
        if sink is None or trace is None:
            return
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
        static = self._static.get(static_key)
        if static is None:
            static = {"http.request.method": exchange.method, "url.scheme": "http"}
            if exchange.http_route:
                static["http.route"] = exchange.http_route
            if exchange.variant is not None:
                static.update(
                    self._canary_attributes(exchange, exchange.variant, exchange.fallback)
                )
            self._remember(static_key, static)
        attributes = dict(static)
        self._bucket(exchange, attributes)
        attributes["url.path"] = exchange.path
        attributes["http.response.status_code"] = status
        if exchange.user_agent:
            attributes["user_agent.original"] = exchange.user_agent
        error = str(status) if status >= 500 else None
        if error is not None:
            attributes["error.type"] = error
        name = (
            f"{exchange.method} {exchange.http_route}" if exchange.http_route else exchange.method
        )
        sink.emit(
            finished_span(
                sink.resource,
                sink.scope,
                trace,
                trace.server_span_id,
                trace.parent_span_id,
                name,
                SpanKind.SERVER,
                trace.start_ns,
                _wall_ns(trace, exchange, now),
                attributes,
                error=error,
            )
        )

    @staticmethod
    def _canary_attributes(exchange: Exchange, variant: Variant, fallback: bool) -> Attributes:
        """The canary and feature-flag attributes that repeat from request to request."""
        attributes: Attributes = {
            "canary.route": exchange.route,
            "canary.variant": variant.value,
            "canary.config_version": exchange.config_version,
            "canary.fallback": fallback,
            "feature_flag.key": exchange.route,
            "feature_flag.result.variant": variant.value,
            "feature_flag.provider.name": FEATURE_FLAG_PROVIDER,
        }
        assignment = exchange.assignment
        if assignment is not None:
            if assignment.key_source is not None:
                attributes["canary.key_source"] = assignment.key_source
            attributes["canary.assignment"] = assignment.reason.value
        return attributes

    @staticmethod
    def _bucket(exchange: Exchange, attributes: Attributes) -> None:
        assignment = exchange.assignment
        if assignment is not None and assignment.bucket is not None:
            attributes["canary.bucket"] = assignment.bucket

    def _remember(self, key: tuple[object, ...], attributes: Attributes) -> None:
        """Keep attributes that repeat; bounded (some keys hold client text)."""
        if len(self._static) >= _STATIC:
            self._static.clear()
        self._static[key] = attributes

    def gauges(
        self,
        weights: Mapping[str, float],
        store_up: bool | None = None,
        leader: bool = False,
        pools: tuple[PoolGauge, ...] = (),
    ) -> Gauges:
        return Gauges(
            weights, self.config.version, self.config.fleet_version, store_up, leader, pools
        )


def _providers(config: Config) -> dict[str, str]:
    """Each backend's `gen_ai.provider.name`, by backend name."""
    return {name: backend.api.provider for name, backend in config.backends.items()}


def _retention_s(config: Config) -> float:
    """How long window stats are kept: the status page's quarter hour, or twice the
    longest judgement interval, for the controller to gather them."""
    intervals = [r.rollout.auto.interval_s for r in config.routes if r.rollout.auto is not None]
    return max([RETENTION_S, *(2 * interval for interval in intervals)])


def _wall_ns(trace: TraceContext, exchange: Exchange, at: float) -> int:
    """A loop-clock instant of this request as wall-clock nanoseconds."""
    return trace.start_ns + int((at - exchange.started) * 1e9)
