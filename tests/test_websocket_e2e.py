"""WebSocket upgrades through the HTTP port, as the OpenAI Realtime API opens them.

Each test opens sessions with aiohttp's `ws_connect` (or a raw socket, for what a client
library would not send) to the proxy, in front of fake backends whose `/v1/realtime`
answers `session.created` on opening and one `response.done` per message; then checks
the answer, what the backend got, and what the rollout judge and `/metrics` were told.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Backends
from tests.harness import (
    RunningProxy,
    eventually,
    proxy_yaml,
    refused_port,
    running_proxy,
    sticky,
)
from tests.otlp_receiver import attributes, otlp_receiver
from tests.raw import read_answer

pytestmark = pytest.mark.timeout(30)

REALTIME = "/v1/realtime?model=gpt-realtime"
CANARY_ONLY = "rollout: {weight: 100}"


class Client:
    """An HTTP client session that keeps the head of each answer it got (a WebSocket
    handshake's included, which `ws_connect` does not show)."""

    def __init__(self, session: aiohttp.ClientSession, heads: list[CIMultiDictProxy[str]]) -> None:
        self.session = session
        self.heads = heads

    @property
    def answered(self) -> CIMultiDictProxy[str]:
        return self.heads[-1]


@asynccontextmanager
async def client() -> AsyncIterator[Client]:
    heads: list[CIMultiDictProxy[str]] = []

    async def on_end(
        _: aiohttp.ClientSession, __: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        heads.append(params.response.headers)

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_end)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        yield Client(session, heads)


def config(backends: Backends, route: str = CANARY_ONLY, backend: str = "", top: str = "") -> str:
    return proxy_yaml(backends.stable.url, backends.canary.url, route, top, backend)


async def judged(proxy: RunningProxy, variant: str = "canary") -> dict[str, Any]:
    """A variant's window stats, as the rollout judge reads them."""
    url = f"http://127.0.0.1:{proxy.server.admin_port}/api/status"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        status = json.loads(await response.read())
    stats: dict[str, Any] = status["routes"][0]["variants"][variant]
    return stats


async def metrics(proxy: RunningProxy) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    url = f"http://127.0.0.1:{proxy.server.admin_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = (await response.read()).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def samples(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str
) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (sample, labels), value in found.items() if sample == name}


async def sessions_recorded(proxy: RunningProxy, variant: str = "canary") -> dict[str, Any]:
    """The variant's stats once a session is in them (it is recorded when it ends)."""
    return await eventually(
        "the session in the judge's stats",
        lambda: judged(proxy, variant),
        timeout_s=5,
        holds=lambda stats: stats["requests"] >= 1,
    )


async def test_sessions_are_sticky_and_relay_each_message_before_the_next_is_sent(
    backends: Backends,
) -> None:
    route = "rollout: {weight: 50}\n" + sticky("ws")
    seen: dict[str, set[str]] = {}
    async with running_proxy(config(backends, route)) as proxy, client() as http:
        for user in [f"user-{n}" for n in range(6)] * 2:
            async with http.session.ws_connect(
                f"{proxy.url}{REALTIME}", headers={"x-user-id": user}
            ) as socket:
                variant = http.answered["x-canary-variant"]
                opened = await socket.receive_json(timeout=5)
                assert opened["type"] == "session.created"
                # The backend that answered is the variant the header names.
                assert opened["session"]["model"] == f"m-{variant}"
                for n in range(3):
                    await socket.send_str(f"message {n}")
                    answer = await socket.receive_json(timeout=5)
                    assert answer["type"] == "response.done"
                    assert answer["response"]["output"] == [
                        {"type": "text", "text": f"message {n}"}
                    ]
                seen.setdefault(user, set()).add(variant)
    # Each user kept one variant; at 50 %, six users are not all on one side.
    assert all(len(variants) == 1 for variants in seen.values()), seen
    assert {variant for variants in seen.values() for variant in variants} == {"stable", "canary"}


