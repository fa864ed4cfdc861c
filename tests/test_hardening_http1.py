"""A backend that sends more than it answered never desynchronises a kept-alive connection.

Scripted backends on 127.0.0.1 (see `test_http1_pool`) send exact bytes; the connection
must never read them as the answer to the next request (`proxy.http1` Rule 5).
"""

from __future__ import annotations

import asyncio

from tests.test_http1_pool import GET, OK, Script, exchange, read_request, scripted

SECOND = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsmuggled!"


def answer_with(extra: bytes, later_s: float | None = None) -> Script:
    """A script: answer each request with OK and `extra` (in the same write, or later)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if later_s is None:
                writer.write(OK + extra)
            else:
                writer.write(OK)
                await writer.drain()
                await asyncio.sleep(later_s)
                writer.write(extra)
            await writer.drain()

    return script


async def test_bytes_past_the_end_mark_the_connection_and_it_is_not_reused() -> None:
    async with scripted(answer_with(b"tail of a longer body")) as (backend, pool):
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
    async with scripted(answer_with(SECOND[:-3])) as (backend, pool):
        _, _, connection = await exchange(pool)
        assert connection.overran
        pool.release(connection)
        status, body, _ = await exchange(pool)
    assert (status, body) == (200, b"ok")
    assert backend.connections == 2


async def test_bytes_that_come_while_idle_take_the_connection_out_of_the_pool() -> None:
    async with scripted(answer_with(SECOND, later_s=0.05)) as (backend, pool):
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
