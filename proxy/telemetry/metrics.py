"""The metrics of SPEC §8, pre-aggregated per process on the hot path, read as snapshots. Pure.

An OpenTelemetry SDK instrument costs several µs per `record()`, and a request
records half a dozen; these are a dict lookup and an increment. Two readers take a
snapshot of them, never changing them: the OTLP export (`metrics_data`, the SDK's
`MetricsData`, cumulative since the process started) and `/metrics`
(`proxy.telemetry.prometheus`).

Instruments (OTel name → Prometheus name):
- `http.server.request.duration` (s) → `http_server_request_duration_seconds`
- `canary.upstream.duration` (s) → `canary_upstream_duration_seconds`
- `canary.upstream.ttft` (s) → `canary_upstream_ttft_seconds`
- `canary.upstream.time_per_output_token` (s) →
  `canary_upstream_time_per_output_token_seconds`
- `canary.upstream.requests` → `canary_upstream_requests_total`
- `canary.upstream.pool.wait` (s) → `canary_upstream_pool_wait_seconds`
- `canary.upstream.pool.queued` gauge → `canary_upstream_pool_queued`
- `canary.upstream.pool.connections` gauge (busy, idle) → `canary_upstream_pool_connections`
- `gen_ai.client.operation.duration` (s) → `gen_ai_client_operation_duration_seconds`
- `gen_ai.client.operation.time_to_first_chunk` (s) →
  `gen_ai_client_operation_time_to_first_chunk_seconds`
- `gen_ai.client.token.usage` ({token}) → `gen_ai_client_token_usage`
- `canary.upstream.session.duration` (s) → `canary_upstream_session_duration_seconds`
  (upgraded sessions: WebSocket)
- `canary.upstream.session.io` (By) → `canary_upstream_session_io_bytes_total`
- `canary.weight` (1, a ratio 0-1) gauge → `canary_weight_ratio`
- `canary.rollout.decisions` → `canary_rollout_decisions_total`
- `canary.shadow.requests` → `canary_shadow_requests_total` (shadow requests by route
  and outcome: dispatched, dropped, completed, failed; apart from served traffic)
- `canary.config.reloads` → `canary_config_reloads_total`
- `canary.notifications` → `canary_notifications_total` (webhook messages by route and
  result: delivered, failed, dropped)
- `canary.config.info` gauge (1, with the config's content hash) → `canary_config_info`
- `canary.state_store.up` and `canary.controller.leader` gauges (1/0; only with a
  state store) → `canary_state_store_up`, `canary_controller_leader`

Rules:
1. Attributes are bounded: routes, variants and backends come from the config;
   methods outside the standard ones are `_OTHER` (HTTP semantic conventions); GenAI
   operations are the published values; no model names and nothing else a client
   chooses.
2. Durations use explicit buckets at powers of two from 3.9 ms to 512 s (LLM time
   scales), read exactly from `proxy.judge.histogram`'s log buckets; tokens powers of
   four up to 1Mi.
3. A sampled request leaves its trace and span id as the exemplar of the bucket its
   value fell in; an unsampled one leaves nothing.
4. An attempt `rejected` by a full connection pool is in `canary.upstream.requests`
   (outcome `rejected`, error.type `pool_timeout`) and its wait in the pool's wait,
   but in no duration: it never reached its backend.
5. An upgraded session (a WebSocket) is an attempt until its 101, in the families
   above with that handshake's duration and the outcome of the whole session; the
   session itself, from the request to its end, is in the session families, with a
   `canary.operation` of its own (`realtime`, `websocket`): the GenAI conventions
   define no operation for it, so it never has a `gen_ai.operation.name`.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, TypeVar

from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from proxy.config.model import Variant
from proxy.judge.histogram import EXPORT_BOUNDS_S, LogHistogram

__all__ = [
    "FAMILIES",
    "TOKEN_BOUNDS",
    "Family",
    "Gauges",
    "Kind",
    "Metrics",
    "Point",
    "PoolGauge",
    "Series",
    "SeriesHistogram",
    "Snapshot",
    "known_method",
    "metrics_data",
]

TOKEN_BOUNDS: Final[tuple[float, ...]] = tuple(float(4**e) for e in range(11))  # 1 .. 1Mi
_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
PROVIDER: Final = "openai"  # gen_ai.provider.name of a backend whose `api` is not told

Labels = tuple[tuple[str, str], ...]
# route, variant, backend, GenAI operation ("" for none), outcome, error type ("" for none)
# (route, variant, backend, operation, provider, outcome, error type)
AttemptKey = tuple[str, str, str, str, str, str, str]
_K = TypeVar("_K")


def known_method(method: str) -> str:
    return method if method in _METHODS else "_OTHER"


class Kind(StrEnum):
    COUNTER = "counter"
    HISTOGRAM = "histogram"
    GAUGE = "gauge"


@dataclass(frozen=True, slots=True)
class PoolGauge:
    """One backend's connection pool, as it is when a snapshot is taken."""

    backend: str
    busy: int  # connections open and in an exchange
    idle: int  # connections kept alive for the next request
    queued: int  # requests waiting for a connection