async def test_a_session_closed_by_the_client_is_recorded_with_its_bytes(
    backends: Backends,
) -> None:
    async with running_proxy(config(backends)) as proxy, client() as http:
        await backends.canary.clear()
        async with http.session.ws_connect(f"{proxy.url}{REALTIME}") as socket:
            assert http.answered["x-canary-variant"] == "canary"
            await socket.receive_json(timeout=5)
            await socket.send_str("hello")
            await socket.receive_json(timeout=5)
            await asyncio.sleep(0.2)  # a session's duration, beyond its handshake
        stats = await sessions_recorded(proxy)
        found = await metrics(proxy)
        [received] = await backends.canary.requests()
    assert (stats["requests"], stats["errors"]) == (1, 0), stats
    # The backend was asked to upgrade, with the client's WebSocket headers.
    headers = {name.lower(): value for name, value in received["headers"]}
    assert received["path"] == REALTIME
    assert headers["upgrade"] == "websocket"
    assert headers["connection"] == "Upgrade"
    assert headers["sec-websocket-version"] == "13"
    assert "sec-websocket-key" in headers
    labels = {
        ("canary_route", "chat"),
        ("canary_variant", "canary"),
        ("canary_backend", "v2"),
        ("canary_operation", "realtime"),
    }
    [(session_labels, count)] = samples(
        found, "canary_upstream_session_duration_seconds_count"
    ).items()
    assert session_labels == frozenset({*labels, ("outcome", "ok")})
    assert count == 1
    [duration] = samples(found, "canary_upstream_session_duration_seconds_sum").values()
    assert duration >= 0.2
    io = samples(found, "canary_upstream_session_io_bytes_total")
    to_backend = io[frozenset({*labels, ("direction", "client_to_backend")})]
    to_client = io[frozenset({*labels, ("direction", "backend_to_client")})]
    # Masked frames of "hello" and the close; session.created, response.done, the close.
    assert 15 <= to_backend <= 40, to_backend
    assert 150 <= to_client <= 600, to_client
    # The attempt is the handshake: no GenAI operation is made up for it.
    attempts = samples(found, "canary_upstream_requests_total")
    assert attempts == {
        frozenset({*labels - {("canary_operation", "realtime")}, ("outcome", "ok")}): 1.0
    }
    assert not samples(found, "gen_ai_client_operation_duration_seconds_count")


async def test_a_sampled_session_is_one_client_span_over_the_whole_session(
    backends: Backends,
) -> None:
    async with otlp_receiver() as receiver:
        telemetry = f"telemetry: {{otlp_endpoint: '{receiver.endpoint}', trace_sample_ratio: 1}}"
        await backends.canary.clear()
        async with running_proxy(config(backends, top=telemetry)) as proxy, client() as http:
            async with http.session.ws_connect(f"{proxy.url}{REALTIME}") as socket:
                await socket.receive_json(timeout=5)
                await socket.send_str("hello")
                await socket.receive_json(timeout=5)
                await asyncio.sleep(0.2)
            spans = await receiver.wait_for_spans(2)
            [received] = await backends.canary.requests()
    [server] = [span for span in spans if span.kind == Span.SPAN_KIND_SERVER]
    [session] = [span for span in spans if span.kind == Span.SPAN_KIND_CLIENT]
    assert session.parent_span_id == server.span_id
    assert session.name == "GET"
    found = attributes(session)
    assert found["canary.variant"] == "canary"
    assert found["http.response.status_code"] == 101
    # After a WebSocket close handshake both sides close their connections at about the
    # same moment: either may be the first the proxy sees.
    assert found["canary.session.end"] in ("client_closed", "backend_closed")
    assert found["canary.session.bytes_to_backend"] > 0
    assert found["canary.session.bytes_to_client"] > 0
    assert "gen_ai.operation.name" not in found
    assert "error.type" not in found
    lasted_s = (session.end_time_unix_nano - session.start_time_unix_nano) / 1e9
    assert found["canary.session.handshake"] < 0.2 <= lasted_s
    assert attributes(server)["http.response.status_code"] == 101
    # The backend's request carries the session span as its parent.
    headers = {name.lower(): value for name, value in received["headers"]}
    assert headers["traceparent"].split("-")[2] == session.span_id.hex()


