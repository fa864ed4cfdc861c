"""Real OTLP receivers on 127.0.0.1 that decode what they are sent with opentelemetry-proto.

They stand where Jaeger or an OpenTelemetry Collector would:
- `otlp_receiver()`: OTLP/HTTP, `POST /v1/traces` and `POST /v1/metrics` with protobuf
  bodies (gzip or deflate when the exporter compresses), optionally over TLS;
- `grpc_receiver()`: OTLP/gRPC, the collector's TraceService and MetricsService,
  served by grpcio.
Either can be made slow (`delay_s`) to play a collector in trouble, or refuse metrics
as Jaeger does (HTTP 404, gRPC UNIMPLEMENTED). Both keep each request's headers.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.harness import eventually

TLS_DIR = Path(__file__).parent / "tls"
CERTIFICATE = TLS_DIR / "receiver.pem"  # self-signed for 127.0.0.1, the CA of itself
_KEY = TLS_DIR / "receiver.key"


class Receiver:
    """What a receiver was sent."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.trace_requests: list[ExportTraceServiceRequest] = []
        self.metric_requests: list[ExportMetricsServiceRequest] = []
        self.content_types: set[str] = set()
        self.headers: list[dict[str, str]] = []  # of every request, names in lower case
        self.port = 0
        self.scheme = "http"
        self.refuse_metrics = False  # answer 404 (gRPC: UNIMPLEMENTED) to metrics, as Jaeger
        self.metric_posts = 0

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def spans(self) -> list[Span]:
        return [
            span
            for request in list(self.trace_requests)
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    async def wait_for_spans(self, count: int, timeout_s: float = 5.0) -> list[Span]:
        return await eventually(
            f"{count} spans at the collector",
            self.spans,
            holds=lambda spans: len(spans) >= count,
            timeout_s=timeout_s,
        )

    async def wait_for_metrics(self, timeout_s: float = 5.0) -> None:
        await eventually(
            "metrics at the collector", lambda: self.metric_requests, timeout_s=timeout_s
        )

    def metric(self, name: str) -> Any:
        """The newest data of the metric called `name`, or None."""
        for request in reversed(list(self.metric_requests)):
            for resource_metrics in request.resource_metrics:
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        if metric.name == name:
                            return metric
        return None

    def resource(self) -> dict[str, Any]:
        """The resource attributes of the first trace request."""
        (resource_spans, *_) = self.trace_requests[0].resource_spans
        return {kv.key: plain(kv.value) for kv in resource_spans.resource.attributes}


def attributes(span: Any) -> dict[str, Any]:
    """A span's (or event's, or data point's) attributes as plain Python values."""
    return {kv.key: plain(kv.value) for kv in span.attributes}


def plain(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [plain(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


@asynccontextmanager
async def otlp_receiver(delay_s: float = 0.0, tls: bool = False) -> AsyncIterator[Receiver]:
    receiver = Receiver(delay_s)

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp undoes a Content-Encoding (gzip, deflate)
        receiver.content_types.add(request.headers.get("Content-Type", ""))
        receiver.headers.append({k.lower(): v for k, v in request.headers.items()})
        await asyncio.sleep(receiver.delay_s)
        receiver.trace_requests.append(ExportTraceServiceRequest.FromString(body))
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def metrics(request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp undoes a Content-Encoding (gzip, deflate)
        receiver.metric_posts += 1
        receiver.headers.append({k.lower(): v for k, v in request.headers.items()})
        if receiver.refuse_metrics:
            return web.Response(status=404, text="404 page not found")
        await asyncio.sleep(receiver.delay_s)
        receiver.metric_requests.append(ExportMetricsServiceRequest.FromString(body))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    app.router.add_post("/v1/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    context = None
    if tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(CERTIFICATE, _KEY)
        receiver.scheme = "https"
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    receiver.port = runner.addresses[0][1]
    try:
        yield receiver
    finally:
        await runner.cleanup()


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(
        self, request: ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> ExportTraceServiceResponse:
        self.receiver.headers.append(dict(context.invocation_metadata()))
        time.sleep(self.receiver.delay_s)
        self.receiver.trace_requests.append(request)
        return ExportTraceServiceResponse()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(
        self, request: ExportMetricsServiceRequest, context: grpc.ServicerContext
    ) -> ExportMetricsServiceResponse:
        self.receiver.metric_posts += 1
        self.receiver.headers.append(dict(context.invocation_metadata()))
        if self.receiver.refuse_metrics:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "unknown service")
        self.receiver.metric_requests.append(request)
        return ExportMetricsServiceResponse()


@contextmanager
def grpc_receiver() -> Iterator[Receiver]:
    """An OTLP/gRPC collector on 127.0.0.1 (its servicers run on their own threads)."""
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(receiver), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsService(receiver), server)
    receiver.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver
    finally:
        done = server.stop(grace=None)
        done.wait(2.0)
