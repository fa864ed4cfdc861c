"""Sending spans and metrics to an OTLP/HTTP endpoint (Jaeger, a Collector), in the background.

Rules:
1. One task per process: spans go out in batches of up to 512 every second (sooner
   when a batch is full); metrics every `METRICS_INTERVAL_S`, cumulative. An endpoint
   that answers 404 to metrics (Jaeger takes traces only) is sent none after that.
2. A collector that is down or slow costs requests nothing: the task never holds
   the event loop for a request, every POST has a timeout, and after a failure the
   task backs off (1 s doubling to 30 s) while the bounded span queue drops what does
   not fit and counts it (`Recorder.spans_dropped`).
3. A failed batch is dropped, not retried: telemetry must not pile up behind an outage.
4. On shutdown, what is queued gets one last try, within `FLUSH_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Final

import aiohttp

from proxy import __version__
from proxy.telemetry.metrics import Gauges
from proxy.telemetry.recorder import SCOPE, Recorder
from proxy.telemetry.tracing import export_request

__all__ = ["METRICS_INTERVAL_S", "OtlpExporter"]

log = logging.getLogger("proxy.telemetry.exporter")

METRICS_INTERVAL_S: Final = 10.0
FLUSH_S: Final = 2.0
_SPANS_INTERVAL_S: Final = 1.0
_TIMEOUT: Final = aiohttp.ClientTimeout(total=5, sock_connect=1)
_MAX_BACKOFF_S: Final = 30.0
_PROTOBUF: Final = {"Content-Type": "application/x-protobuf"}
# Answers that mean "no such service here": Jaeger's OTLP receiver takes no metrics.
_NOT_TAKEN: Final = frozenset({404, 405, 501})


class OtlpExporter:
    """Drains a `Recorder`'s spans and metrics to `endpoint` (`http://host:4318`)."""

    def __init__(
        self,
        endpoint: str,
        telemetry: Recorder,
        gauges: Callable[[], Gauges],
        metrics_interval_s: float = METRICS_INTERVAL_S,
    ) -> None:
        base = endpoint.rstrip("/")
        self._traces_url = f"{base}/v1/traces"
        self._metrics_url = f"{base}/v1/metrics"
        self._telemetry = telemetry
        self._metrics_interval_s = metrics_interval_s
        self._gauges = gauges
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._backoff_s = 0.0
        self._failing_since: float | None = None
        self._metrics_taken = True
        self._last_reason = ""

    def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=_TIMEOUT)
        self._telemetry.batch_ready = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="otlp exporter")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_S):
                    await self._flush()
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        telemetry = self._telemetry
        ready = telemetry.batch_ready
        assert ready is not None
        next_metrics = time.monotonic() + self._metrics_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(_SPANS_INTERVAL_S, self._backoff_s)):
                    await ready.wait()
            ready.clear()
            if self._backoff_s and telemetry.queued_spans:
                # Still failing: keep the queue from growing stale, try one batch.
                await self._send_spans()
                continue
            while telemetry.queued_spans:
                if not await self._send_spans():
                    break
            if time.monotonic() >= next_metrics:
                next_metrics = time.monotonic() + self._metrics_interval_s
                await self._send_metrics()

    async def _flush(self) -> None:
        while self._telemetry.queued_spans:
            if not await self._send_spans():
                return
        await self._send_metrics()

    async def _send_metrics(self) -> None:
        if not self._metrics_taken:
            return
        telemetry = self._telemetry
        body = telemetry.metrics.otlp_request(
            self._gauges(), telemetry.resource, SCOPE, __version__, time.time_ns()
        )
        status = await self._post(self._metrics_url, body)
        if status in _NOT_TAKEN:
            # Jaeger takes traces only: metrics stay on the admin port's /metrics.
            self._metrics_taken = False
            log.info(
                "%s does not take OTLP metrics (it answered %d); metrics are on /metrics only",
                self._metrics_url,
                status,
            )
        elif status is None or status >= 300:
            self._failed(self._metrics_url, status, "metrics")

    async def _send_spans(self) -> bool:
        telemetry = self._telemetry
        spans = telemetry.take_spans()
        if not spans:
            return True
        body = export_request(telemetry.resource, SCOPE, __version__, spans)
        status = await self._post(self._traces_url, body)
        if status is not None and status < 300:
            telemetry.spans_exported += len(spans)
            if self._failing_since is not None:
                log.info("span export to %s works again", self._traces_url)
            self._backoff_s = 0.0
            self._failing_since = None
            return True
        telemetry.spans_dropped += len(spans)
        self._failed(self._traces_url, status, "spans")
        return False

    async def _post(self, url: str, body: bytes) -> int | None:
        """The HTTP status of the POST, None when it failed before one."""
        assert self._session is not None
        try:
            async with self._session.post(url, data=body, headers=_PROTOBUF) as response:
                await response.read()
                return response.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._last_reason = (
                f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
            )
            return None

    def _failed(self, url: str, status: int | None, what: str) -> None:
        telemetry = self._telemetry
        reason = f"{url} answered {status}" if status is not None else f"{url}: {self._last_reason}"
        telemetry.export_failures += 1
        telemetry.last_export_error = reason
        if what == "spans":
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.warning("span export failed (%s); spans are dropped until it works", reason)
            self._backoff_s = min(_MAX_BACKOFF_S, max(1.0, self._backoff_s * 2))
