"""Many streams through one backend, and a bounded wait for a connection (README, "Forwarding").

An LLM stream holds its backend connection for its whole answer, so the default pool
must take hundreds of them at once; past `max_connections`, a request waits at most
the backend's `timeouts.pool`, then gets 503 `pool_timeout` with Retry-After, counted
as its own error type and never against its variant.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Backends
from tests.harness import (
    BackendProcess,
    RunningProxy,
    eventually,
    proxy_yaml,
    running_proxy,
    start_backend,
)
from tests.otlp_receiver import attributes, otlp_receiver

STREAM = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
STREAMS = 500
OLD_DEFAULT_POOL = 256


@pytest.fixture
def slow_canary() -> Iterator[BackendProcess]:
    """A canary of its own, so its counters belong to one test."""
    backend = start_backend("m-pool")
    yield backend
    backend.stop()


async def metrics(proxy: RunningProxy) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    url = f"http://127.0.0.1:{proxy.server.admin_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = (await response.read()).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def canary_window(proxy: RunningProxy) -> dict[str, Any]:
    url = f"http://127.0.0.1:{proxy.server.admin_port}/api/status"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        document = await response.json()
    (route,) = document["routes"]
    return route["variants"]["canary"]  # type: ignore[no-any-return]


def stream_request(user: int) -> bytes:
    body = json.dumps({**STREAM, "max_tokens": 12}).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nx-fake-tokens-per-s: 1\r\n"
        + f"x-user-id: u{user}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


@pytest.mark.timeout(120)
async def test_500_slow_streams_through_one_backend_all_complete_none_queued(
    backends: Backends, slow_canary: BackendProcess
) -> None:
    """With the default pool, 500 streams of about 12 s each through one backend all
    complete, and none waits in a queue for a connection. (A bare HTTP/1.1 client:
    aiohttp's, in the proxy's own event loop, takes seconds to open 500.)"""
    config = proxy_yaml(backends.stable.url, slow_canary.url, route="rollout: {weight: 100}")
    async with running_proxy(config) as proxy:

        async def one(user: int) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
            try:
                writer.write(stream_request(user))
                return await reader.read()
            finally:
                writer.close()
                await writer.wait_closed()

        async def in_flight() -> int:
            return (await slow_canary.stats())["in_flight"]

        streams = asyncio.gather(*(one(user) for user in range(STREAMS)))
        # Past the 256 connections a backend had by default before, with none queued
        # (below). All 500 at once is what a quiet machine shows; under the suite's
        # coverage tracing on a loaded machine the proxy opens them more slowly than the
        # first streams end.
        await eventually(
            "more streams open on the backend at once than the old pool's 256",
            in_flight,
            timeout_s=20.0,
            holds=lambda n: n > OLD_DEFAULT_POOL,
        )
        results = await asyncio.wait_for(streams, timeout=60.0)  # not 500 × 12 s in a queue
        counts = await metrics(proxy)
    assert all(answer.startswith(b"HTTP/1.1 200 ") for answer in results)
    assert all(answer.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n") for answer in results)
    # Nobody queued for a connection: no wait was recorded.
    assert not any(name.startswith("canary_upstream_pool_wait") for name, _ in counts)
    assert (await slow_canary.stats())["completed"] == STREAMS


@pytest.mark.timeout(30)
async def test_a_request_past_a_full_pool_gets_503_pool_timeout_not_held_against_the_canary(
    backends: Backends, slow_canary: BackendProcess
) -> None:
    canary = frozenset({("canary_backend", "v2")})
    async with (
        otlp_receiver() as receiver,
        running_proxy(
            proxy_yaml(
                backends.stable.url,
                slow_canary.url,
                route="rollout: {weight: 100}\nfallback_to_stable: true",
                backend="max_connections: 1\ntimeouts: {pool: 1s}",
                top=f"telemetry: {{otlp_endpoint: '{receiver.endpoint}', trace_sample_ratio: 1}}",
            )
        ) as proxy,
        aiohttp.ClientSession() as session,
    ):
        url = f"{proxy.url}/v1/chat/completions"
        holder = await session.post(
            url,
            json={**STREAM, "max_tokens": 8},
            headers={"x-user-id": "a", "x-fake-tokens-per-s": "2"},
        )
        await holder.content.readuntil(b"\n\n")  # the one connection is busy with it

        waiting = asyncio.create_task(
            session.post(url, json={**STREAM, "max_tokens": 2}, headers={"x-user-id": "b"})
        )

        async def queued() -> float | None:
            return (await metrics(proxy)).get(("canary_upstream_pool_queued", canary))

        await eventually("one request queued", queued, timeout_s=0.9, holds=lambda n: n == 1)
        started = time.monotonic()
        rejected = await waiting
        waited_s = time.monotonic() - started
        answer = await rejected.json()
        await holder.read()
        counts = await metrics(proxy)
        window = await canary_window(proxy)
        spans = await receiver.wait_for_spans(4)

    assert rejected.status == 503
    assert rejected.headers["Retry-After"] == "1"
    assert rejected.headers["x-canary-variant"] == "canary"
    assert "x-canary-fallback" not in rejected.headers  # the canary was never tried
    assert answer["error"]["code"] == "pool_timeout"
    assert waited_s < 1.0  # the rest of the one second it was allowed
    # Counted as its own outcome and error type, and its wait in the pool's histogram ...
    rejected_labels = {
        ("canary_route", "chat"),
        ("canary_variant", "canary"),
        ("canary_backend", "v2"),
        ("outcome", "rejected"),
        ("error_type", "pool_timeout"),
    }
    assert counts[("canary_upstream_requests_total", frozenset(rejected_labels))] == 1
    assert counts[("canary_upstream_pool_wait_seconds_count", canary)] == 1
    assert 0.9 <= counts[("canary_upstream_pool_wait_seconds_sum", canary)] < 1.5
    assert counts[("canary_upstream_pool_queued", canary)] == 0
    # ... and never as an error of the canary: the judge's window saw one good stream.
    assert window["requests"] == 1
    assert window["errors"] == 0
    assert not any(
        dict(labels).get("outcome") == "error"
        for name, labels in counts
        if name == "canary_upstream_requests_total"
    )
    # The rejected attempt's client span says why, and how long it queued.
    (span,) = [
        span
        for span in spans
        if span.kind == Span.SPAN_KIND_CLIENT
        and attributes(span).get("error.type") == "pool_timeout"
    ]
    assert 0.9 <= attributes(span)["canary.pool.wait"] < 1.5
    assert attributes(span)["canary.pool.queued_ahead"] == 0


@pytest.mark.timeout(30)
async def test_a_wait_for_a_connection_is_not_in_the_backends_duration(
    backends: Backends, slow_canary: BackendProcess
) -> None:
    """The canary is judged on its latency: a queued request's wait is the proxy's."""
    config = proxy_yaml(
        backends.stable.url,
        slow_canary.url,
        route="rollout: {weight: 100}",
        backend="max_connections: 1",
    )
    canary = frozenset({("canary_backend", "v2")})
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as session:
        url = f"{proxy.url}/v1/chat/completions"
        holder = await session.post(
            url,
            json={**STREAM, "max_tokens": 4},
            headers={"x-user-id": "a", "x-fake-tokens-per-s": "4"},  # about 1 s
        )
        await holder.content.readuntil(b"\n\n")
        quick = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        async with session.post(url, json=quick, headers={"x-user-id": "b"}) as queued:
            assert queued.status == 200
            await queued.read()
        await holder.read()
        counts = await metrics(proxy)
    assert counts[("canary_upstream_pool_wait_seconds_count", canary)] == 1
    assert counts[("canary_upstream_pool_wait_seconds_sum", canary)] >= 0.5
    by_backend = frozenset(
        {("canary_route", "chat"), ("canary_variant", "canary"), ("canary_backend", "v2")}
    )
    fast = counts[("canary_upstream_duration_seconds_bucket", by_backend | {("le", "0.125")})]
    assert fast == 1  # the queued request: its half second or more in the queue is not in it
