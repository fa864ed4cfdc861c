"""A backend that sends more than it answered never desynchronises a kept-alive connection.

Scripted backends on 127.0.0.1 (see `test_http1_pool`) send exact bytes; the connection
must never read them as the answer to the next request (`proxy.http.http1` Rule 5).
"""

from __future__ import annotations

import asyncio
import gzip

import aiohttp

from tests.test_http1_pool import GET, answering, exchange, proxied, read_request, replies, scripted

SECOND = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsmuggled!"


async def test_bytes_past_the_end_mark_the_connection_and_it_is_not_reused() -> None:
    async with scripted(answering(b"tail of a longer body")) as (backend, pool):
        status, body, connection = await exchange(pool)
        assert (status, body) == (200, b"ok")
        assert connection.overran
        assert not connection.reusable
        pool.release(connection)
        status, body, second = await exchange(pool)
    assert (status, body) == (200, b"ok")
    assert second is not connection
    assert backend.connections == 2


async def test_a_second_answer_nobody_asked_for_is_never_the_next_answer() -> None:
    async with scripted(answering(SECOND[:-3])) as (backend, pool):
        _, _, connection = await exchange(pool)
        assert connection.overran
        pool.release(connection)
        status, body, _ = await exchange(pool)
    assert (status, body) == (200, b"ok")
    assert backend.connections == 2


async def test_bytes_that_come_while_idle_take_the_connection_out_of_the_pool() -> None:
    async with scripted(answering(SECOND, extra_after_s=0.05)) as (backend, pool):
        _, _, connection = await exchange(pool)
        assert not connection.overran  # nothing extra yet
        pool.release(connection)
        await asyncio.sleep(0.3)
        assert connection.closed
        assert pool.idle_connections == 0
        status, body, _ = await exchange(pool)
    assert (status, body) == (200, b"ok")
    assert backend.connections == 2


async def test_a_head_request_may_be_followed_by_its_body_without_blame() -> None:
    head_answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(head_answer)
        await writer.drain()
        await asyncio.sleep(1)

    async with scripted(script) as (_, pool):
        connection = await pool.acquire()
        connection.send(GET.replace(b"GET", b"HEAD"), None, head_method=True)
        head = await connection.head()
        await asyncio.sleep(0.1)
        assert head.status == 200
        assert await connection.read() == b""
        assert not connection.overran
        assert not connection.reusable
        pool.release(connection)


async def test_a_compressed_json_answer_is_not_taken_for_a_broken_one() -> None:
    """A backend that gzips its JSON (OpenAI does, for clients that accept it) is fine."""
    body = gzip.compress(b'{"id":"x","choices":[{"finish_reason":"stop"}]}')
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )

    async with proxied(replies(answer)) as (_, proxy):
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.post(f"{proxy.url}/v1/chat/completions", data=b"{}") as response,
        ):
            received = await response.read()
        counts = proxy.server.telemetry.metrics.upstream_requests
    assert received == body
    assert [key[3] for key in counts] == ["ok"], counts
