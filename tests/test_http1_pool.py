"""The backend client: one HTTP/1.1 connection, and the pool that reuses them.

Each test runs a scripted backend on 127.0.0.1 (a real socket server that answers
with exact bytes), so framing, keep-alive and failures are what a real peer does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiohttp
import pytest

from proxy.config.model import Backend, Timeouts
from proxy.http.http1 import BackendClosed, BackendCut, BackendProtocolError, Connection
from proxy.http.pool import BackendPool, ConnectFailed
from tests.harness import closed_port, proxy_yaml, running_proxy

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
GET = b"GET /x HTTP/1.1\r\nHost: b\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class ScriptedBackend:
    """Accepts connections and runs `script` on each; counts the connections."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        finally:
            writer.close()


@asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[tuple[ScriptedBackend, BackendPool]]:
    backend = ScriptedBackend(script)
    server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = BackendPool(make_backend(port), keepalive_s=60)
    try:
        yield backend, pool
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


def make_backend(port: int, max_connections: int = 8) -> Backend:
    origin = f"http://127.0.0.1:{port}"
    return Backend(
        "b",
        origin,
        origin,
        "",
        timeouts=Timeouts(connect_s=1.0),
        max_connections=max_connections,
    )


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def answer_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer every request on the connection with OK (keep-alive)."""
    while True:
        try:
            await read_request(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        writer.write(OK)
        await writer.drain()


async def exchange(pool: BackendPool, request: bytes = GET) -> tuple[int, bytes, Connection]:
    connection = await pool.acquire()
    connection.send(request, None)
    head = await connection.head()
    body = b""
    while chunk := await connection.read():
        body += chunk
    return head.status, body, connection


async def test_a_kept_alive_connection_is_reused() -> None:
    async with scripted(answer_each) as (backend, pool):
        for _ in range(3):
            status, body, connection = await exchange(pool)
            assert (status, body) == (200, b"ok")
            pool.release(connection)
    assert backend.connections == 1


async def test_connection_close_is_not_reused() -> None:
    async def close_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async with scripted(close_each) as (backend, pool):
        for _ in range(2):
            _, body, connection = await exchange(pool)
            assert body == b"ok"
            assert not connection.reusable
            pool.release(connection)
    assert backend.connections == 2


async def test_a_connection_the_backend_closes_while_idle_leaves_the_pool() -> None:
    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()

    async with scripted(one_then_close) as (backend, pool):
        _, _, connection = await exchange(pool)
        pool.release(connection)
        assert pool.idle_connections == 1
        for _ in range(50):
            if pool.idle_connections == 0:
                break
            await asyncio.sleep(0.01)
        assert pool.idle_connections == 0
        assert pool.open_connections == 0
        _, body, _ = await exchange(pool)
    assert body == b"ok"
    assert backend.connections == 2


async def test_max_connections_makes_requests_wait_their_turn() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            await asyncio.sleep(0.05)
            writer.write(OK)
            await writer.drain()

    backend = ScriptedBackend(slow)
    server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    pool = BackendPool(make_backend(server.sockets[0].getsockname()[1], max_connections=1))

    async def one() -> bytes:
        _, body, connection = await exchange(pool)
        pool.release(connection)
        return body

    try:
        assert await asyncio.gather(*(one() for _ in range(4))) == [b"ok"] * 4
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()
    assert backend.connections == 1


async def test_chunked_body_arrives_chunk_by_chunk_and_ends_cleanly() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"one", b"two"):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)

    async with scripted(chunked) as (_, pool):
        connection = await pool.acquire()
        connection.send(GET, None)
        assert (await connection.head()).status == 200
        assert await connection.read() == b"one"
        assert await connection.read() == b"two"
        assert await connection.read() == b""
        assert connection.reusable


async def test_a_chunked_body_cut_short_is_a_cut() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n")
        await writer.drain()

    async with scripted(cut) as (_, pool):
        connection = await pool.acquire()
        connection.send(GET, None)
        await connection.head()
        assert await connection.read() == b"one"
        with pytest.raises(BackendCut):
            await connection.read()
        assert not connection.reusable


async def test_a_body_without_framing_ends_when_the_connection_closes() -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
        await writer.drain()

    async with scripted(until_close) as (_, pool):
        status, body, connection = await exchange(pool)
    assert (status, body) == (200, b"all of it")
    assert not connection.reusable


async def test_interim_responses_are_skipped() -> None:
    async def early_hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK)
        await writer.drain()
        await asyncio.sleep(0.1)

    async with scripted(early_hints) as (_, pool):
        status, body, connection = await exchange(pool)
        assert (status, body) == (200, b"ok")
        assert connection.reusable


async def test_a_head_answer_has_no_body_whatever_its_length_says() -> None:
    async def head_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)

    async with scripted(head_answer) as (_, pool):
        connection = await pool.acquire()
        connection.send(b"HEAD /x HTTP/1.1\r\nHost: b\r\n\r\n", None, head_method=True)
        head = await connection.head()
        assert head.content_length == b"500"
        assert await asyncio.wait_for(connection.read(), 1) == b""
        assert not connection.reusable


async def test_not_http_is_a_protocol_error() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)

    async with scripted(garbage) as (_, pool):
        connection = await pool.acquire()
        connection.send(GET, None)
        with pytest.raises(BackendProtocolError):
            await connection.head()


async def test_a_close_before_the_head_says_whether_any_byte_came() -> None:
    async def silent_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with scripted(silent_close) as (_, pool):
        connection = await pool.acquire()
        connection.send(GET, None)
        with pytest.raises(BackendClosed) as raised:
            await connection.head()
    assert raised.value.before_any_byte


async def test_refused_connection_is_connect_failed() -> None:
    pool = BackendPool(make_backend(closed_port()))
    with pytest.raises(ConnectFailed, match="cannot connect to backend b"):
        await pool.acquire()
    assert pool.open_connections == 0


async def test_a_slow_reader_stops_the_socket_being_read() -> None:
    big = b"x" * (4 * 1024 * 1024)

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
        await writer.drain()

    async with scripted(flood) as (_, pool):
        connection = await pool.acquire()
        connection.send(GET, None)
        await connection.head()
        await asyncio.sleep(0.3)  # the proxy's reader is busy elsewhere
        assert connection.reading_paused
        received = 0
        while chunk := await connection.read():
            received += len(chunk)
        assert received == len(big)
        assert not connection.reading_paused


async def test_the_proxy_retries_once_when_a_reused_connection_was_just_closed() -> None:
    async def answer_once_then_drop(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # Answers its first request (keep-alive) and drops the connection on the next
        # without a byte: a backend closing an idle connection as the proxy reuses it.
        await read_request(reader)
        body = await reader.readexactly(2)
        assert body == b"{}"
        writer.write(OK)
        await writer.drain()
        await read_request(reader)

    backend = ScriptedBackend(answer_once_then_drop)
    server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with running_proxy(proxy_yaml(url, url)) as proxy:
            async with aiohttp.ClientSession() as session:
                for _ in range(3):
                    async with session.post(f"{proxy.url}/v1/x", data=b"{}") as response:
                        assert response.status == 200
                        assert await response.read() == b"ok"
    finally:
        server.close()
        await server.wait_closed()
    # Each reuse failed before a byte and was retried once on a new connection.
    assert backend.connections == 3


async def test_a_fresh_connection_closed_before_any_byte_is_not_retried() -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    backend = ScriptedBackend(drop)
    server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with running_proxy(proxy_yaml(url, url)) as proxy:
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{proxy.url}/v1/x", data=b"{}") as response:
                    assert response.status == 502
    finally:
        server.close()
        await server.wait_closed()
    assert backend.connections == 1