async def test_a_session_closed_by_the_backend_closes_the_client_and_is_clean(
    backends: Backends,
) -> None:
    async with running_proxy(config(backends)) as proxy, client() as http:
        async with http.session.ws_connect(f"{proxy.url}{REALTIME}") as socket:
            await socket.receive_json(timeout=5)
            await socket.send_str("fake.close")
            message = await socket.receive(timeout=5)
            assert message.type is aiohttp.WSMsgType.CLOSE
        stats = await sessions_recorded(proxy)
    assert (stats["requests"], stats["errors"]) == (1, 0), stats


async def test_a_backend_reset_mid_session_is_an_error_of_its_variant(backends: Backends) -> None:
    async with running_proxy(config(backends)) as proxy, client() as http:
        async with http.session.ws_connect(f"{proxy.url}{REALTIME}") as socket:
            await socket.receive_json(timeout=5)
            await socket.send_str("fake.reset")
            message = await socket.receive(timeout=5)
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        stats = await sessions_recorded(proxy)
        found = await metrics(proxy)
    assert (stats["requests"], stats["errors"]) == (1, 1), stats
    assert stats["errors_by_type"] == {"session_reset": 1}
    [labels] = samples(found, "canary_upstream_session_duration_seconds_count")
    assert ("error_type", "session_reset") in labels
    assert ("outcome", "error") in labels


@pytest.mark.parametrize(
    ("canary_fault", "why"),
    [("status", "503"), ("unreachable", "connect_error")],
)
async def test_a_canary_failing_before_its_101_falls_back_to_stable(
    backends: Backends, canary_fault: str, why: str
) -> None:
    headers = {"x-fake-status": "503", "x-fake-only": "m-canary"}
    route = f"{CANARY_ONLY}\nfallback_to_stable: true"
    if canary_fault == "unreachable":
        text = proxy_yaml(backends.stable.url, f"http://127.0.0.1:{refused_port()}", route)
    else:
        text = config(backends, route)
    async with running_proxy(text) as proxy, client() as http:
        async with http.session.ws_connect(f"{proxy.url}{REALTIME}", headers=headers) as socket:
            answered = http.answered
            assert answered["x-canary-variant"] == "stable"
            assert answered["x-canary-fallback"] == why
            opened = await socket.receive_json(timeout=5)
            assert opened["session"]["model"] == "m-stable"
        canary = await eventually(
            "the canary's failure in the stats",
            lambda: judged(proxy, "canary"),
            timeout_s=5,
            holds=lambda stats: stats["requests"] == 1,
        )
        stable = await sessions_recorded(proxy, "stable")
    assert canary["errors"] == 1
    assert (stable["requests"], stable["errors"]) == (1, 0)


async def test_a_backend_that_declines_the_upgrade_is_relayed_and_the_connection_closed(
    backends: Backends,
) -> None:
    async with running_proxy(config(backends)) as proxy, client() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as declined:
            await http.session.ws_connect(
                f"{proxy.url}{REALTIME}", headers={"x-fake-status": "401"}
            )
        assert declined.value.status == 401
        assert declined.value.headers is not None
        assert declined.value.headers["x-canary-variant"] == "canary"
        # An upgrade on a path the backend serves as plain HTTP: its answer, then a close.
        answer = await raw_upgrade(proxy, "/v1/models")
        stats = await judged(proxy)
    assert answer.statuses == [200]
    assert b'"object":"list"' in answer.body
    assert answer.closed
    assert stats["requests"] == 2


