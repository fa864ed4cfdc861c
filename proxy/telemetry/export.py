"""Spans and metrics to an OTLP endpoint through the OpenTelemetry SDK, in the background.

Rules:
1. Spans: the recorder hands finished spans (sampled requests only) to `emit`, which
   gives them to the SDK's `BatchSpanProcessor` (on the `TracerProvider`) and its
   OTLP exporter, gRPC or HTTP, with the SDK's batching, retry with backoff, timeouts,
   headers, compression and TLS. Its own thread does the encoding and sending.
2. The queue is bounded (`OTEL_BSP_MAX_QUEUE_SIZE`, else 8192): when the collector is
   down or slow, what does not fit is dropped and counted; requests never wait.
3. Metrics: every interval (`OTEL_METRIC_EXPORT_INTERVAL`, else 10 s) a snapshot of the
   recorder's series is taken on the event loop and sent, as the SDK's `MetricsData`,
   by the SDK's OTLP metric exporter on a worker thread. An endpoint that does not take
   metrics (HTTP 404, 405, 501; gRPC UNIMPLEMENTED: Jaeger takes traces only) is sent
   none after that.
4. The pipeline owns its counters (exported, dropped, failures, the last error); it
   reads the recorder's state and never changes it.
5. A failing export is logged once, when it starts failing, and again when it works:
   the SDK's own messages repeat while it fails, and are kept back meanwhile.
6. Stopping sends what is queued and the metrics once more, within `FLUSH_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Tracer

from proxy import __version__
from proxy.config.model import OtlpProtocol
from proxy.telemetry.metrics import Snapshot, metrics_data
from proxy.telemetry.settings import Signal, TelemetrySettings
from proxy.telemetry.tracing import sdk_sampler

__all__ = ["FLUSH_S", "SCOPE", "ExportStatus", "OtelExport", "process_resource"]

log = logging.getLogger("proxy.telemetry.export")

SCOPE: Final = "canary-proxy"
FLUSH_S: Final = 2.0
_QUEUE: Final = 8192
_SCHEDULE_DELAY_MS: Final = 1000
_NOT_TAKEN_STATUS: Final = frozenset({404, 405, 501})
# The loggers of the SDK's OTLP exporters, whose failure messages are kept (rule 5).
_EXPORTER_LOGGERS: Final = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.common.http",
)


class _Resource(Resource):
    """A `Resource` whose hash is computed once: the SDK's OTLP encoder groups spans by
    resource, and `Resource.__hash__` serializes every attribute each time it is asked."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource.attributes, resource.schema_url)
        self.hash = super().__hash__()

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other: object) -> bool:
        return super().__eq__(other)


def process_resource(settings: TelemetrySettings) -> Resource:
    """The process's resource: OTEL_RESOURCE_ATTRIBUTES, then the proxy's own (which win)."""
    host = socket.gethostname()
    created = Resource.create(
        {
            "service.name": settings.service_name,
            "service.version": __version__,
            # One identity per process: the workers and replicas of a fleet each export
            # their own cumulative series, which must not be mistaken for one another.
            "service.instance.id": f"{host}:{os.getpid()}",
            "host.name": host,
            "process.pid": os.getpid(),
        }
    )
    return _Resource(created)


class ExportStatus:
    """What the pipeline has done: the status page's `telemetry` section."""

    __slots__ = (
        "export_failures",
        "last_export_error",
        "metrics_taken",
        "spans_dropped",
        "spans_exported",
        "spans_handed",
        "spans_taken",
    )

    def __init__(self) -> None:
        self.spans_handed = 0  # given to the processor (event loop)
        self.spans_taken = 0  # taken from its queue by the exporter (export thread)
        self.spans_exported = 0
        self.spans_dropped = 0
        self.export_failures = 0
        self.last_export_error: str | None = None
        self.metrics_taken = True

    @property
    def spans_queued(self) -> int:
        return max(0, self.spans_handed - self.spans_taken)


class _Signal:
    """One signal's export thread(s) and whether it is failing, for the log filter."""

    def __init__(self, signal: Signal, status: ExportStatus) -> None:
        self.signal = signal
        self.status = status
        self.threads: set[int] = set()
        self.failing = False
        self.reason: str | None = None
        self.not_taken = False

    def started(self) -> None:
        self.threads.add(threading.get_ident())
        self.reason = None

    def finished(self, ok: bool) -> None:
        status = self.status
        if ok:
            if self.failing:
                log.info("%s export to %s works again", self.signal.kind, self.signal.shown)
            self.failing = False
            return
        status.export_failures += 1
        status.last_export_error = (
            f"{self.signal.kind} to {self.signal.shown}: {self.reason or 'export failed'}"
        )
        self.failing = True


class _ExportLog(logging.Filter):
    """Keeps the SDK exporters' failure messages of this pipeline's threads (rule 5)."""

    def __init__(self, signals: Sequence[_Signal]) -> None:
        super().__init__()
        self._signals = signals

    def filter(self, record: logging.LogRecord) -> bool:
        for signal in self._signals:
            if record.thread not in signal.threads or record.levelno < logging.WARNING:
                continue
            if any(_refuses(arg) for arg in _args(record)):
                signal.not_taken = True
                return False
            if signal.reason is None:
                signal.reason = record.getMessage()
            return not signal.failing
        return True


def _args(record: logging.LogRecord) -> tuple[object, ...]:
    args = record.args
    return args if isinstance(args, tuple) else ()


def _refuses(arg: object) -> bool:
    """An HTTP status or gRPC code that says "no such service here"."""
    if isinstance(arg, int) and not isinstance(arg, bool):
        return arg in _NOT_TAKEN_STATUS
    return getattr(arg, "name", None) == "UNIMPLEMENTED"


