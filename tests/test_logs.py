"""Log lines as an operator reads them: the trace of the request on each line, the access
log (off by default), and `telemetry.log_format: json` from `canary-proxy run`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import aiohttp
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.conftest import Backends
from tests.harness import RunningProxy, proxy_yaml, running_proxy
from tests.otlp_receiver import otlp_receiver
from tests.proxy_process import CHAT, ProxyProcess

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"  # not sampled


async def chat(proxy: RunningProxy, headers: dict[str, str] | None = None) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy.url}/v1/chat/completions", json=CHAT, headers=headers) as response,
    ):
        await response.read()
        return response.status


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "proxy.access"]


async def test_no_access_log_by_default(
    backends: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running_proxy(proxy_yaml(backends.stable.url, backends.canary.url)) as proxy:
        for _ in range(3):
            assert await chat(proxy) == 200
    assert access_records(caplog) == []


async def test_the_access_log_has_a_line_per_request_with_its_trace(
    backends: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with otlp_receiver() as receiver:
        config = proxy_yaml(
            backends.stable.url,
            backends.canary.url,
            route="sticky: {keys: [header:x-user-id]}\nrollout: {weight: 100}",
            top=f"telemetry: {{otlp_endpoint: '{receiver.endpoint}', access_log: 1}}",
        )
        async with running_proxy(config) as proxy:
            assert await chat(proxy, {"x-user-id": "secret-user-99"}) == 200
            spans = await receiver.wait_for_spans(2)
    (record,) = access_records(caplog)
    (server,) = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    fields = record.access  # type: ignore[attr-defined]
    assert fields["method"] == "POST"
    assert fields["path"] == "/v1/chat/completions"
    assert (fields["route"], fields["variant"], fields["status"]) == ("chat", "canary", 200)
    assert fields["duration_ms"] > 0
    assert (fields["input_tokens"], fields["output_tokens"]) == (1, 2)
    assert (record.trace_id, record.span_id) == (  # type: ignore[attr-defined]
        server.trace_id.hex(),
        server.span_id.hex(),
    )
    assert "status=200" in record.getMessage()
    assert "secret-user-99" not in record.getMessage()


async def test_an_unsampled_request_logs_the_trace_it_came_with(
    backends: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = proxy_yaml(backends.stable.url, backends.canary.url, top="telemetry: {access_log: 1}")
    async with running_proxy(config) as proxy:
        await chat(proxy, {"traceparent": TRACEPARENT})
        await chat(proxy)
    with_parent, without = access_records(caplog)
    assert with_parent.trace_id == "0af7651916cd43dd8448eb211c80319c"  # type: ignore[attr-defined]
    assert without.trace_id == ""  # type: ignore[attr-defined]


async def test_every_line_of_a_request_carries_its_trace(
    backends: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="proxy.http.forwarding")
    async with otlp_receiver() as receiver:
        config = proxy_yaml(
            backends.stable.url,
            backends.canary.url,
            route="fallback_to_stable: true\nrollout: {weight: 100}",
            top=f"telemetry: {{otlp_endpoint: '{receiver.endpoint}'}}",
        )
        async with running_proxy(config) as proxy:
            await chat(proxy, {"x-fake-only": "m-canary", "x-fake-status": "500"})
            spans = await receiver.wait_for_spans(3)
    (server,) = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    lines = [r for r in caplog.records if "canary failed" in r.getMessage()]
    assert lines
    assert {r.trace_id for r in lines} == {server.trace_id.hex()}  # type: ignore[attr-defined]
    # Outside a request: no trace.
    outside = logging.getLogger("tests").makeRecord("tests", logging.INFO, "", 0, "x", (), None)
    assert outside.trace_id == ""  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_run_writes_json_lines_when_the_config_says_so(backends: Backends, tmp_path: Path) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text(
        proxy_yaml(
            backends.stable.url,
            backends.canary.url,
            top="telemetry: {log_format: json, access_log: 1}",
        )
    )
    proxy = ProxyProcess(config)
    try:
        import asyncio

        async def one() -> int:
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as response,
            ):
                await response.read()
                return response.status

        assert asyncio.run(one()) == 200
    finally:
        assert proxy.stop() == 0
    documents = [json.loads(line) for line in proxy.lines if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(d) for d in documents)
    (access,) = [d for d in documents if d["logger"] == "proxy.access"]
    assert (access["status"], access["route"], access["method"]) == (200, "chat", "POST")
    assert any("listening on" in d["message"] for d in documents)


def test_a_text_line_ends_with_its_trace() -> None:
    from types import SimpleNamespace

    from proxy.telemetry.logs import REQUEST, TextFormatter, install_trace_ids
    from proxy.telemetry.tracing import TraceContext

    install_trace_ids()
    trace = TraceContext(0xABC, None)
    token = REQUEST.set(SimpleNamespace(trace=trace, traceparent=None))
    try:
        record = logging.getLogger("x").makeRecord("x", logging.WARNING, "", 0, "hello", (), None)
    finally:
        REQUEST.reset(token)
    line = TextFormatter(worker=1).format(record)
    assert line.endswith(
        f"WARNING [worker 1] x: hello trace_id={0xABC:032x} span_id={trace.server_span_id:016x}"
    )
