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
from proxy.http.pool import BackendPool, ConnectFailed, ConnectTimeout, PoolTimeout
from tests.harness import (
    RunningProxy,
    eventually,
    proxy_yaml,
    refused_port,
    running_proxy,
    unanswered_port,
)

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
async def scripted(
    script: Script, max_connections: int = 8
) -> AsyncIterator[tuple[ScriptedBackend, BackendPool]]:
    backend = ScriptedBackend(script)
    server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = BackendPool(make_backend(port, max_connections), keepalive_s=60)
    try:
        yield backend, pool
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def proxied(script: Script) -> AsyncIterator[tuple[ScriptedBackend, RunningProxy]]:
    """A proxy in front of a scripted backend (both backends of its route)."""
    backend = ScriptedBackend(script)
    server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with running_proxy(proxy_yaml(url, url)) as proxy:
            yield backend, proxy
    finally:
        server.close()
        await server.wait_closed()


def make_backend(
    port: int, max_connections: int = 8, connect_s: float = 1.0, pool_s: float = 5.0
) -> Backend:
    origin = f"http://127.0.0.1:{port}"
    return Backend(
        "b",
        origin,
        origin,
        "",
        timeouts=Timeouts(connect_s=connect_s, pool_s=pool_s),
        max_connections=max_connections,
    )


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def replies(*parts: bytes, pause_s: float = 0.0, linger_s: float = 0.0) -> Script:
    """A script: read one request, send `parts` (`pause_s` apart), keep the connection
    open `linger_s` more, and close it."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for index, part in enumerate(parts):
            if index and pause_s:
                await asyncio.sleep(pause_s)
            writer.write(part)
            await writer.drain()
        await asyncio.sleep(linger_s)

    return script


def answering(
    extra: bytes = b"", *, delay_s: float = 0.0, extra_after_s: float | None = None
) -> Script:
    """A script: answer every request on the connection with OK (keep-alive), `delay_s`
    after it came, and `extra` after the answer (in the same write, or `extra_after_s`
    later)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            await asyncio.sleep(delay_s)
            if extra_after_s is None:
                writer.write(OK + extra)
            else:
                writer.write(OK)
                await writer.drain()
                await asyncio.sleep(extra_after_s)
                writer.write(extra)
            await writer.drain()

    return script


answer_each = answering()


async def exchange(
    pool: BackendPool, request: bytes = GET, body: bytes | None = None
) -> tuple[int, bytes, Connection]:
    connection = await pool.acquire()
    connection.send(request, body)
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
    close_each = replies(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")

    async with scripted(close_each) as (backend, pool):
        for _ in range(2):
            _, body, connection = await exchange(pool)
            assert body == b"ok"
            assert not connection.reusable
            pool.release(connection)
    assert backend.connections == 2


async def test_a_connection_the_backend_closes_while_idle_leaves_the_pool() -> None:
    one_then_close = replies(OK)

    async with scripted(one_then_close) as (backend, pool):
        _, _, connection = await exchange(pool)
        pool.release(connection)
        assert pool.idle_connections == 1
        await eventually(
            "the closed connection out of the pool",
            lambda: pool.idle_connections == 0,
            timeout_s=0.5,
            interval_s=0.01,
        )
        assert pool.open_connections == 0
        _, body, _ = await exchange(pool)
    assert body == b"ok"
    assert backend.connections == 2


async def test_max_connections_makes_requests_wait_their_turn() -> None:
    async with scripted(answering(delay_s=0.05), max_connections=1) as (backend, pool):

        async def one() -> bytes:
            _, body, connection = await exchange(pool)
            pool.release(connection)
            return body

        assert await asyncio.gather(*(one() for _ in range(4))) == [b"ok"] * 4
    assert backend.connections == 1


@asynccontextmanager
async def one_connection_pool(pool_s: float) -> AsyncIterator[tuple[ScriptedBackend, BackendPool]]:
    backend = ScriptedBackend(answer_each)
    server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = BackendPool(make_backend(port, max_connections=1, pool_s=pool_s), keepalive_s=60)
    try:
        yield backend, pool
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def test_a_taker_past_max_connections_waits_at_most_the_pool_timeout() -> None:
    async with one_connection_pool(pool_s=0.2) as (_, pool):
        busy = await pool.acquire()
        assert (busy.waited_s, busy.queued_ahead) == (0.0, 0)
        first = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0.05)
        second = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0.01)
        assert pool.queued == 2
        with pytest.raises(PoolTimeout) as first_error:
            await first
        with pytest.raises(PoolTimeout) as second_error:
            await second
        assert pool.queued == 0
        assert 0.2 <= first_error.value.waited_s < 0.5
        assert (first_error.value.queued_ahead, second_error.value.queued_ahead) == (0, 1)
        pool.discard(busy)