class _CountingSpanExporter(SpanExporter):
    """The SDK's OTLP span exporter, with what it did counted (rule 4)."""

    def __init__(self, inner: SpanExporter, signal: _Signal) -> None:
        self._inner = inner
        self._signal = signal

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        signal, status = self._signal, self._signal.status
        status.spans_taken += len(spans)
        signal.started()
        result = self._inner.export(spans)
        ok = result is SpanExportResult.SUCCESS
        if ok:
            status.spans_exported += len(spans)
        else:
            status.spans_dropped += len(spans)
        signal.finished(ok)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def _span_exporter(signal: Signal) -> SpanExporter:
    if signal.protocol is OtlpProtocol.GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        return GrpcSpanExporter(endpoint=signal.endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    return HttpSpanExporter(endpoint=signal.endpoint)


def _metric_exporter(signal: Signal) -> MetricExporter:
    if signal.protocol is OtlpProtocol.GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )

        return GrpcMetricExporter(endpoint=signal.endpoint)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetricExporter,
    )

    return HttpMetricExporter(endpoint=signal.endpoint)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


class OtelExport:
    """The SDK pipeline of one process and one telemetry setting (rules 1-6)."""

    def __init__(self, settings: TelemetrySettings, snapshot: Callable[[], Snapshot]) -> None:
        self.settings = settings
        self.status = ExportStatus()
        self.resource = process_resource(settings)
        self.scope = InstrumentationScope(SCOPE, __version__)
        self._snapshot = snapshot
        self._signals: list[_Signal] = []
        self._provider: TracerProvider | None = None
        self._processor: BatchSpanProcessor | None = None
        self._span_exporter: SpanExporter | None = None
        self._traces: _Signal | None = None
        self._metrics: _Signal | None = None
        self._metric_exporter: MetricExporter | None = None
        self._metric_thread: ThreadPoolExecutor | None = None
        self._metric_task: asyncio.Task[None] | None = None
        self._queue_limit = _env_int("OTEL_BSP_MAX_QUEUE_SIZE", _QUEUE)
        self.tracer: Tracer | None = None
        self._log = _ExportLog(self._signals)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        settings = self.settings
        for name in _EXPORTER_LOGGERS:
            logging.getLogger(name).addFilter(self._log)
        if settings.traces is not None:
            self._traces = _Signal(settings.traces, self.status)
            self._signals.append(self._traces)
            self._span_exporter = _span_exporter(settings.traces)
            self._processor = BatchSpanProcessor(
                _CountingSpanExporter(self._span_exporter, self._traces),
                max_queue_size=self._queue_limit,
                schedule_delay_millis=(
                    None if "OTEL_BSP_SCHEDULE_DELAY" in os.environ else _SCHEDULE_DELAY_MS
                ),
            )
            self._provider = TracerProvider(
                sampler=sdk_sampler(settings.sampling),
                resource=self.resource,
                shutdown_on_exit=False,
            )
            self._provider.add_span_processor(self._processor)
            self.tracer = self._provider.get_tracer(SCOPE, __version__)
        if settings.metrics is not None:
            self._metrics = _Signal(settings.metrics, self.status)
            self._signals.append(self._metrics)
            self._metric_exporter = _metric_exporter(settings.metrics)
            self._metric_thread = ThreadPoolExecutor(1, thread_name_prefix="otlp-metrics")
            self._metric_task = asyncio.get_running_loop().create_task(
                self._send_metrics_every_interval(), name="otlp metrics"
            )

    async def stop(self) -> None:
        if self._metric_task is not None:
            self._metric_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._metric_task
            self._metric_task = None
        flushed = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FLUSH_S):
                await asyncio.gather(self._stop_traces(), self._send_metrics())
                flushed = True
        if not flushed and self._span_exporter is not None:
            # Past the flush time: the span exporter's retries give up now.
            await asyncio.to_thread(self._span_exporter.shutdown)
        if self._metric_exporter is not None:
            await asyncio.to_thread(self._metric_exporter.shutdown)
        if self._metric_thread is not None:
            self._metric_thread.shutdown(wait=False)
        for name in _EXPORTER_LOGGERS:
            logging.getLogger(name).removeFilter(self._log)

    async def _stop_traces(self) -> None:
        if self._provider is not None:
            provider, self._provider = self._provider, None
            await asyncio.to_thread(provider.shutdown)

    # --- spans ----------------------------------------------------------------------------

    @property
    def tracing(self) -> bool:
        return self._processor is not None

    def emit(self, span: ReadableSpan) -> None:
        """Hand a finished span over; dropped and counted when the queue is full."""
        processor = self._processor
        status = self.status
        if processor is None:
            return
        if status.spans_handed - status.spans_taken >= self._queue_limit:
            status.spans_dropped += 1
            return
        status.spans_handed += 1
        processor.on_end(span)

    # --- metrics --------------------------------------------------------------------------

    async def _send_metrics_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.settings.metric_interval_s)
            await self._send_metrics()

    async def _send_metrics(self) -> None:
        exporter, signal, thread = self._metric_exporter, self._metrics, self._metric_thread
        if exporter is None or signal is None or thread is None or not self.status.metrics_taken:
            return
        data = metrics_data(self._snapshot(), self.resource, self.scope)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(thread, self._export_metrics, exporter, signal, data)

    def _export_metrics(self, exporter: MetricExporter, signal: _Signal, data: MetricsData) -> None:
        signal.started()
        signal.not_taken = False
        ok = exporter.export(data) is MetricExportResult.SUCCESS
        if not ok and signal.not_taken:
            self.status.metrics_taken = False
            log.info(
                "%s does not take OTLP metrics; metrics are on /metrics only", signal.signal.shown
            )
            return
        signal.finished(ok)