@dataclass(frozen=True, slots=True)
class Gauges:
    """The values the gauges show, read when a snapshot is taken."""

    weights: Mapping[str, float]  # percent, as the routing table holds them
    config_version: str
    fleet_version: str = ""  # of what a fleet shares (proxy.config.fleet)
    store_up: bool | None = None  # None: no state store in use
    leader: bool = False
    pools: tuple[PoolGauge, ...] = ()


@dataclass(frozen=True, slots=True)
class Family:
    name: str  # OpenTelemetry name
    prometheus: str  # without a counter's `_total`
    kind: Kind
    unit: str
    description: str
    bounds: tuple[float, ...] = ()


def _family(
    name: str, prometheus: str, kind: Kind, unit: str, description: str, bounds: tuple[float, ...]
) -> Family:
    return Family(name, prometheus, kind, unit, description, bounds)


SERVER_DURATION: Final = _family(
    "http.server.request.duration",
    "http_server_request_duration_seconds",
    Kind.HISTOGRAM,
    "s",
    "Duration of requests on the public port, until the answer's last byte.",
    EXPORT_BOUNDS_S,
)
UPSTREAM_DURATION: Final = _family(
    "canary.upstream.duration",
    "canary_upstream_duration_seconds",
    Kind.HISTOGRAM,
    "s",
    "Duration of backend attempts, from sending the request to the last byte relayed.",
    EXPORT_BOUNDS_S,
)
UPSTREAM_TTFT: Final = _family(
    "canary.upstream.ttft",
    "canary_upstream_ttft_seconds",
    Kind.HISTOGRAM,
    "s",
    "Time from sending a streamed request to the backend's first byte of the stream.",
    EXPORT_BOUNDS_S,
)
UPSTREAM_TPOT: Final = _family(
    "canary.upstream.time_per_output_token",
    "canary_upstream_time_per_output_token_seconds",
    Kind.HISTOGRAM,
    "s",
    "Time per output token of a stream after its first byte: (last byte - first byte) / "
    "(output tokens - 1), the tokens as the backend's usage reports them.",
    EXPORT_BOUNDS_S,
)
UPSTREAM_REQUESTS: Final = _family(
    "canary.upstream.requests",
    "canary_upstream_requests",
    Kind.COUNTER,
    "{request}",
    "Backend attempts by route, variant, backend and outcome (ok, error, cancelled).",
    (),
)
POOL_WAIT: Final = _family(
    "canary.upstream.pool.wait",
    "canary_upstream_pool_wait_seconds",
    Kind.HISTOGRAM,
    "s",
    "Time backend attempts queued for a connection while all max_connections were busy "
    "(only attempts that queued; those that gave up at the pool timeout included).",
    EXPORT_BOUNDS_S,
)
POOL_QUEUED: Final = _family(
    "canary.upstream.pool.queued",
    "canary_upstream_pool_queued",
    Kind.GAUGE,
    "{request}",
    "Requests waiting now for a connection to the backend.",
    (),
)
POOL_CONNECTIONS: Final = _family(
    "canary.upstream.pool.connections",
    "canary_upstream_pool_connections",
    Kind.GAUGE,
    "{connection}",
    "Connections to the backend now, by state: busy (in an exchange) or idle (kept alive).",
    (),
)
OPERATION_DURATION: Final = _family(
    "gen_ai.client.operation.duration",
    "gen_ai_client_operation_duration_seconds",
    Kind.HISTOGRAM,
    "s",
    "GenAI operation duration, per backend attempt.",
    EXPORT_BOUNDS_S,
)
TIME_TO_FIRST_CHUNK: Final = _family(
    "gen_ai.client.operation.time_to_first_chunk",
    "gen_ai_client_operation_time_to_first_chunk_seconds",
    Kind.HISTOGRAM,
    "s",
    "Time to receive the first chunk of a streamed GenAI response.",
    EXPORT_BOUNDS_S,
)
TOKEN_USAGE: Final = _family(
    "gen_ai.client.token.usage",
    "gen_ai_client_token_usage",
    Kind.HISTOGRAM,
    "{token}",
    "Number of input and output tokens used, as the backend's usage reports them.",
    TOKEN_BOUNDS,
)
TOKEN_TIME: Final = _family(
    "canary.upstream.token_time",
    "canary_upstream_token_time_seconds",
    Kind.COUNTER,
    "s",
    "Duration of the backend attempts whose usage reported output tokens, summed: their "
    "output tokens (gen_ai.client.token.usage) over it are tokens per second in an answer.",
    (),
)
SESSION_DURATION: Final = _family(
    "canary.upstream.session.duration",
    "canary_upstream_session_duration_seconds",
    Kind.HISTOGRAM,
    "s",
    "Duration of upgraded sessions (WebSocket), from the request to the end of either side.",
    EXPORT_BOUNDS_S,
)
SESSION_IO: Final = _family(
    "canary.upstream.session.io",
    "canary_upstream_session_io_bytes",
    Kind.COUNTER,
    "By",
    "Bytes relayed in upgraded sessions after their 101, by direction (client_to_backend, "
    "backend_to_client).",
    (),
)
WEIGHT: Final = _family(
    "canary.weight",
    "canary_weight_ratio",
    Kind.GAUGE,
    "1",
    "The share of a route's traffic its canary gets, 0 to 1.",
    (),
)
DECISIONS: Final = _family(
    "canary.rollout.decisions",
    "canary_rollout_decisions",
    Kind.COUNTER,
    "{decision}",
    "Rollout decisions by route and verdict.",
    (),
)
NOTIFICATIONS: Final = _family(
    "canary.notifications",
    "canary_notifications",
    Kind.COUNTER,
    "{notification}",
    "Webhook messages of rollout decisions by route and result (delivered, failed, dropped).",
    (),
)
FEEDBACK: Final = _family(
    "canary.feedback",
    "canary_feedback",
    Kind.COUNTER,
    "{feedback}",
    "User feedback (POST /v1/feedback) by route, variant and score (negative, neutral, positive).",
    (),
)
SHADOW: Final = _family(
    "canary.shadow.requests",
    "canary_shadow_requests",
    Kind.COUNTER,
    "{request}",
    "Shadow requests to the canary in its shadow phase, by route and outcome (dispatched, "
    "dropped, completed, failed); never counted as served.",
    (),
)
RELOADS: Final = _family(
    "canary.config.reloads",
    "canary_config_reloads",
    Kind.COUNTER,
    "{reload}",
    "Config reloads by result.",
    (),
)
CONFIG_INFO: Final = _family(
    "canary.config.info",
    "canary_config_info",
    Kind.GAUGE,
    "1",
    "1, with the content hash of the config in force and of what a fleet shares of it.",
    (),
)
STORE_UP: Final = _family(
    "canary.state_store.up",
    "canary_state_store_up",
    Kind.GAUGE,
    "1",
    "1 while the rollout state store answers, 0 while it does not (absent: no store).",
    (),
)
LEADER: Final = _family(
    "canary.controller.leader",
    "canary_controller_leader",
    Kind.GAUGE,
    "1",
    "1 on the process whose rollout controller holds the lease and decides.",
    (),
)
FAMILIES: Final = (
    SERVER_DURATION,
    UPSTREAM_DURATION,
    UPSTREAM_TTFT,
    UPSTREAM_REQUESTS,
    POOL_WAIT,
    POOL_QUEUED,
    POOL_CONNECTIONS,
    OPERATION_DURATION,
    TIME_TO_FIRST_CHUNK,
    TOKEN_USAGE,
    TOKEN_TIME,
    SESSION_DURATION,
    SESSION_IO,
    WEIGHT,
    DECISIONS,
    NOTIFICATIONS,
    FEEDBACK,
    SHADOW,
    RELOADS,
    CONFIG_INFO,
    STORE_UP,
    LEADER,
)


