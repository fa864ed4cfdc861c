"""Streams pass through chunk by chunk, and their ends are told apart (SPEC §5)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import openai
import pytest

from tests.conftest import Backends
from tests.harness import BackendProcess, eventually, proxy_yaml, running_proxy, start_backend

STREAM = {"messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.fixture
def slow_canary() -> Iterator[BackendProcess]:
    """A canary of its own, so its counters belong to one test."""
    backend = start_backend("m-slow")
    yield backend
    backend.stop()


async def read_into(response: aiohttp.ClientResponse, received: bytearray) -> None:
    """Read the body chunk by chunk into `received`, so what came before an error is kept."""
    while chunk := await response.content.readany():
        received += chunk


def canary_route(weight: int = 100) -> str:
    return f"rollout: {{weight: {weight}}}"


async def test_first_chunk_reaches_the_client_while_the_backend_holds_the_rest(
    backends: Backends, slow_canary: BackendProcess
) -> None:
    config = proxy_yaml(backends.stable.url, slow_canary.url, route=canary_route())
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as session:
        headers = {"x-user-id": "u", "x-fake-tokens-per-s": "2"}
        body = {**STREAM, "max_tokens": 6}
        started = time.monotonic()
        async with session.post(
            f"{proxy.url}/v1/chat/completions", json=body, headers=headers
        ) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            first = await response.content.readuntil(b"\n\n")
            first_at = time.monotonic() - started
            # The backend is still generating: nothing has finished on its side.
            stats = await slow_canary.stats()
            assert stats["in_flight"] == 1
            assert stats["completed"] == 0
            rest = await response.content.read()
            total = time.monotonic() - started
    assert first.startswith(b"data: ")
    assert rest.rstrip().endswith(b"data: [DONE]")
    # Six tokens at 2/s take about 3 s; the first chunk came long before the end.
    assert total > 2.0
    assert first_at < total - 1.5


async def test_openai_client_streams_through_the_proxy(backends: Backends) -> None:
    config = proxy_yaml(backends.stable.url, backends.canary.url, route=canary_route(0))
    async with running_proxy(config) as proxy:
        client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
        stream = await client.chat.completions.create(
            model="any",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            max_tokens=5,
            stream_options={"include_usage": True},
        )
        text = ""
        finish = None
        usage = None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        await client.close()
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert finish == "length"
    assert usage is not None
    assert usage.completion_tokens == 5


@pytest.mark.timeout(20)
async def test_client_disconnect_mid_stream_cancels_the_backend_within_two_seconds(
    backends: Backends, slow_canary: BackendProcess
) -> None:
    config = proxy_yaml(backends.stable.url, slow_canary.url, route=canary_route())
    async with running_proxy(config) as proxy:
        session = aiohttp.ClientSession()
        headers = {"x-user-id": "u", "x-fake-tokens-per-s": "1"}
        response = await session.post(
            f"{proxy.url}/v1/chat/completions", json={**STREAM, "max_tokens": 60}, headers=headers
        )
        await response.content.readuntil(b"\n\n")
        assert (await slow_canary.stats())["in_flight"] == 1
        response.close()
        await session.close()
        left_at = time.monotonic()

        await eventually(
            "the backend's stream cancelled",
            slow_canary.stats,
            holds=lambda stats: stats["cancelled"] == 1,
            timeout_s=2.0,
        )
        assert time.monotonic() - left_at < 2.0
        assert (await slow_canary.stats())["in_flight"] == 0


@pytest.mark.timeout(20)
async def test_client_disconnect_before_the_answer_cancels_the_backend(
    backends: Backends, slow_canary: BackendProcess
) -> None:
    config = proxy_yaml(backends.stable.url, slow_canary.url, route=canary_route())
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as session:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await session.post(
                    f"{proxy.url}/v1/chat/completions",
                    json={"messages": []},
                    headers={"x-user-id": "u", "x-fake-hang": "1"},
                )

        await eventually(
            "the backend's stream cancelled",
            slow_canary.stats,
            holds=lambda stats: stats["cancelled"] == 1,
            timeout_s=2.0,
        )


@pytest.mark.parametrize(
    "fault",
    [
        {"x-fake-cut-after": "2"},  # the connection drops mid-stream
        {"x-fake-cut-after": "2", "x-fake-tokens-per-s": "50"},
        # A clean HTTP end without finish_reason or [DONE]: all at once, so that the
        # proxy's first read holds the whole stream, and spread out.
        {"x-fake-no-done": "1"},
        {"x-fake-no-done": "1", "x-fake-tokens-per-s": "50"},
    ],
)
async def test_a_cut_stream_is_aborted_not_ended_cleanly(
    backends: Backends, fault: dict[str, str]
) -> None:
    config = proxy_yaml(backends.stable.url, backends.canary.url, route=canary_route())
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as session:
        response = await session.post(
            f"{proxy.url}/v1/chat/completions",
            json={**STREAM, "max_tokens": 8},
            headers={"x-user-id": "u", **fault},
        )
        assert response.status == 200
        received = bytearray()
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_into(response, received)
        response.close()
        # What the backend did send arrived before the abort.
        assert b"tok0" in received
        assert b"[DONE]" not in received


async def test_openai_client_sees_a_cut_stream_as_an_error(backends: Backends) -> None:
    config = proxy_yaml(backends.stable.url, backends.canary.url, route=canary_route())
    async with running_proxy(config) as proxy:
        client = openai.AsyncOpenAI(
            base_url=f"{proxy.url}/v1",
            api_key="x",
            max_retries=0,
            default_headers={"x-fake-cut-after": "2"},
        )
        stream = await client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=8
        )
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
        await client.close()


async def test_backend_silence_mid_stream_past_idle_aborts_the_client(backends: Backends) -> None:
    config = proxy_yaml(
        backends.stable.url,
        backends.canary.url,
        route=canary_route(),
        backend="timeouts: {idle: 300ms}",
    )
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as session:
        started = time.monotonic()
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.post(
                f"{proxy.url}/v1/chat/completions",
                json={**STREAM, "max_tokens": 4},
                headers={"x-user-id": "u", "x-fake-tokens-per-s": "1"},
            ) as response:
                await response.read()
        assert time.monotonic() - started < 3


async def test_a_slow_but_steady_stream_is_not_cut_by_idle(backends: Backends) -> None:
    config = proxy_yaml(
        backends.stable.url,
        backends.canary.url,
        route=canary_route(),
        backend="timeouts: {idle: 400ms}",
    )
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as session:
        # 12 tokens at 5/s: 2.4 s in all, far past idle, but never 400 ms of silence.
        async with session.post(
            f"{proxy.url}/v1/chat/completions",
            json={**STREAM, "max_tokens": 12},
            headers={"x-user-id": "u", "x-fake-tokens-per-s": "5"},
        ) as response:
            body = await response.read()
    assert body.rstrip().endswith(b"data: [DONE]")
    assert body.count(b'"content":"tok') == 12
