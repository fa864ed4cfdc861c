"""A real OTLP/HTTP receiver on 127.0.0.1 that decodes what it is sent with opentelemetry-proto.

It stands where Jaeger or an OpenTelemetry Collector would: `POST /v1/traces` and
`POST /v1/metrics` with protobuf bodies. It can be made slow (`delay_s`) to play a
collector in trouble.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


class Receiver:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.trace_requests: list[ExportTraceServiceRequest] = []
        self.metric_requests: list[ExportMetricsServiceRequest] = []
        self.content_types: set[str] = set()
        self.port = 0
        self.refuse_metrics = False  # answer 404 to metrics, as Jaeger does
        self.metric_posts = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.content_types.add(request.headers.get("Content-Type", ""))
        await asyncio.sleep(self.delay_s)
        self.trace_requests.append(ExportTraceServiceRequest.FromString(body))
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def metrics(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.metric_posts += 1
        if self.refuse_metrics:
            return web.Response(status=404, text="404 page not found")
        await asyncio.sleep(self.delay_s)
        self.metric_requests.append(ExportMetricsServiceRequest.FromString(body))
        return web.Response(body=b"", content_type="application/x-protobuf")

    def spans(self) -> list[Span]:
        return [
            span
            for request in self.trace_requests
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    async def wait_for_spans(self, count: int, timeout_s: float = 5.0) -> list[Span]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.spans()) >= count:
                break
            await asyncio.sleep(0.05)
        return self.spans()

    def metric(self, name: str) -> Any:
        """The newest data of the metric called `name`, or None."""
        for request in reversed(self.metric_requests):
            for resource_metrics in request.resource_metrics:
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        if metric.name == name:
                            return metric
        return None


def attributes(span: Span) -> dict[str, Any]:
    """A span's attributes as plain Python values."""
    return {kv.key: plain(kv.value) for kv in span.attributes}


def plain(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [plain(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


@asynccontextmanager
async def otlp_receiver(delay_s: float = 0.0) -> AsyncIterator[Receiver]:
    receiver = Receiver(delay_s)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", receiver.traces)
    app.router.add_post("/v1/metrics", receiver.metrics)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.port = runner.addresses[0][1]
    try:
        yield receiver
    finally:
        await runner.cleanup()