class SeriesHistogram(LogHistogram):
    """A `LogHistogram` with the min and max the OTLP data point carries, and the
    exemplars of sampled requests by export bucket."""

    __slots__ = ("exemplars", "max", "min")

    def __init__(self) -> None:
        super().__init__()
        self.min = float("inf")
        self.max = float("-inf")
        self.exemplars: dict[int, tuple[float, int, int, int]] = {}

    def add(self, value: float) -> None:
        self.record(value)
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value

    def add_traced(
        self, value: float, bounds: Sequence[float], trace_id: int, span_id: int
    ) -> None:
        """`add`, and keep this request as its bucket's exemplar (rule 3)."""
        self.add(value)
        position = bisect.bisect_left(bounds, value)  # upper bounds are inclusive (`le`)
        self.exemplars[position] = (value, time.time_ns(), trace_id, span_id)

    def combine(self, other: SeriesHistogram) -> None:
        """Add `other`'s counts; each bucket keeps its newer exemplar."""
        self.merge(other)
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        exemplars = self.exemplars
        for position, exemplar in other.exemplars.items():
            mine = exemplars.get(position)
            if mine is None or mine[1] < exemplar[1]:
                exemplars[position] = exemplar


@dataclass(frozen=True, slots=True)
class Point:
    """A histogram's cumulative counts at its family's bounds, read off a snapshot."""

    cumulative: tuple[int, ...]
    count: int
    sum: float
    min: float
    max: float
    exemplars: Mapping[int, tuple[float, int, int, int]]  # bucket → (value, ns, trace, span)


