"""The client side of HTTP/1.1 to a backend: one connection, one exchange at a time.

A proxy needs little of a general HTTP client: it already has the request head as the
client sent it, and it only relays the answer. So this is a lean asyncio protocol
around llhttp (through httptools) instead of a client library: the request goes out
as one write of ready bytes, and the response body comes back as the chunks llhttp
found, with nothing decoded, decompressed or copied on the way.

Rules:
1. One exchange at a time; the connection is reusable only after a complete exchange
   that the backend did not ask to close (keep-alive), and never after an error.
2. A response without Content-Length or chunked framing ends when the connection
   closes (HTTP/1.0 style); any other body that stops early is `BackendCut`.
3. Interim 1xx responses (100 Continue, 103 Early Hints) are skipped.
4. The answer to a HEAD request has no body, whatever its headers say; the
   connection is not reused after it (llhttp cannot be told to skip the body).
5. Bytes after a complete answer (more body than its Content-Length said, or a second
   response nobody asked for) mark the connection `overran` and close it: they are
   never read as the answer to the next request (response desynchronisation).
6. Reading backpressure: past `_HIGH_WATER` unread bytes the socket stops being
   read, and resumes below `_LOW_WATER`, so a slow client slows the backend instead
   of filling the proxy's memory.
7. A 101 Switching Protocols is an answer only to an exchange started with
   `expect_upgrade()`; anywhere else it is a protocol error. After it the connection
   stops reading and is the caller's (`take_over`): the bytes after the head and the
   transport go to whoever speaks the new protocol, and the transport's end is passed
   back to `connection_lost`, so the pool frees its place then. Any other answer to
   such an exchange is an ordinary one, but the connection is not reused after it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Final, cast

import httptools

__all__ = ["BackendClosed", "BackendCut", "BackendProtocolError", "Connection", "Head"]

_HIGH_WATER: Final = 256 * 1024
_LOW_WATER: Final = 64 * 1024


class BackendProtocolError(Exception):
    """The backend sent something that is not HTTP/1.1, or not a valid answer."""


class BackendClosed(BackendProtocolError):
    """The backend closed or reset the connection before the response head."""

    def __init__(self, message: str, *, before_any_byte: bool) -> None:
        super().__init__(message)
        self.before_any_byte = before_any_byte


class BackendCut(Exception):
    """The response body stopped before its end (reset, bad framing, closed early)."""


class Head:
    """A response's status line and headers, as received (header names and values as bytes)."""

    __slots__ = (
        "content_encoding",
        "content_length",
        "content_type",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        content_type: bytes | None,
        content_length: bytes | None,
        content_encoding: bytes | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_type = content_type
        self.content_length = content_length
        self.content_encoding = content_encoding


class Connection(asyncio.Protocol):
    """One connection to a backend. `pool_forget` is called once, when it closes."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, pool_forget: Callable[[Connection], None]
    ) -> None:
        self._loop = loop
        self._forget = pool_forget
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.exchanges = 0  # completed exchanges, to tell a reused connection
        self.overran = False  # the backend sent bytes after a complete answer (Rule 5)
        # Of the taker the pool last handed this connection to (proxy.http.pool, rule 5).
        self.waited_s = 0.0
        self.queued_ahead = 0
        # The current exchange.
        self._head_method = False
        self._head: Head | None = None
        self._head_waiter: asyncio.Future[Head] | None = None
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._content_type: bytes | None = None
        self._content_length: bytes | None = None
        self._content_encoding: bytes | None = None
        self._framed = False  # the body has a Content-Length or chunked framing
        self._informational = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._reading_paused = False
        self._body_waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._error: Exception | None = None
        self._keep_alive = False
        self._received_any = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._upgrading = False  # this exchange asked to switch protocols (Rule 7)
        self._switching: Head | None = None  # its 101, until llhttp confirms the switch
        self._after_head = b""  # the new protocol's first bytes, read with the 101

    # --- the exchange, for the forwarding code ----------------------------------------

    def send(self, head: bytes, body: bytes | None, *, head_method: bool = False) -> None:
        """Start an exchange: write the request head and a body that is already whole."""
        self._start(head_method)
        assert self.transport is not None
        if not body:
            self.transport.write(head)
        elif len(body) < _LOW_WATER:
            self.transport.write(head + body)  # one write, one packet, for the usual request
        else:
            self.transport.writelines((head, body))

    def start_streaming(self, head: bytes) -> None:
        """Start an exchange whose body follows with `write_body` and `drain`."""
        self._start(False)
        assert self.transport is not None
        self.transport.write(head)

    def expect_upgrade(self) -> None:
        """Take a 101 as the answer to the exchange just started (Rule 7)."""
        self._upgrading = True

    def close_after(self) -> None:
        """Do not reuse the connection after this exchange (Rule 7)."""
        self._keep_alive = False

    def take_over(self) -> tuple[asyncio.Transport, bytes]:
        """After a 101: the transport, and the bytes the backend sent after the head."""
        assert self.transport is not None
        return self.transport, self._after_head

    def write_body(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the socket takes more (backpressure on a streamed request body)."""
        if self.closed:
            raise BackendClosed("the backend closed the connection", before_any_byte=False)
        if self._writing_paused:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter

    async def head(self) -> Head:
        """The response head (after any 1xx)."""
        if self._head is not None:
            return self._head
        if self._error is not None:
            raise self._error
        self._head_waiter = self._loop.create_future()
        try:
            return await self._head_waiter
        finally:
            self._head_waiter = None

    async def read(self) -> bytes:
        """The next body bytes (everything received so far); b"" at the end.

        Raises:
            BackendCut: the body stopped before its end.
        """
        while not self._chunks:
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            self._body_waiter = self._loop.create_future()
            try:
                await self._body_waiter
            finally:
                self._body_waiter = None
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    @property
    def reading_paused(self) -> bool:
        """Has backpressure stopped reading the socket (the reader is behind)?"""
        return self._reading_paused

    def at_eof(self) -> bool:
        return self._complete and not self._chunks

    @property
    def reusable(self) -> bool:
        """May the next exchange use this connection (after this one completed)?"""
        return self._complete and self._keep_alive and not self._chunks and not self.closed

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def _start(self, head_method: bool) -> None:
        self._head_method = head_method
        self._head = None
        self._chunks.clear()
        self._buffered = 0
        self._complete = False
        self._error = None
        self._keep_alive = False
        self._received_any = False

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but are one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._received_any = True
        if self._complete:
            self._after_end()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._switched(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._head is None:
            self._fail(
                BackendClosed(
                    "the backend closed the connection before answering",
                    before_any_byte=not self._received_any,
                )
            )
        elif not self._complete:
            if self._framed:
                self._fail(BackendCut("the backend closed the connection mid-body"))
            else:
                self._complete = True
                self._wake_body()
        self._wake_drain()
        self._forget(self)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_drain()

    # --- llhttp callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            raise BackendProtocolError("a second answer to one request")  # Rule 5
        self._reason = b""
        self._headers = []
        self._content_type = None
        self._content_length = None
        self._content_encoding = None
        self._framed = False

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        lowered = name.lower()
        if lowered == b"content-type":
            self._content_type = value
        elif lowered == b"content-length":
            self._content_length = value
            self._framed = True
        elif lowered == b"transfer-encoding":
            self._framed = True
        elif lowered == b"content-encoding":
            self._content_encoding = value

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        self._informational = 100 <= status < 200
        if self._informational:
            if status == 101 and self._upgrading:
                # The answer, once llhttp confirms the switch (Rule 7).
                self._switching = Head(101, self._reason, self._headers, None, None)
            return
        self._keep_alive = self._parser.should_keep_alive()
        if status in (204, 304):
            self._framed = True
        head = Head(
            status,
            self._reason,
            self._headers,
            self._content_type,
            self._content_length,
            self._content_encoding,
        )
        self._head = head
        if self._head_method:
            self._framed = True
            self._keep_alive = False
            self._complete = True
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(head)

    def on_body(self, body: bytes) -> None:
        if self._complete:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_body()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._complete = True
        self.exchanges += 1
        self._wake_body()

    # --- helpers -------------------------------------------------------------------------

    def _switched(self, rest: bytes) -> None:
        """The backend switched protocols: its new protocol starts with `rest` (Rule 7)."""
        head = self._switching
        if head is None:
            self._fail(BackendProtocolError("the backend switched protocols"))
            return
        self._head = head
        self._complete = True
        self._after_head = rest
        assert self.transport is not None
        self.transport.pause_reading()  # until the new protocol's reader takes over
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(head)

    def _parse_failed(self, exc: httptools.HttpParserError) -> None:
        if self._complete:
            self._after_end()  # the read held more than the answer
        else:
            self._fail(BackendProtocolError(f"the backend's answer is not valid HTTP: {exc}"))

    def _after_end(self) -> None:
        """Bytes came after a complete answer: the connection cannot be trusted again."""
        # A HEAD's answer may well be followed by the body its headers describe.
        if not self._head_method:
            self.overran = True
        self._keep_alive = False
        self.close()

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._keep_alive = False
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self._wake_body()
        self.close()

    def _wake_body(self) -> None:
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._drain_waiter = None
