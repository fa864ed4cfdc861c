"""The standard OTEL_* variables, each as a user sets it, seen at a real OTLP receiver.

Each test sets variables in the proxy's environment, sends a request through the
public port and decodes what the receiver got (stopping the proxy flushes its spans
and metrics). The config's `telemetry:` keys win where they are set.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from proxy.config.model import OtlpProtocol, TelemetryConfig
from proxy.telemetry.settings import resolve
from tests.conftest import Backends
from tests.harness import RunningProxy, proxy_yaml, running_proxy
from tests.otlp_receiver import CERTIFICATE, grpc_receiver, otlp_receiver

CHAT = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def one_request(proxy: RunningProxy, headers: dict[str, str] | None = None) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy.url}/v1/chat/completions", json=CHAT, headers=headers) as response,
    ):
        assert response.status == 200
        await response.read()


async def status_telemetry(proxy: RunningProxy) -> dict[str, Any]:
    url = f"http://127.0.0.1:{proxy.server.admin_port}/api/status"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        document: dict[str, Any] = json.loads(await response.read())
    telemetry: dict[str, Any] = document["telemetry"]
    return telemetry


def config(backends: Backends, telemetry: str = "") -> str:
    return proxy_yaml(backends.stable.url, backends.canary.url, top=telemetry)


@pytest.fixture(autouse=True)
def _clean_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


async def test_sdk_disabled_exports_nothing(
    backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    async with otlp_receiver() as receiver:
        text = config(backends, f"telemetry: {{otlp_endpoint: '{receiver.endpoint}'}}")
        async with running_proxy(text) as proxy:
            await one_request(proxy)
            telemetry = await status_telemetry(proxy)
    assert receiver.trace_requests == []
    assert receiver.metric_requests == []
    assert telemetry["sdk_disabled"] is True


async def test_service_name_and_resource_attributes(
    backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "llm-gateway")
    monkeypatch.setenv(
        "OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=staging,team=ml%20platform"
    )
    async with otlp_receiver() as receiver:
        text = config(backends, f"telemetry: {{otlp_endpoint: '{receiver.endpoint}'}}")
        async with running_proxy(text) as proxy:
            await one_request(proxy)
        resource = receiver.resource()
    assert resource["service.name"] == "llm-gateway"
    assert resource["deployment.environment.name"] == "staging"
    assert resource["team"] == "ml platform"


async def test_the_configs_service_name_wins(
    backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-the-environment")
    async with otlp_receiver() as receiver:
        text = config(
            backends,
            f"telemetry: {{otlp_endpoint: '{receiver.endpoint}', service_name: from-config}}",
        )
        async with running_proxy(text) as proxy:
            await one_request(proxy)
        assert receiver.resource()["service.name"] == "from-config"


async def test_endpoint_from_the_environment(
    backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with otlp_receiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        async with running_proxy(config(backends)) as proxy:
            await one_request(proxy)
            telemetry = await status_telemetry(proxy)
    assert len(receiver.spans()) == 2
    assert receiver.metric("canary.upstream.requests") is not None
    assert telemetry["traces_endpoint"] == f"{receiver.endpoint}/v1/traces"


async def test_signal_endpoints_from_the_environment(
    backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with otlp_receiver() as traces, otlp_receiver() as metrics:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{traces.endpoint}/v1/traces")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", f"{metrics.endpoint}/v1/metrics")
        async with running_proxy(config(backends)) as proxy:
            await one_request(proxy)
    assert len(traces.spans()) == 2
    assert traces.metric_requests == []
    assert metrics.trace_requests == []
    assert metrics.metric("http.server.request.duration") is not None


async def test_the_configs_endpoint_wins(
    backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with otlp_receiver() as configured, otlp_receiver() as environment:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", environment.endpoint)
        text = config(backends, f"telemetry: {{otlp_endpoint: '{configured.endpoint}'}}")
        async with running_proxy(text) as proxy:
            await one_request(proxy)
    assert len(configured.spans()) == 2
    assert environment.spans() == []


@pytest.mark.parametrize(
    "variable", ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"]
)
async def test_protocol_grpc(
    backends: Backends, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "grpc")
    with grpc_receiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        async with running_proxy(config(backends)) as proxy:
            await one_request(proxy)
    kinds = sorted(span.kind for span in receiver.spans())
    assert kinds == [Span.SPAN_KIND_SERVER, Span.SPAN_KIND_CLIENT]
    if variable == "OTEL_EXPORTER_OTLP_PROTOCOL":
        assert receiver.metric("canary.upstream.requests") is not None


async def test_headers_http(backends: Backends, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s3cret,x-tenant=team%20a")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "api-key=traces-key")
    async with otlp_receiver() as receiver:
        text = config(backends, f"telemetry: {{otlp_endpoint: '{receiver.endpoint}'}}")
        async with running_proxy(text) as proxy:
            await one_request(proxy)
    traces = [h for h in receiver.headers if "x-tenant" not in h]
    metrics = [h for h in receiver.headers if "x-tenant" in h]
    assert traces
    assert all(h["api-key"] == "traces-key" for h in traces)
    assert metrics
    assert all(h["api-key"] == "s3cret" and h["x-tenant"] == "team a" for h in metrics)


async def test_headers_grpc(backends: Backends, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s3cret")
    with grpc_receiver() as receiver:
        text = config(
            backends,
            f"telemetry: {{otlp_endpoint: '{receiver.endpoint}', otlp_protocol: grpc}}",
        )
        async with running_proxy(text) as proxy:
            await one_request(proxy)
    assert receiver.headers
    assert all(h["api-key"] == "s3cret" for h in receiver.headers)


async def test_compression(backends: Backends, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    async with otlp_receiver() as receiver:
        text = config(backends, f"telemetry: {{otlp_endpoint: '{receiver.endpoint}'}}")
        async with running_proxy(text) as proxy:
            await one_request(proxy)
    assert len(receiver.spans()) == 2
    assert {h.get("content-encoding") for h in receiver.headers} == {"gzip"}


async def test_certificate(backends: Backends, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(CERTIFICATE))
    # requests lets these override the exporter's own CA file (its sessions trust the
    # environment); a machine that sets them for everything else must not decide here.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    async with otlp_receiver(tls=True) as receiver:
        assert receiver.endpoint.startswith("https://")
        text = config(backends, f"telemetry: {{otlp_endpoint: '{receiver.endpoint}'}}")
        async with running_proxy(text) as proxy:
            await one_request(proxy)
            telemetry = await status_telemetry(proxy)
    assert len(receiver.spans()) == 2
    assert telemetry["export_failures"] == 0


@pytest.mark.timeout(30)
async def test_timeout(backends: Backends, monkeypatch: pytest.MonkeyPatch) -> None:
    # The Python SDK reads OTEL_EXPORTER_OTLP_TIMEOUT in seconds.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "0.3")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    async with otlp_receiver(delay_s=3.0) as receiver:
        text = config(backends, f"telemetry: {{otlp_endpoint: '{receiver.endpoint}'}}")
        async with running_proxy(text) as proxy:
            await one_request(proxy)
            for _ in range(60):
                telemetry = await status_telemetry(proxy)
                if telemetry["export_failures"]:
                    break
                await __import__("asyncio").sleep(0.1)
    # Well before the receiver's 3 s answer, the export gave up and said why.
    assert telemetry["export_failures"] >= 1
    assert "traces" in telemetry["last_export_error"]
    assert telemetry["spans_dropped"] == 2


@pytest.mark.parametrize(
    ("sampler", "arg", "traceparent", "spans"),
    [
        ("always_off", None, None, 0),
        ("always_off", None, TRACEPARENT, 0),  # not parent based: the parent is not asked
        ("always_on", None, TRACEPARENT[:-2] + "00", 2),
        ("parentbased_always_off", None, TRACEPARENT, 2),
        ("parentbased_always_off", None, None, 0),
        ("traceidratio", "0", None, 0),
        ("traceidratio", "1", None, 2),
        ("parentbased_traceidratio", "0", TRACEPARENT, 2),
        ("parentbased_traceidratio", "0", TRACEPARENT[:-2] + "00", 0),
    ],
)
async def test_traces_sampler(
    backends: Backends,
    monkeypatch: pytest.MonkeyPatch,
    sampler: str,
    arg: str | None,
    traceparent: str | None,
    spans: int,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    if arg is not None:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", arg)
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    async with otlp_receiver() as receiver:
        text = config(backends, f"telemetry: {{otlp_endpoint: '{receiver.endpoint}'}}")
        async with running_proxy(text) as proxy:
            await one_request(proxy, {"traceparent": traceparent} if traceparent else None)
    assert len(receiver.spans()) == spans


async def test_the_configs_sample_ratio_wins(
    backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    async with otlp_receiver() as receiver:
        text = config(
            backends,
            f"telemetry: {{otlp_endpoint: '{receiver.endpoint}', trace_sample_ratio: 0}}",
        )
        async with running_proxy(text) as proxy:
            await one_request(proxy)
    assert receiver.spans() == []


async def test_metric_export_interval(backends: Backends, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    async with otlp_receiver() as receiver:
        text = config(backends, f"telemetry: {{otlp_endpoint: '{receiver.endpoint}'}}")
        async with running_proxy(text) as proxy:
            await one_request(proxy)
            await receiver.wait_for_metrics(timeout_s=3.0)
            # Metrics arrived while the proxy runs, not only when it stops.
            assert receiver.metric("canary.upstream.requests") is not None


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER='jaeger_remote'"),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
            "OTEL_TRACES_SAMPLER_ARG='2'",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
            },
            "OTEL_EXPORTER_OTLP_PROTOCOL='http/json'",
        ),
        ({"OTEL_METRIC_EXPORT_INTERVAL": "soon"}, "OTEL_METRIC_EXPORT_INTERVAL='soon'"),
        ({"OTEL_SDK_DISABLED": "yes"}, "OTEL_SDK_DISABLED='yes'"),
    ],
)
def test_a_value_that_cannot_be_used_is_named_and_its_default_applies(
    environ: dict[str, str], problem: str
) -> None:
    settings = resolve(TelemetryConfig(), environ)
    assert any(problem in text for text in settings.problems), settings.problems
    assert settings.sampling.ratio == 1.0
    assert not settings.disabled
    if settings.traces is not None:
        assert settings.traces.protocol is OtlpProtocol.HTTP_PROTOBUF


async def test_problems_are_logged_when_the_proxy_starts(
    backends: Backends, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "jaeger_remote")
    async with running_proxy(config(backends)) as proxy:
        await one_request(proxy)
    assert any("OTEL_TRACES_SAMPLER" in r.getMessage() for r in caplog.records)