@dataclass(frozen=True, slots=True)
class Series:
    family: Family
    points: tuple[tuple[Labels, float | Point], ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every series at one instant: what the exporters read."""

    series: tuple[Series, ...]
    start_time_ns: int
    time_ns: int


class Metrics:
    """The process's metric series since it started."""

    def __init__(self, start_time_ns: int) -> None:
        self.start_time_ns = start_time_ns
        self.server_duration: dict[tuple[str, int, str], SeriesHistogram] = {}
        # Backend attempts, by what any of their families tells apart; the families
        # (upstream duration, ttft and requests, the GenAI operation duration and time to
        # first chunk) are these merged when a snapshot is taken, so that an attempt
        # records one duration and at most one time to first chunk.
        self.attempt_duration: dict[AttemptKey, SeriesHistogram] = {}
        self.attempt_ttft: dict[AttemptKey, SeriesHistogram] = {}
        self.token_usage: dict[tuple[str, str, str, str, str], SeriesHistogram] = {}
        self.attempt_tpot: dict[tuple[str, str, str], SeriesHistogram] = {}
        self.token_time: dict[tuple[str, str, str], float] = {}
        self.pool_wait: dict[str, SeriesHistogram] = {}
        # (route, variant, backend, operation, outcome, error type)
        self.session_duration: dict[tuple[str, Variant, str, str, str, str], SeriesHistogram] = {}
        # (route, variant, backend, operation, direction)
        self.session_io: dict[tuple[str, Variant, str, str, str], int] = {}
        self.decisions: dict[tuple[str, str], int] = {}
        self.notifications: dict[tuple[str, str], int] = {}
        self.feedback: dict[tuple[str, str, str], int] = {}
        self.shadow: dict[tuple[str, str], int] = {}
        self.reloads: dict[str, int] = {}

    @property
    def upstream_requests(self) -> dict[tuple[str, str, str, str, str], int]:
        """Attempts by (route, variant, backend, outcome, error type)."""
        counts: dict[tuple[str, str, str, str, str], int] = {}
        for (route, variant, backend, _op, _provider, outcome, error), histogram in list(
            self.attempt_duration.items()
        ):
            key = (route, variant, backend, outcome, error)
            counts[key] = counts.get(key, 0) + histogram.count
        return counts

    # --- recording (the hot path) -----------------------------------------------------

    def record_attempt(
        self,
        route: str,
        variant: Variant,
        backend: str,
        operation: str | None,
        outcome: str,
        error_type: str,
        duration_s: float,
        ttft_s: float | None,
        trace: tuple[int, int] | None = None,
        provider: str = PROVIDER,
    ) -> None:
        """One backend attempt; `trace` (trace id, span id) when the request was sampled;
        `provider` is the backend API's `gen_ai.provider.name`."""
        key = (route, variant, backend, operation or "", provider, outcome, error_type)
        histograms = self.attempt_duration
        histogram = histograms.get(key)
        if histogram is None:
            histogram = histograms[key] = SeriesHistogram()
        if trace is None:
            histogram.add(duration_s)
        else:
            histogram.add_traced(duration_s, EXPORT_BOUNDS_S, trace[0], trace[1])
        if ttft_s is not None:
            histograms = self.attempt_ttft
            histogram = histograms.get(key)
            if histogram is None:
                histogram = histograms[key] = SeriesHistogram()
            if trace is None:
                histogram.add(ttft_s)
            else:
                histogram.add_traced(ttft_s, EXPORT_BOUNDS_S, trace[0], trace[1])

    def record_pool_wait(self, backend: str, wait_s: float) -> None:
        """An attempt that queued for a connection (rule 4)."""
        _add(self.pool_wait, backend, wait_s, (), None)

    def record_tokens(
        self,
        route: str,
        variant: Variant,
        operation: str,
        input_tokens: int | None,
        output_tokens: int | None,
        provider: str = PROVIDER,
        duration_s: float = 0.0,
    ) -> None:
        for token_type, tokens in (("input", input_tokens), ("output", output_tokens)):
            if tokens is None:
                continue
            key = (route, variant, operation, provider, token_type)
            _add(self.token_usage, key, float(tokens), (), None)
        if output_tokens is not None:
            time_key = (route, variant, operation)
            self.token_time[time_key] = self.token_time.get(time_key, 0.0) + duration_s

    def record_tpot(self, route: str, variant: Variant, backend: str, tpot_s: float) -> None:
        """The time per output token of one streamed attempt."""
        _add(self.attempt_tpot, (route, variant, backend), tpot_s, (), None)

    def record_request(
        self,
        method: str,
        status: int,
        route: str,
        duration_s: float,
        trace: tuple[int, int] | None = None,
    ) -> None:
        key = (known_method(method), status, route)
        _add(self.server_duration, key, duration_s, EXPORT_BOUNDS_S, trace)

    def record_session(
        self,
        route: str,
        variant: Variant,
        backend: str,
        operation: str,
        outcome: str,
        error_type: str,
        duration_s: float,
        to_backend: int,
        to_client: int,
        trace: tuple[int, int] | None = None,
    ) -> None:
        """One upgraded session that ended (rule 5)."""
        key = (route, variant, backend, operation, outcome, error_type)
        _add(self.session_duration, key, duration_s, EXPORT_BOUNDS_S, trace)
        io = self.session_io
        for direction, count in (
            ("client_to_backend", to_backend),
            ("backend_to_client", to_client),
        ):
            io_key = (route, variant, backend, operation, direction)
            io[io_key] = io.get(io_key, 0) + count

    def record_decision(self, route: str, verdict: str) -> None:
        self.decisions[(route, verdict)] = self.decisions.get((route, verdict), 0) + 1

    def record_notification(self, route: str, result: str) -> None:
        key = (route, result)
        self.notifications[key] = self.notifications.get(key, 0) + 1

    def record_feedback(self, route: str, variant: Variant, score: str) -> None:
        key = (route, variant, score)
        self.feedback[key] = self.feedback.get(key, 0) + 1

    def record_shadow(self, route: str, outcome: str) -> None:
        key = (route, outcome)
        self.shadow[key] = self.shadow.get(key, 0) + 1

    def record_reload(self, result: str) -> None:
        self.reloads[result] = self.reloads.get(result, 0) + 1

    # --- reading ------------------------------------------------------------------------

    def snapshot(self, gauges: Gauges, now_ns: int | None = None) -> Snapshot:
        """Every series as it is now, copied: readers never hold the live dicts."""
        return Snapshot(
            tuple(self._series(gauges)),
            self.start_time_ns,
            time.time_ns() if now_ns is None else now_ns,
        )

    def _series(self, gauges: Gauges) -> Iterable[Series]:
        yield _histograms(
            SERVER_DURATION,
            (
                (
                    (
                        ("http.request.method", method),
                        ("http.response.status_code", str(status)),
                        ("http.route", route),
                    ),
                    histogram,
                )
                for (method, status, route), histogram in sorted(self.server_duration.items())
            ),
        )
        duration, ttft = self.attempt_duration, self.attempt_ttft
        by_backend = _by_backend_labels
        yield _histograms(UPSTREAM_DURATION, _merged(duration, by_backend))
        yield _histograms(UPSTREAM_TTFT, _merged(ttft, by_backend))
        yield _histograms(
            UPSTREAM_TPOT,
            (
                (
                    (("canary.route", route), ("canary.variant", variant), ("canary.backend", b)),
                    histogram,
                )
                for (route, variant, b), histogram in sorted(self.attempt_tpot.items())
            ),
        )
        counts: dict[Labels, int] = {}
        for key, histogram in duration.items():
            labels = _outcome_labels(key)
            counts[labels] = counts.get(labels, 0) + histogram.count
        yield Series(
            UPSTREAM_REQUESTS, tuple((labels, float(n)) for labels, n in sorted(counts.items()))
        )
        yield _histograms(
            POOL_WAIT,
            (
                ((("canary.backend", backend),), histogram)
                for backend, histogram in sorted(self.pool_wait.items())
            ),
        )
        pools = sorted(gauges.pools, key=lambda pool: pool.backend)
        yield Series(
            POOL_QUEUED,
            tuple(((("canary.backend", pool.backend),), float(pool.queued)) for pool in pools),
        )
        yield Series(
            POOL_CONNECTIONS,
            tuple(
                ((("canary.backend", pool.backend), ("state", state)), float(count))
                for pool in pools
                for state, count in (("busy", pool.busy), ("idle", pool.idle))
            ),
        )
        yield _histograms(OPERATION_DURATION, _merged(duration, _operation_labels))
        yield _histograms(TIME_TO_FIRST_CHUNK, _merged(ttft, _first_chunk_labels))
        yield _histograms(
            TOKEN_USAGE,
            (
                (
                    (
                        ("gen_ai.operation.name", operation),
                        ("gen_ai.provider.name", provider),
                        ("gen_ai.token.type", token_type),
                        ("canary.route", route),
                        ("canary.variant", variant),
                    ),
                    histogram,
                )
                for (route, variant, operation, provider, token_type), histogram in sorted(
                    self.token_usage.items()
                )
            ),
        )
        yield Series(
            TOKEN_TIME,
            tuple(
                (
                    (
                        ("gen_ai.operation.name", operation),
                        ("canary.route", route),
                        ("canary.variant", variant),
                    ),
                    seconds,
                )
                for (route, variant, operation), seconds in sorted(self.token_time.items())
            ),
        )
        yield _histograms(
            SESSION_DURATION,
            (
                (
                    (
                        ("canary.route", route),
                        ("canary.variant", variant),
                        ("canary.backend", backend),
                        ("canary.operation", operation),
                        ("outcome", outcome),
                        *((("error.type", error_type),) if error_type else ()),
                    ),
                    histogram,
                )
                for (route, variant, backend, operation, outcome, error_type), histogram in sorted(
                    self.session_duration.items()
                )
            ),
        )
        yield Series(
            SESSION_IO,
            tuple(
                (
                    (
                        ("canary.route", route),
                        ("canary.variant", variant),
                        ("canary.backend", backend),
                        ("canary.operation", operation),
                        ("direction", direction),
                    ),
                    float(count),
                )
                for (route, variant, backend, operation, direction), count in sorted(
                    self.session_io.items()
                )
            ),
        )
        yield Series(
            WEIGHT,
            tuple(
                ((("canary.route", route),), weight / 100.0)
                for route, weight in gauges.weights.items()
            ),
        )
        yield Series(
            DECISIONS,
            tuple(
                ((("canary.route", route), ("verdict", verdict)), float(count))
                for (route, verdict), count in sorted(self.decisions.items())
            ),
        )
        yield Series(
            NOTIFICATIONS,
            tuple(
                ((("canary.route", route), ("result", result)), float(count))
                for (route, result), count in sorted(self.notifications.items())
            ),
        )
        yield Series(
            FEEDBACK,
            tuple(
                (
                    (("canary.route", route), ("canary.variant", variant), ("score", score)),
                    float(count),
                )
                for (route, variant, score), count in sorted(self.feedback.items())
            ),
        )
        yield Series(
            SHADOW,
            tuple(
                ((("canary.route", route), ("outcome", outcome)), float(count))
                for (route, outcome), count in sorted(self.shadow.items())
            ),
        )
        yield Series(
            RELOADS,
            tuple(((("result", result),), float(n)) for result, n in sorted(self.reloads.items())),
        )
        yield Series(
            CONFIG_INFO,
            (
                (
                    (
                        ("canary.config_version", gauges.config_version),
                        ("canary.fleet_version", gauges.fleet_version),
                    ),
                    1.0,
                ),
            ),
        )
        if gauges.store_up is not None:
            yield Series(STORE_UP, (((), 1.0 if gauges.store_up else 0.0),))
            yield Series(LEADER, (((), 1.0 if gauges.leader else 0.0),))


def _add(
    histograms: dict[_K, SeriesHistogram],
    key: _K,
    value: float,
    bounds: Sequence[float],
    trace: tuple[int, int] | None,
) -> None:
    histogram = histograms.get(key)
    if histogram is None:
        histogram = histograms[key] = SeriesHistogram()
    if trace is None:
        histogram.add(value)
    else:
        histogram.add_traced(value, bounds, trace[0], trace[1])


def _by_backend_labels(key: AttemptKey) -> Labels | None:
    route, variant, backend, _operation, _provider, outcome, _error = key
    if outcome == "rejected":
        return None  # rule 4
    return (("canary.route", route), ("canary.variant", variant), ("canary.backend", backend))


def _outcome_labels(key: AttemptKey) -> Labels:
    route, variant, backend, _operation, _provider, outcome, error_type = key
    return (
        ("canary.route", route),
        ("canary.variant", variant),
        ("canary.backend", backend),
        ("outcome", outcome),
        *((("error.type", error_type),) if error_type else ()),
    )


def _operation_labels(key: AttemptKey) -> Labels | None:
    """A GenAI operation's attempt that ended (a client that left is not one), by the
    conventions' attributes."""
    route, variant, _backend, operation, provider, outcome, error_type = key
    if not operation or outcome in ("cancelled", "rejected"):
        return None
    return (
        ("gen_ai.operation.name", operation),
        ("gen_ai.provider.name", provider),
        ("canary.route", route),
        ("canary.variant", variant),
        *((("error.type", error_type),) if error_type else ()),
    )


def _first_chunk_labels(key: AttemptKey) -> Labels | None:
    route, variant, _backend, operation, provider, outcome, _error = key
    if not operation or outcome == "cancelled":
        return None
    return (
        ("gen_ai.operation.name", operation),
        ("gen_ai.provider.name", provider),
        ("canary.route", route),
        ("canary.variant", variant),
    )


def _merged(
    histograms: Mapping[AttemptKey, SeriesHistogram],
    labels_of: Callable[[AttemptKey], Labels | None],
) -> Iterable[tuple[Labels, SeriesHistogram]]:
    """The attempts' histograms merged by the labels of one family (None: not in it)."""
    merged: dict[Labels, SeriesHistogram] = {}
    for key, histogram in histograms.items():
        labels = labels_of(key)
        if labels is None:
            continue
        total = merged.get(labels)
        if total is None:
            total = merged[labels] = SeriesHistogram()
        total.combine(histogram)
    return sorted(merged.items())


def _histograms(family: Family, items: Iterable[tuple[Labels, SeriesHistogram]]) -> Series:
    return Series(
        family,
        tuple(
            (
                labels,
                Point(
                    tuple(histogram.cumulative(family.bounds)),
                    histogram.count,
                    histogram.sum,
                    histogram.min,
                    histogram.max,
                    dict(histogram.exemplars),
                ),
            )
            for labels, histogram in items
        ),
    )


# --- OTLP, as the SDK's MetricsData ---------------------------------------------------


def metrics_data(
    snapshot: Snapshot, resource: Resource, scope: InstrumentationScope
) -> MetricsData:
    """The snapshot as the SDK's `MetricsData`: cumulative since the process started."""
    metrics = [
        _metric(series, snapshot.start_time_ns, snapshot.time_ns)
        for series in snapshot.series
        if series.points
    ]
    return MetricsData(
        [ResourceMetrics(resource, [ScopeMetrics(scope, metrics, "")], "")],
    )


def _metric(series: Series, start_ns: int, now_ns: int) -> Metric:
    family = series.family
    cumulative = AggregationTemporality.CUMULATIVE
    data: Histogram | Sum | Gauge
    if family.kind == Kind.HISTOGRAM:
        data = Histogram(
            [
                _histogram_point(family, dict(labels), value, start_ns, now_ns)
                for labels, value in series.points
                if isinstance(value, Point)
            ],
            cumulative,
        )
    else:
        points = [
            NumberDataPoint(
                dict(labels),
                start_ns if family.kind == Kind.COUNTER else 0,
                now_ns,
                int(value) if family.kind == Kind.COUNTER else value,
            )
            for labels, value in series.points
            if not isinstance(value, Point)
        ]
        data = Sum(points, cumulative, True) if family.kind == Kind.COUNTER else Gauge(points)
    return Metric(family.name, family.description, family.unit, data)


def _histogram_point(
    family: Family, attributes: dict[str, str], point: Point, start_ns: int, now_ns: int
) -> HistogramDataPoint:
    counts = [b - a for a, b in zip((0, *point.cumulative), point.cumulative, strict=False)]
    counts.append(point.count - (point.cumulative[-1] if point.cumulative else 0))
    exemplars = [
        Exemplar({}, value, at_ns, span_id, trace_id)
        for value, at_ns, trace_id, span_id in point.exemplars.values()
    ]
    return HistogramDataPoint(
        attributes,
        start_ns,
        now_ns,
        point.count,
        point.sum,
        counts,
        family.bounds,
        point.min,
        point.max,
        exemplars,
    )
