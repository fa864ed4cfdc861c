"""The public port's connections, as a client meets them over a raw socket: pipelined
requests, request bodies larger than the read buffer, and what ends a connection.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from tests.conftest import Backends
from tests.harness import RunningProxy, proxy_yaml, running_proxy
from tests.raw import read_answer

pytestmark = pytest.mark.timeout(30)

HEAD = b"Host: proxy\r\nx-user-id: u\r\n"
STREAM_BODY = json.dumps(
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}
).encode()
# A stream of 6 tokens at 20 a second: in flight for about 0.3 s.
SLOW_STREAM = (
    b"POST /v1/chat/completions HTTP/1.1\r\n"
    + HEAD
    + b"x-fake-tokens-per-s: 20\r\nContent-Type: application/json\r\n"
    + b"Content-Length: %d\r\n\r\n%s" % (len(STREAM_BODY), STREAM_BODY)
)
CHUNKED_POST = (
    b"POST /elsewhere HTTP/1.1\r\n" + HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n"
)


def statuses(data: bytes) -> list[int]:
    """Every answer's status, bodies without a line end before the next included."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


def models(seq: int, *, close: bool = False) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return b"GET /v1/models HTTP/1.1\r\n" + HEAD + b"x-seq: %d\r\n%s\r\n" % (seq, connection)


@asynccontextmanager
async def connection(
    backends: Backends, route: str = "", top: str = ""
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter, RunningProxy]]:
    await backends.stable.clear()
    await backends.canary.clear()
    config = proxy_yaml(backends.stable.url, backends.canary.url, route, top)
    async with running_proxy(config) as proxy:
        assert proxy.server.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
        try:
            yield reader, writer, proxy
        finally:
            writer.close()


async def first_event(reader: asyncio.StreamReader) -> bytes:
    """Read until the first SSE event of a stream's answer: its request is in flight."""
    return await asyncio.wait_for(reader.readuntil(b"data: "), 5)


def sequence(received: list[dict[str, object]]) -> list[str]:
    seqs = []
    for request in received:
        headers = request["headers"]
        assert isinstance(headers, list)
        seqs += [value for name, value in headers if name.lower() == "x-seq"]
    return seqs


async def test_pipelined_requests_past_the_queue_limit_are_all_answered_in_order(
    backends: Backends,
) -> None:
    count = 40  # more than the connection queues before it stops reading
    async with connection(backends) as (reader, writer, _):
        writer.write(SLOW_STREAM)
        start = await first_event(reader)
        writer.write(b"".join(models(i, close=i == count - 1) for i in range(count)))
        answer = await read_answer(reader, quiet_s=5)
    assert statuses(start + answer.data) == [200] * (count + 1)
    assert answer.data.count(b"data: [DONE]") == 1
    assert answer.closed  # the last one asked for it
    assert sequence(await backends.stable.requests()) == [str(i) for i in range(count)]


async def test_a_body_many_times_the_read_buffer_reaches_the_backend_whole(
    backends: Backends,
) -> None:
    padding = "x" * 3_000_000
    body = json.dumps({"messages": [{"role": "user", "content": padding}], "max_tokens": 2})
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        + HEAD
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    async with connection(backends) as (reader, writer, _):
        writer.write(head + body.encode() + models(1, close=True))
        answer = await read_answer(reader, quiet_s=5)
    assert statuses(answer.data) == [200, 200], answer.data[:300]
    received = await backends.stable.requests()
    assert [r["path"] for r in received] == ["/v1/chat/completions", "/v1/models"]
    assert dict(received[0]["headers"])["Content-Length"] == str(len(body))


async def test_a_bad_request_behind_one_in_flight_is_answered_400_after_it_then_closed(
    backends: Backends,
) -> None:
    async with connection(backends) as (reader, writer, _):
        writer.write(SLOW_STREAM)
        start = await first_event(reader)
        writer.write(b"GARBAGE /v1/models HTTP/1.1\r\n\r\n")
        await asyncio.sleep(0.05)
        writer.write(models(1))  # after the bad request: never read
        answer = await read_answer(reader, quiet_s=5)
    assert statuses(start + answer.data) == [200, 400]
    assert answer.data.index(b"data: [DONE]") < answer.data.index(b" 400 Bad Request")
    assert json.loads(answer.data.rpartition(b"\r\n\r\n")[2])["error"]["code"] == "bad_http"
    assert answer.closed
    assert sequence(await backends.stable.requests()) == []


ONLY_CHAT = "match: {path_prefix: /v1/chat}"


async def test_an_unneeded_body_that_ends_keeps_the_connection_for_the_next_request(
    backends: Backends,
) -> None:
    async with connection(backends, ONLY_CHAT) as (reader, writer, _):
        writer.write(CHUNKED_POST)  # no route: answered 404 before its body ends
        first = await read_answer(reader, quiet_s=0.3)
        writer.write(b"3\r\n[1]\r\n0\r\n\r\n" + models(1, close=True))
        second = await read_answer(reader, quiet_s=5)
    assert statuses(first.data) == [404]
    assert not first.closed
    assert statuses(second.data) == [404]  # /v1/models has no route either, on the same connection
    assert second.closed


async def test_an_unneeded_body_broken_after_the_answer_closes_the_connection_at_once(
    backends: Backends,
) -> None:
    async with connection(backends, ONLY_CHAT) as (reader, writer, _):
        writer.write(CHUNKED_POST)
        first = await read_answer(reader, quiet_s=0.3)
        started = time.monotonic()
        writer.write(b"zz\r\n")  # not a chunk size
        rest = await read_answer(reader, quiet_s=5)
    assert statuses(first.data) == [404]
    assert rest.closed
    assert rest.data == b""
    assert time.monotonic() - started < 2  # not held for the time an unneeded body may take


async def test_an_unneeded_body_unfinished_within_header_timeout_closes_the_connection(
    backends: Backends,
) -> None:
    top = "limits: {header_timeout: 300ms}"
    async with connection(backends, ONLY_CHAT, top) as (reader, writer, _):
        writer.write(CHUNKED_POST)
        started = time.monotonic()
        answer = await read_answer(reader, quiet_s=5)
    assert statuses(answer.data) == [404]
    assert answer.closed
    assert 0.25 < time.monotonic() - started < 2