async def test_bytes_the_client_sent_with_its_request_reach_the_backend_after_the_101(
    backends: Backends,
) -> None:
    # A client that does not wait for the 101: its first frame comes in the same write
    # as its request, and more while the backend takes its time to switch.
    async with running_proxy(config(backends)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
        try:
            writer.write(upgrade_request("x-fake-latency: 0.3\r\n") + text_frame("first"))
            await asyncio.sleep(0.1)
            writer.write(text_frame("second"))
            await asyncio.sleep(0.05)
            writer.write(text_frame("x" * 70_000))  # past the buffer: reading pauses
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
            assert b"\r\nx-canary-variant: canary\r\n" in head
            events = [await read_text_frame(reader) for _ in range(4)]
        finally:
            writer.close()
    assert [event["type"] for event in events] == ["session.created", *["response.done"] * 3]
    texts = [event["response"]["output"][0]["text"] for event in events[1:]]
    assert texts == ["first", "second", "x" * 70_000]


async def test_a_client_that_stops_reading_slows_the_backend_and_loses_nothing(
    backends: Backends,
) -> None:
    # 24 MiB echoed while the client reads nothing for a while: more than the sockets
    # on the way hold, so the proxy's buffers fill and it stops reading the other side.
    messages = [os.urandom(256 * 1024) for _ in range(96)]
    async with running_proxy(config(backends)) as proxy, client() as http:
        async with http.session.ws_connect(f"{proxy.url}{REALTIME}", max_msg_size=0) as socket:
            await socket.receive_json(timeout=5)

            async def send_all() -> None:
                for message in messages:
                    await socket.send_bytes(message)

            sending = asyncio.create_task(send_all())
            await asyncio.sleep(0.5)
            for message in messages:
                assert await socket.receive_bytes(timeout=10) == message
            await asyncio.wait_for(sending, 10)
        stats = await sessions_recorded(proxy)
        found = await metrics(proxy)
    assert stats["errors"] == 0
    io = {
        dict(labels)["direction"]: value
        for labels, value in samples(found, "canary_upstream_session_io_bytes_total").items()
    }
    assert io["client_to_backend"] >= 96 * 256 * 1024
    assert io["backend_to_client"] >= 96 * 256 * 1024


async def test_an_idle_session_is_closed_after_upgrade_idle(backends: Backends) -> None:
    async with running_proxy(config(backends, backend="timeouts: {upgrade_idle: 300ms}")) as proxy:
        async with client() as http:
            async with http.session.ws_connect(f"{proxy.url}{REALTIME}", autoping=False) as socket:
                await socket.receive_json(timeout=5)
                await asyncio.sleep(0.15)
                # Activity puts the end off: 300 ms from the last message, not the first.
                await socket.send_str("still here")
                await socket.receive_json(timeout=5)
                began = time.monotonic()
                message = await socket.receive(timeout=5)
                silent_s = time.monotonic() - began
        stats = await sessions_recorded(proxy)
    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert 0.25 <= silent_s <= 2.0, silent_s
    assert (stats["requests"], stats["errors"]) == (1, 0), stats


async def test_a_stop_lets_a_session_run_for_the_grace_period_then_closes_it(
    backends: Backends,
) -> None:
    async with running_proxy(config(backends, top="shutdown_grace: 500ms")) as proxy:
        async with client() as http:
            async with http.session.ws_connect(f"{proxy.url}{REALTIME}") as socket:
                await socket.receive_json(timeout=5)
                stopping = asyncio.create_task(proxy.server.stop())
                await asyncio.sleep(0.1)
                # Draining: the session goes on, a new one is refused.
                await socket.send_str("during the drain")
                assert (await socket.receive_json(timeout=5))["type"] == "response.done"
                with pytest.raises(aiohttp.ClientError):
                    await http.session.ws_connect(f"{proxy.url}{REALTIME}")
                message = await socket.receive(timeout=5)
                assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                await asyncio.wait_for(stopping, 5)


# --- raw WebSocket, for what a client library would not send ------------------------------


def upgrade_request(extra: str = "", path: str = REALTIME) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: proxy\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n{extra}\r\n"
    ).encode()


def text_frame(text: str) -> bytes:
    """A client's (masked) text frame."""
    data = text.encode()
    mask = os.urandom(4)
    if len(data) < 126:
        head = bytes([0x81, 0x80 | len(data)])
    elif len(data) < 65536:
        head = bytes([0x81, 0x80 | 126]) + len(data).to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | 127]) + len(data).to_bytes(8, "big")
    return head + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(data))


async def read_text_frame(reader: asyncio.StreamReader) -> Any:
    """A server's (unmasked) text frame, as JSON."""
    first, length = await asyncio.wait_for(reader.readexactly(2), 5)
    assert first == 0x81
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
    return json.loads(await asyncio.wait_for(reader.readexactly(length), 5))


async def raw_upgrade(proxy: RunningProxy, path: str) -> Any:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    try:
        writer.write(upgrade_request(path=path))
        return await read_answer(reader, quiet_s=2)
    finally:
        writer.close()
