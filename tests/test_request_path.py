"""The request path's rarer turns, met the way a client meets them: through the port.

Where only a fault leads (a client gone just as the proxy writes to it, a bug of the
proxy's own), the fault is injected into the running proxy at the one call it stands
for, and what the client, the backend and /metrics then see is checked.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families

from proxy.http import forwarding
from tests.conftest import Backends
from tests.harness import (
    BackendProcess,
    RunningProxy,
    eventually,
    proxy_yaml,
    refused_port,
    running_proxy,
    unanswered_port,
)
from tests.raw import send_raw

pytestmark = pytest.mark.timeout(30)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
STREAM = {**CHAT, "stream": True, "max_tokens": 8}
SLOW_TOKENS = {"x-user-id": "u", "x-fake-tokens-per-s": "40"}
CHUNKED_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nx-user-id: u\r\n"
    b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
)
PIECE = b"258\r\n" + b" " * 600 + b"\r\n"  # 600 bytes of a body, chunked


async def post(url: str, **kwargs: Any) -> tuple[int, CIMultiDictProxy[str], Any]:
    async with aiohttp.ClientSession() as session, session.post(url, **kwargs) as response:
        return response.status, response.headers, json.loads(await response.read())


async def ask(proxy: RunningProxy) -> tuple[int, CIMultiDictProxy[str], Any]:
    """One chat request as user `u`: the status, headers and JSON body."""
    return await post(f"{proxy.url}/v1/chat/completions", json=CHAT, headers={"x-user-id": "u"})


async def upstream_counts(proxy: RunningProxy) -> dict[tuple[str, str], float]:
    """`canary_upstream_requests_total` by (variant, outcome), from /metrics."""
    url = f"http://127.0.0.1:{proxy.server.admin_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = (await response.read()).decode()
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "canary_upstream_requests_total":
                key = (sample.labels["canary_variant"], sample.labels["outcome"])
                counts[key] = counts.get(key, 0) + sample.value
    return counts


async def cancelled_at(backend: BackendProcess) -> int:
    return (await backend.stats())["cancelled"]


async def test_504_when_the_backend_host_takes_no_connection_within_connect(
    backends: Backends,
) -> None:
    with unanswered_port() as port:
        config = proxy_yaml(
            f"http://127.0.0.1:{port}", backends.canary.url, backend="timeouts: {connect: 200ms}"
        )
        async with running_proxy(config) as proxy:
            status, headers, body = await ask(proxy)
    assert status == 504
    assert headers["x-canary-variant"] == "stable"
    assert body["error"]["code"] == "upstream_timeout"
    assert "could not connect to backend v1 within 0.2s" in body["error"]["message"]


async def test_502_from_stable_when_the_canary_and_then_the_stable_fail_before_a_byte() -> None:
    stable, canary = (f"http://127.0.0.1:{refused_port()}" for _ in range(2))
    config = proxy_yaml(stable, canary, route="rollout: {weight: 100}\nfallback_to_stable: true")
    async with running_proxy(config) as proxy:
        status, headers, body = await ask(proxy)
        counts = await upstream_counts(proxy)
    assert status == 502
    assert headers["x-canary-variant"] == "stable", "the answer is the fallback's"
    assert body["error"]["code"] == "upstream_unreachable"
    assert "backend v1" in body["error"]["message"]
    assert counts == {("canary", "error"): 1, ("stable", "error"): 1}


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param((CHUNKED_HEAD + PIECE * 3 + b"0\r\n\r\n",), id="whole"),
        pytest.param((CHUNKED_HEAD + PIECE, PIECE, PIECE, b"0\r\n\r\n"), id="arriving"),
    ],
)
async def test_413_when_a_chunked_body_passes_the_limit(
    backends: Backends, parts: tuple[bytes, ...]
) -> None:
    """A body without a declared length is refused once it passes the limit, whether
    it came with its head or is still arriving when the proxy reads it."""
    config = proxy_yaml(
        backends.stable.url, backends.canary.url, top="limits: {max_body_bytes: 1000}"
    )
    await backends.stable.clear()
    async with running_proxy(config) as proxy:
        assert proxy.server.port is not None
        answer = await send_raw(proxy.server.port, *parts, pause_s=0.2)
    assert answer.statuses == [413]
    assert answer.json()["error"]["code"] == "body_too_large"
    assert await backends.stable.requests() == []


async def stream_with_a_write_fault(
    proxy: RunningProxy,
    backend: BackendProcess,
    monkeypatch: pytest.MonkeyPatch,
    fault: Exception,
) -> bool:
    """Stream an answer whose second write to the client raises `fault`; whether the
    client read an answer that ended. The backend sees its stream cancelled."""
    write = web.StreamResponse.write
    writes = 0

    async def faulty_write(self: web.StreamResponse, data: bytes) -> None:
        nonlocal writes
        writes += 1
        if writes == 2:
            raise fault
        await write(self, data)

    before = await cancelled_at(backend)
    with monkeypatch.context() as patch:
        patch.setattr(web.StreamResponse, "write", faulty_write)
        async with aiohttp.ClientSession() as session:
            url = f"{proxy.url}/v1/chat/completions"
            async with session.post(url, json=STREAM, headers=SLOW_TOKENS) as response:
                assert response.status == 200
                try:
                    await response.read()
                except aiohttp.ClientPayloadError:
                    ended = False
                else:
                    ended = True
    await eventually(
        "the backend's stream cancelled",
        lambda: cancelled_at(backend),
        holds=lambda cancelled: cancelled == before + 1,
        timeout_s=5,
    )
    assert writes >= 2
    return ended


async def test_a_client_gone_as_its_stream_is_written_is_cancelled_not_an_error(
    backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What aiohttp raises when the client's socket is closing.
    gone = ConnectionResetError("Cannot write to closing transport")
    async with running_proxy(proxy_yaml(backends.stable.url, backends.canary.url)) as proxy:
        await stream_with_a_write_fault(proxy, backends.stable, monkeypatch, gone)
        counts = await upstream_counts(proxy)
    assert counts == {("stable", "cancelled"): 1}


async def test_a_fault_of_the_proxy_mid_stream_cuts_the_answer(
    backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    fault = RuntimeError("an injected fault of the proxy")
    async with running_proxy(proxy_yaml(backends.stable.url, backends.canary.url)) as proxy:
        ended = await stream_with_a_write_fault(proxy, backends.stable, monkeypatch, fault)
    assert not ended, "the client can tell the answer is incomplete"


async def test_a_fault_of_the_proxy_before_the_answer_is_a_500_in_openais_shape(
    backends: Backends, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def fails(*args: object) -> object:
        raise RuntimeError("an injected fault of the proxy")

    config = proxy_yaml(backends.stable.url, backends.canary.url)
    async with running_proxy(config) as proxy:
        with monkeypatch.context() as patch, caplog.at_level(logging.ERROR):
            patch.setattr(forwarding, "assign", fails)
            status, headers, body = await ask(proxy)
        status_after, _, _ = await ask(proxy)
    assert status == 500
    assert headers["Connection"] == "close"
    assert body["error"]["code"] == "proxy_error"
    assert "internal error" in body["error"]["message"]
    assert "injected" not in json.dumps(body), "the client is told nothing of the proxy's inside"
    failed = [r for r in caplog.records if "the proxy failed answering" in r.getMessage()]
    assert len(failed) == 1
    assert failed[0].exc_info is not None
    assert status_after == 200, "the next request is served"


@pytest.mark.parametrize("body", [b'["not", "an", "object"]', b"{}"], ids=["array", "empty"])
async def test_a_model_rewrite_passes_a_body_with_no_model_to_rewrite_as_it_came(
    backends: Backends, body: bytes
) -> None:
    config = proxy_yaml(
        backends.stable.url,
        backends.canary.url,
        route="model_rewrite: {canary: llama-3.1-8b}\nrollout: {weight: 100}",
    )
    await backends.canary.clear()
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as session:
        async with session.post(
            f"{proxy.url}/v1/chat/completions",
            data=body,
            headers={"x-user-id": "u", "Content-Type": "application/json"},
        ) as response:
            await response.read()
        (recorded,) = await backends.canary.requests()
    assert recorded["body"].encode() == body