async def test_queued_takers_get_connections_in_their_order_and_say_how_long_they_waited() -> None:
    async with one_connection_pool(pool_s=5.0) as (backend, pool):
        busy = await pool.acquire()
        takers = [asyncio.create_task(pool.acquire()) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert pool.queued == 3
        served: list[int] = []
        connection = busy
        for index in range(3):
            # Closed, not released: the place it frees goes to the next in the queue,
            # which opens a new connection.
            pool.discard(connection)
            connection = await takers[index]
            served.append(connection.queued_ahead)
            assert connection.waited_s >= 0.1
        assert served == [0, 1, 2]
        connection.send(GET, None)
        await connection.head()
        assert await connection.read() == b"ok"
        assert await connection.read() == b""
        pool.release(connection)  # kept idle: nobody is waiting for it
        assert pool.queued == 0
        assert pool.idle_connections == 1
    assert backend.connections == 4


async def test_a_queued_taker_that_is_cancelled_leaves_the_queue() -> None:
    async with one_connection_pool(pool_s=5.0) as (_, pool):
        busy = await pool.acquire()
        taker = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0.05)
        assert pool.queued == 1
        taker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await taker
        assert pool.queued == 0
        busy.send(GET, None)
        await busy.head()
        assert await busy.read() == b"ok"
        assert await busy.read() == b""
        pool.release(busy)
        assert pool.idle_connections == 1  # kept, not handed to the cancelled taker


async def test_a_connection_handed_to_a_taker_cancelled_meanwhile_goes_back_to_the_pool() -> None:
    async with one_connection_pool(pool_s=5.0) as (_, pool):
        busy = await pool.acquire()
        busy.send(GET, None)
        await busy.head()
        assert await busy.read() == b"ok"
        assert await busy.read() == b""
        taker = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0.05)
        pool.release(busy)  # handed to the taker's future ...
        taker.cancel()  # ... which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await taker
        assert pool.idle_connections == 1
        assert pool.queued == 0


async def test_a_woken_taker_that_finds_its_place_taken_keeps_its_turn() -> None:
    async with one_connection_pool(pool_s=5.0) as (_, pool):
        busy = await pool.acquire()
        first = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0.05)
        second = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0.05)
        pool.discard(busy)
        await asyncio.sleep(0)  # its close frees the place and wakes `first` ...
        assert pool.open_connections == 0
        late = await pool.acquire()  # ... but a newcomer takes it before `first` runs
        await asyncio.sleep(0.05)
        assert not first.done()
        assert pool.queued == 2
        pool.discard(late)
        winner = await asyncio.wait_for(first, 1.0)  # `first` still goes before `second`
        assert not second.done()
        pool.discard(winner)
        pool.discard(await asyncio.wait_for(second, 1.0))


async def test_chunked_body_arrives_chunk_by_chunk_and_ends_cleanly() -> None:
    chunked = replies(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n",
        b"3\r\ntwo\r\n",
        b"0\r\n\r\n",
        pause_s=0.05,
        linger_s=0.1,
    )

    async with scripted(chunked) as (_, pool):
        connection = await pool.acquire()
        connection.send(GET, None)
        assert (await connection.head()).status == 200
        assert await connection.read() == b"one"
        assert await connection.read() == b"two"
        assert await connection.read() == b""
        assert connection.reusable


async def test_a_chunked_body_cut_short_is_a_cut() -> None:
    cut = replies(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n")

    async with scripted(cut) as (_, pool):
        connection = await pool.acquire()
        connection.send(GET, None)
        await connection.head()
        assert await connection.read() == b"one"
        with pytest.raises(BackendCut):
            await connection.read()
        assert not connection.reusable


async def test_a_body_without_framing_ends_when_the_connection_closes() -> None:
    until_close = replies(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")

    async with scripted(until_close) as (_, pool):
        status, body, connection = await exchange(pool)
    assert (status, body) == (200, b"all of it")
    assert not connection.reusable


async def test_interim_responses_are_skipped() -> None:
    early_hints = replies(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK, linger_s=0.1)

    async with scripted(early_hints) as (_, pool):
        status, body, connection = await exchange(pool)
        assert (status, body) == (200, b"ok")
        assert connection.reusable


async def test_a_head_answer_has_no_body_whatever_its_length_says() -> None:
    head_answer = replies(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n", linger_s=0.2)

    async with scripted(head_answer) as (_, pool):
        connection = await pool.acquire()
        connection.send(b"HEAD /x HTTP/1.1\r\nHost: b\r\n\r\n", None, head_method=True)
        head = await connection.head()
        assert head.content_length == b"500"
        assert await asyncio.wait_for(connection.read(), 1) == b""
        assert not connection.reusable


async def test_not_http_is_a_protocol_error() -> None:
    garbage = replies(b"SSH-2.0-OpenSSH\r\n\r\n", linger_s=0.1)

    async with scripted(garbage) as (_, pool):
        connection = await pool.acquire()
        connection.send(GET, None)
        with pytest.raises(BackendProtocolError):
            await connection.head()


async def test_a_close_before_the_head_says_whether_any_byte_came() -> None:
    silent_close = replies()

    async with scripted(silent_close) as (_, pool):
        connection = await pool.acquire()
        connection.send(GET, None)
        with pytest.raises(BackendClosed) as raised:
            await connection.head()
    assert raised.value.before_any_byte


async def test_refused_connection_is_connect_failed() -> None:
    pool = BackendPool(make_backend(refused_port()))
    with pytest.raises(ConnectFailed, match="cannot connect to backend b"):
        await pool.acquire()
    assert pool.open_connections == 0


async def test_a_slow_reader_stops_the_socket_being_read() -> None:
    big = b"x" * (4 * 1024 * 1024)

    flood = replies(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big)

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

    async with proxied(answer_once_then_drop) as (backend, proxy):
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.post(f"{proxy.url}/v1/x", data=b"{}") as response:
                    assert response.status == 200
                    assert await response.read() == b"ok"
    # Each reuse failed before a byte and was retried once on a new connection.
    assert backend.connections == 3


async def test_a_fresh_connection_closed_before_any_byte_is_not_retried() -> None:
    async with proxied(replies()) as (backend, proxy), aiohttp.ClientSession() as session:
        async with session.post(f"{proxy.url}/v1/x", data=b"{}") as response:
            assert response.status == 502
    assert backend.connections == 1


# --- waiting for a connection, and what ends the wait -----------------------------------


async def start_waiting(pool: BackendPool) -> asyncio.Task[Connection]:
    """An `acquire` that waits for a connection (the pool is at its maximum)."""
    task = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)  # it runs up to its wait, which needs no I/O to reach
    assert not task.done()
    return task


async def waiting_behind_one_that_left(pool: BackendPool) -> asyncio.Task[Connection]:
    """Two waiters, the first of whose clients left: the second, still waiting."""
    left = await start_waiting(pool)
    staying = await start_waiting(pool)
    left.cancel()
    with pytest.raises(asyncio.CancelledError):
        await left
    return staying


async def test_a_waiter_cancelled_once_handed_a_connection_gives_it_back() -> None:
    async with scripted(answer_each, max_connections=1) as (backend, pool):
        _, _, held = await exchange(pool)
        waiting = await start_waiting(pool)
        pool.release(held)  # handed to the waiter, which has not run yet
        waiting.cancel()  # its client left in between
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert pool.idle_connections == 1
        status, _, again = await exchange(pool)
        assert (status, again) == (200, held)
    assert backend.connections == 1


async def test_a_cancelled_waiter_is_passed_over_for_the_next() -> None:
    async with scripted(answer_each, max_connections=1) as (backend, pool):
        _, _, held = await exchange(pool)
        staying = await waiting_behind_one_that_left(pool)
        pool.release(held)
        assert await staying is held
    assert backend.connections == 1


async def test_a_closed_connection_lets_a_waiter_open_a_new_one() -> None:
    async with scripted(answer_each, max_connections=1) as (backend, pool):
        held = await pool.acquire()
        staying = await waiting_behind_one_that_left(pool)
        pool.discard(held)
        fresh = await staying
        assert fresh is not held
        fresh.send(GET, None)
        assert (await fresh.head()).status == 200
    assert backend.connections == 2


async def test_closing_the_pool_ends_every_wait() -> None:
    async with scripted(answer_each, max_connections=1) as (_, pool):
        await pool.acquire()
        waiting = await waiting_behind_one_that_left(pool)
        await pool.close()
        with pytest.raises(asyncio.CancelledError):
            await waiting


async def test_a_connection_not_made_within_connect_is_connect_timeout() -> None:
    with unanswered_port() as port:
        pool = BackendPool(make_backend(port, connect_s=0.2))
        with pytest.raises(ConnectTimeout, match=r"could not connect to backend b within 0\.2s"):
            await pool.acquire()
    assert pool.open_connections == 0


async def test_a_request_that_leaves_while_connecting_frees_its_place() -> None:
    with unanswered_port() as port:
        pool = BackendPool(make_backend(port, max_connections=1, connect_s=30))
        connecting = asyncio.create_task(pool.acquire())
        await eventually("a connection under way", lambda: pool.open_connections == 1, timeout_s=5)
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
    assert pool.open_connections == 0


# --- one connection's rarer turns --------------------------------------------------------


async def test_a_whole_body_over_64_kib_arrives_intact() -> None:
    big = bytes(range(256)) * 1024  # 256 KiB, not one repeated byte

    async def echo_length(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        received = await reader.readexactly(len(big))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        writer.write(b"ok" if received == big else b"no")
        await writer.drain()

    async with scripted(echo_length) as (_, pool):
        request = b"POST /x HTTP/1.1\r\nHost: b\r\nContent-Length: %d\r\n\r\n" % len(big)
        status, body, _ = await exchange(pool, request, big)
    assert (status, body) == (200, b"ok")


async def test_a_streamed_body_waits_while_the_backend_reads_nothing() -> None:
    piece = b"x" * (1024 * 1024)
    reading = asyncio.Event()

    async def late_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reading.wait()
        received = 0
        while received < 8 * len(piece):
            received += len(await reader.read(65536))
        writer.write(OK)
        await writer.drain()

    async with scripted(late_reader) as (_, pool):
        connection = await pool.acquire()
        connection.start_streaming(
            b"POST /x HTTP/1.1\r\nHost: b\r\nContent-Length: %d\r\n\r\n" % (8 * len(piece))
        )
        for _ in range(8):
            connection.write_body(piece)
        drained = asyncio.create_task(connection.drain())
        await asyncio.sleep(0.2)
        assert not drained.done(), "the socket took 8 MiB the backend never read"
        reading.set()
        await asyncio.wait_for(drained, 10)
        assert (await connection.head()).status == 200


async def test_a_streamed_body_to_a_closed_connection_fails_before_the_answer() -> None:
    drop = replies()

    async with scripted(drop) as (_, pool):
        connection = await pool.acquire()
        connection.start_streaming(b"POST /x HTTP/1.1\r\nHost: b\r\nContent-Length: 9\r\n\r\n")
        await eventually("the backend's close", lambda: connection.closed, timeout_s=5)
        with pytest.raises(BackendClosed) as raised:
            await connection.drain()
    assert not raised.value.before_any_byte


async def test_an_answer_that_came_before_it_was_awaited_is_kept() -> None:
    early = replies(b"HTTP/1.1 204 No Content\r\n\r\n", linger_s=0.5)

    async with scripted(early) as (_, pool):
        connection = await pool.acquire()
        connection.send(GET, None)
        await eventually("the whole answer", connection.at_eof, timeout_s=5)
        head = await connection.head()
        assert head.status == 204
        assert await connection.read() == b""
        assert connection.reusable


async def test_a_close_before_the_head_was_awaited_is_raised_when_it_is() -> None:
    drop = replies()

    async with scripted(drop) as (_, pool):
        connection = await pool.acquire()
        connection.send(GET, None)
        await eventually("the backend's close", lambda: connection.closed, timeout_s=5)
        with pytest.raises(BackendClosed):
            await connection.head()


async def test_switching_protocols_is_a_protocol_error() -> None:
    upgrade = replies(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\n\r\nbinary frames",
        linger_s=0.5,
    )

    async with scripted(upgrade) as (_, pool):
        connection = await pool.acquire()
        connection.send(GET, None)
        with pytest.raises(BackendProtocolError, match="switched protocols"):
            await connection.head()


async def test_a_101_asked_for_is_the_answer_and_what_follows_it_the_new_protocols() -> None:
    upgrade = replies(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\n\r\nfirst frames",
        linger_s=0.5,
    )

    async with scripted(upgrade) as (_, pool):
        connection = await pool.acquire()
        connection.expect_upgrade()
        connection.send(GET, None)
        # The answer came before anyone waited for it.
        await eventually("the 101", lambda: connection.at_eof(), timeout_s=5)
        head = await connection.head()
        transport, rest = connection.take_over()
        assert head.status == 101
        assert rest == b"first frames"
        assert not connection.reusable  # the transport is the new protocol's now
        assert pool.open_connections == 1
        transport.close()
        connection.connection_lost(None)  # as the new protocol passes the end on
        assert pool.open_connections == 0


async def test_the_body_a_head_answer_is_followed_by_is_not_an_overrun() -> None:
    # The body comes after the head, as what a GET would have got.
    with_body = replies(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"hello", pause_s=0.1, linger_s=0.5
    )

    async with scripted(with_body) as (_, pool):
        connection = await pool.acquire()
        connection.send(b"HEAD /x HTTP/1.1\r\nHost: b\r\n\r\n", None, head_method=True)
        assert (await connection.head()).status == 200
        await eventually("the connection closed", lambda: connection.closed, timeout_s=5)
        assert not connection.overran
