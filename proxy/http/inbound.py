"""The client side of the public port: a connection protocol of the proxy's own, hardened
for the edge, around aiohttp's HTTP/1.1 request parser.

aiohttp parses requests with llhttp in its strict mode, which already refuses what
request smuggling needs (Content-Length beside Transfer-Encoding, two lengths, a
length that is not a number, obs-folded lines, control bytes in the request line,
unknown methods, lines over 8190 bytes, more than 128 headers). Each client
connection is a `ClientConnection`: an asyncio protocol that feeds what it reads to
that parser (`aiohttp.http.HttpRequestParser`) and serves the requests it yields one
after another, each an aiohttp `BaseRequest` handed to the `Forwarder`, whose
response aiohttp writes. Owning the connection, rather than subclassing aiohttp's
handler, is what shows a head beginning, a head whole and a parse error the moment
they happen, through public API only; on the usual path (a whole head in one read)
the rules below cost no timer and no check beyond the parse itself.

Rules:
1. A request head must arrive whole within `limits.header_timeout`: for the first
   request, counted from the connection's opening; for a later one on a kept-alive
   connection, from its first byte (an idle kept-alive connection is not a late head).
   A connection whose head is late is closed (slowloris).
2. A request that is not valid HTTP/1.1 is answered 400 in OpenAI's error shape
   (`bad_http`), in its turn after the requests before it, and its connection is
   closed; it never reaches the `Forwarder`. It is logged at DEBUG, in one line
   without the client's bytes: hostile clients must not be able to fill the log.
3. A body whose framing breaks after its head was read (a chunked body's) closes the
   connection at once, as if the client had left: its handler is cancelled instead
   of waiting for the rest of the body.
4. A request that asks to upgrade the protocol reads no more HTTP on its connection,
   which is closed after its answer. A WebSocket upgrade (`GET`, `Upgrade: websocket`)
   is the `Forwarder`'s to make (its Rule 12): once the backend switched protocols,
   the connection is taken over whole (`take_over`), and the bytes the client sent
   after its request go with it. Any other upgrade is answered as a plain request.
5. An error of the proxy itself (a bug) is still answered in OpenAI's shape, 500,
   and logged at ERROR with its traceback.
6. A connection idle between requests longer than `limits.keepalive_timeout` is closed.
   Idle ends at a request's first byte: from there the head is Rule 1's.
7. The proxy speaks HTTP/1.1 and HTTP/1.0 and no other version. llhttp lets two more
   through, HTTP/0.9 (a request line without a version) and HTTP/2.0 (a request line
   that says so): such a request is answered 400 `bad_http` in HTTP/1.x, as in Rule 2,
   and never reaches the `Forwarder`. A bare HTTP/0.9 request line as a connection's
   first bytes (`GET /path` and a line end, after which llhttp would wait for headers)
   is answered at once; the same line arriving in pieces, or later on a kept-alive
   connection, gets its answer when its headers end, or is closed by Rule 1.
8. The rest of a body the answer did not need (an error answered before the body
   ended) is read and dropped for up to `limits.header_timeout` after the answer, so
   that the connection can serve the next request; a body still arriving then, or
   broken, closes it.
9. Stopping (`PublicServer.stop`) closes the port at once, closes idle connections,
   lets the requests in flight end within the grace period, then cuts the rest.
   Requests queued behind one in flight (pipelined) are not served.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections import deque
from typing import Final, cast

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpProcessingError, HttpRequestParser, HttpVersion, StreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from proxy.config.model import ListenAddress
from proxy.errors import BadHttp, ProxyError, error_body
from proxy.http.forwarding import Forwarder
from proxy.http.serverlog import bad_http_reason

__all__ = ["ClientConnection", "PublicServer"]

log = logging.getLogger("proxy.http.inbound")

# Parsed requests waiting behind the one being served (pipelining); past it reading
# stops, and resumes once half of them were served.
_MAX_QUEUED: Final = 32
_RESUME_QUEUED: Final = _MAX_QUEUED // 2
# The body bytes buffered before reading stops (aiohttp's default read buffer).
_BODY_BUFFER: Final = 2**16
# llhttp's limits as aiohttp's own server sets them.
_MAX_LINE: Final = 8190
_MAX_FIELD: Final = 8190
_MAX_HEADERS: Final = 128
_BACKLOG: Final = 128

_CONTENT_TYPE: Final = "application/json"
_NOT_HTTP_1: Final = "the request is not valid HTTP/1.1"
_VERSIONS_SPOKEN: Final = "send HTTP/1.1 or HTTP/1.0"
_HTTP_1: Final = (HttpVersion11, HttpVersion10)
# A request line without a version (`GET /path` and a line end): HTTP/0.9 (Rule 7).
_HTTP09_LINE: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \r\n]+\r?\n")
_HTTP09_REASON: Final = f"HTTP/0.9 is not supported ({_VERSIONS_SPOKEN})"

# What a deadline of the connection stands for, once it passes.
_HEAD: Final = "no whole request head within"
_IDLE: Final = "idle for"


class _Refusal:
    """A request that is not HTTP/1.x the proxy may serve, queued to be answered in its
    turn (Rules 2 and 7): the answer's status line version and the reason."""

    __slots__ = ("reason", "version")

    def __init__(self, reason: str, version: bytes = b"HTTP/1.1") -> None:
        self.reason = reason
        self.version = version

    def answer(self) -> bytes:
        body = error_body(BadHttp(f"{_NOT_HTTP_1}: {self.reason}"))
        return b"%s 400 Bad Request\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (
            self.version,
            _CONTENT_TYPE.encode(),
            len(body),
        ) + (b"Connection: close\r\n\r\n%s" % body)


_Queued = tuple[RawRequestMessage | _Refusal, StreamReader | None]


class ClientConnection(BaseProtocol):
    """One client connection to the public port (Rules 1-8).

    aiohttp's `BaseRequest` and `StreamWriter` take it as their protocol: they read its
    `transport`, `connected`, `peername`, `sockname`, `ssl_context`, `max_field_size`
    and `max_headers`, wait on its write flow control (`BaseProtocol`), and call its
    `pause_reading`/`resume_reading` when a request body's buffer fills or drains.
    """

    _opened: asyncio.Transport

    __slots__ = (
        "_body_full",
        "_closing",
        "_current",
        "_deadline",
        "_event_loop",
        "_forwarder",
        "_fresh",
        "_head_timeout_s",
        "_held",
        "_keepalive_timeout_s",
        "_last_body",
        "_late",
        "_opened",
        "_queue",
        "_queue_full",
        "_reading",
        "_request_parser",
        "_server",
        "_stopped",
        "_task",
        "_timer",
        "_timer_at",
        "max_field_size",
        "max_headers",
        "peername",
        "sockname",
        "ssl_context",
    )

    def __init__(
        self,
        server: PublicServer,
        loop: asyncio.AbstractEventLoop,
        *,
        head_timeout_s: float,
        keepalive_timeout_s: float,
    ) -> None:
        super().__init__(loop)
        self._server = server
        self._forwarder = server.forwarder
        self._event_loop = loop
        self._head_timeout_s = head_timeout_s
        self._keepalive_timeout_s = keepalive_timeout_s
        self._request_parser = HttpRequestParser(
            self,
            loop,
            _BODY_BUFFER,
            max_line_size=_MAX_LINE,
            max_field_size=_MAX_FIELD,
            max_headers=_MAX_HEADERS,
            auto_decompress=False,  # what the client sent is what the backend gets
        )
        self.max_field_size = _MAX_FIELD
        self.max_headers = _MAX_HEADERS
        self.peername: object = None
        self.sockname: object = None
        self.ssl_context: object = None
        self._queue: deque[_Queued] = deque()
        self._task: asyncio.Task[None] | None = None  # serving the queue, while busy
        self._current: web.BaseRequest | None = None  # in its handler
        self._last_body: StreamReader | None = None  # of the last request parsed
        self._fresh = True  # no byte received yet
        self._held: bytes | None = None  # after an upgrade request: what came after it
        self._stopped = False  # no more input is parsed (an error, an upgrade, closing)
        self._closing = False  # close once the request in flight is answered
        self._reading = True
        self._body_full = False
        self._queue_full = False
        # One timer per connection, moved lazily: a deadline set later than the timer
        # is met when the timer fires early and sets itself again.
        self._deadline: float | None = None
        self._late = _HEAD
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # also TCP_NODELAY
        self._opened = cast(asyncio.Transport, transport)
        self.peername = transport.get_extra_info("peername")
        self.sockname = transport.get_extra_info("sockname")
        self.ssl_context = transport.get_extra_info("sslcontext")
        # A dead peer (a TCP transport always has its socket).
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._server.connection_made(self)
        self._expect(_HEAD, self._head_timeout_s)  # Rule 1: from the opening

    def connection_lost(self, exc: BaseException | None) -> None:
        self.gone(exc)
        gone = ConnectionResetError("the client closed the connection")
        # A handler waiting on a body wakes up; then it is cancelled, as the client left.
        for body in (
            self._current.content if self._current is not None else None,
            self._last_body,
        ):
            if body is not None and not body.is_eof():
                body.set_exception(gone)
        task = self._task
        if task is not None:
            task.cancel()

    def gone(self, exc: BaseException | None) -> None:
        """The transport closed: from `connection_lost`, or from the tunnel it was
        taken over by (Rule 4), whose session the task serving this connection awaits."""
        self._stopped = True
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
        self._deadline = None
        super().connection_lost(exc)
        self._server.connection_lost(self)

    def take_over(self) -> tuple[asyncio.Transport, bytes]:
        """Rule 4: the transport for a WebSocket session, and what the client sent after
        its upgrade request."""
        held, self._held = self._held or b"", None
        return self._opened, held

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            held = self._held
            if held is not None:  # the upgrade's, if it is made (Rule 4)
                held = self._held = held + data
                if len(held) > _BODY_BUFFER:
                    self._opened.pause_reading()  # until a tunnel reads on
            return
        if self._fresh:
            self._fresh = False
            if _HTTP09_LINE.match(data) is not None:
                self._refuse_at_once(_Refusal(_HTTP09_REASON, b"HTTP/1.0"))
                return
        try:
            messages, upgraded, tail = self._request_parser.feed_data(data)
        except HttpProcessingError as exc:
            self._parse_failed(exc)
            return
        if messages:
            queue = self._queue
            queue.extend(messages)
            self._last_body = messages[-1][1]
            if upgraded:
                self._stopped = True  # Rule 4: no more HTTP on this connection
                self._held = tail
            if self._task is None:
                self._deadline = None  # a head came whole: no deadline while it is served
                self._task = self._event_loop.create_task(self._serve())
            elif len(queue) >= _MAX_QUEUED:
                self._queue_full = True
                self._update_reading()
        elif data and self._task is None and self._late is _IDLE:
            self._expect(_HEAD, self._head_timeout_s)  # Rules 1 and 6: a head has begun

    def eof_received(self) -> bool:
        return False  # the transport closes: a client that stops sending has left

    # --- read flow control: what aiohttp's body reader calls -----------------------------

    def pause_reading(self) -> None:
        self._body_full = True
        self._update_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._body_full = False
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        read = not (self._body_full or self._queue_full)
        if read != self._reading and transport is not None:
            self._reading = read
            if read:
                transport.resume_reading()
            else:
                transport.pause_reading()

    # --- serving --------------------------------------------------------------------

    async def _serve(self) -> None:
        """Answer the queued requests in order, then wait idle (Rule 6)."""
        queue = self._queue
        try:
            while queue:
                message, body = queue.popleft()
                if self._queue_full and len(queue) <= _RESUME_QUEUED:
                    self._queue_full = False
                    self._update_reading()
                if isinstance(message, _Refusal):
                    self._refuse_at_once(message)
                    return
                if message.version not in _HTTP_1:
                    self._refuse_at_once(_version_refusal(message.version))
                    return
                assert body is not None
                if not await self._answer(message, body):
                    self._close()
                    return
            # `_answer` said the connection goes on, and nothing ran since.
            self._expect(_IDLE, self._keepalive_timeout_s)
        finally:
            self._task = None

    async def _answer(self, message: RawRequestMessage, body: StreamReader) -> bool:
        """Serve one request; may the connection serve another after it?"""
        loop = self._event_loop
        writer = StreamWriter(self, loop)
        task = asyncio.current_task(loop)
        assert task is not None
        # BaseRequest is typed for aiohttp's own handler; it reads only what this
        # class has (see its docstring).
        request = web.BaseRequest(message, body, cast(RequestHandler, self), writer, task, loop)
        self._current = request
        upgrade = message.upgrade
        try:
            if upgrade and message.method == "GET" and _is_websocket(message):
                response = await self._forwarder(request, self)
            else:
                response = await self._forwarder(request)
        except Exception as exc:  # not a cancellation: the client left, or a stop cut it
            if writer.output_size > 0:
                return False  # part of an answer went out: all that is left is to close
            response = _internal_error(request, exc)
        finally:
            self._current = None
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError:
            return False
        if not response.keep_alive or self._closing or upgrade:
            return False  # Rule 4: an upgrade is answered, then its connection closed
        # Rule 9: a stop that came while the body lingered closes it as well.
        return (body.is_eof() or await _linger(body, self._head_timeout_s)) and not self._closing

    # --- refusals and closing -----------------------------------------------------------

    def _parse_failed(self, exc: HttpProcessingError) -> None:
        self._stopped = True  # the parser read no further than the error
        body = self._last_body
        if body is not None and not body.is_eof():
            # Rule 3: the error is in a body its handler already reads.
            log.debug(
                "closing a connection from %s: its request body is badly framed", self.peername
            )
            self._close()
            return
        self._queue.append((_Refusal(bad_http_reason(exc)), None))
        if self._task is None:
            self._deadline = None
            self._task = self._event_loop.create_task(self._serve())

    def _refuse_at_once(self, refusal: _Refusal) -> None:
        """Rules 2 and 7: answer 400 `bad_http` and close; nothing is forwarded."""
        log.debug("answered 400 to %s: %s", self.peername, refusal.reason)
        self._stopped = True
        transport = self.transport
        # Called while the transport hands over data, or by the task serving the
        # connection, which is cancelled when the connection is lost.
        assert transport is not None
        transport.write(refusal.answer())
        self._close()

    def _close(self) -> None:
        """Close the connection; the transport sends what it holds first."""
        self._stopped = True
        self._closing = True
        # The transport as it was opened: closing it again after it is lost does nothing.
        self._opened.close()

    def finish(self) -> None:
        """Close once the request in flight is answered; at once when there is none."""
        self._closing = True
        self._stopped = True
        if self._task is None:
            self._close()

    def abort(self) -> None:
        """Close now; the request in flight, if any, is cancelled with it."""
        self._close()
        task = self._task
        if task is not None:
            task.cancel()

    @property
    def serving(self) -> asyncio.Task[None] | None:
        """The task serving this connection's requests; None while it is idle."""
        return self._task

    # --- the deadline ---------------------------------------------------------------------

    def _expect(self, late: str, timeout_s: float) -> None:
        """From now on, the connection is closed unless it is busy within `timeout_s`."""
        loop = self._event_loop
        deadline = self._deadline = loop.time() + timeout_s
        self._late = late
        timer = self._timer
        if timer is not None:
            if self._timer_at <= deadline:
                return  # it fires first and sets itself again
            timer.cancel()
        self._timer_at = deadline
        self._timer = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self.transport is None:
            return  # busy: the deadline is set again when it is idle
        if self._event_loop.time() < deadline:
            self._timer_at = deadline
            self._timer = self._event_loop.call_at(deadline, self._on_timer)
            return
        timeout_s = self._head_timeout_s if self._late is _HEAD else self._keepalive_timeout_s
        log.debug("closing a connection from %s: %s %gs", self.peername, self._late, timeout_s)
        self._close()


class PublicServer:
    """The public port: one `ClientConnection` per client, each serving the `Forwarder`.

    The head and keep-alive timeouts are read from the config in force when a
    connection opens, so a reload applies them to new connections.
    """

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self._loop = asyncio.get_running_loop()
        self._connections: set[ClientConnection] = set()
        self._server: asyncio.Server | None = None

    def __call__(self) -> ClientConnection:
        limits = self.forwarder.table.config.limits
        return ClientConnection(
            self,
            self._loop,
            head_timeout_s=limits.header_timeout_s,
            keepalive_timeout_s=limits.keepalive_timeout_s,
        )

    def connection_made(self, connection: ClientConnection) -> None:
        self._connections.add(connection)

    def connection_lost(self, connection: ClientConnection) -> None:
        self._connections.discard(connection)

    async def start(self, address: ListenAddress, sock: socket.socket | None = None) -> int:
        """Listen on `address`, or on `sock` (inherited from a supervisor); the bound port."""
        if sock is None:
            server = await self._loop.create_server(
                self, address.host, address.port, backlog=_BACKLOG, reuse_address=True
            )
        else:
            server = await self._loop.create_server(self, sock=sock, backlog=_BACKLOG)
        self._server = server
        return int(server.sockets[0].getsockname()[1])

    async def stop(self, grace_s: float) -> None:
        """Rule 9: close the port, let requests in flight end within `grace_s`, cut the rest."""
        server = self._server
        assert server is not None, "stop() before start()"
        server.close()
        await asyncio.sleep(0)  # a connection just accepted gets its first read
        for connection in list(self._connections):
            connection.finish()
        busy = {c.serving for c in self._connections if c.serving is not None}
        if busy:
            await asyncio.wait(busy, timeout=grace_s)
        for connection in list(self._connections):
            connection.abort()


def _is_websocket(message: RawRequestMessage) -> bool:
    """Rule 4: does an upgrade request ask for WebSocket?"""
    return message.headers.get("Upgrade", "").strip().lower() == "websocket"


def _version_refusal(version: HttpVersion) -> _Refusal:
    """Rule 7: the answer says HTTP/1.x, one its client's parser may read: HTTP/1.1 to
    an HTTP/2.0 request line, HTTP/1.0 to an HTTP/0.9 one."""
    reason = f"HTTP/{version.major}.{version.minor} is not supported ({_VERSIONS_SPOKEN})"
    return _Refusal(reason, b"HTTP/1.1" if version.major >= 1 else b"HTTP/1.0")


def _internal_error(request: web.BaseRequest, exc: Exception) -> web.Response:
    """Rule 5: a bug of the proxy's, answered 500 in OpenAI's shape and logged loud."""
    log.error("the proxy failed answering %s %s", request.method, request.path, exc_info=exc)
    error = ProxyError("the proxy failed to answer this request (an internal error)")
    response = web.Response(status=error.status, body=error_body(error), content_type=_CONTENT_TYPE)
    response.force_close()
    return response


async def _linger(body: StreamReader, timeout_s: float) -> bool:
    """Rule 8: read and drop the rest of `body`; did it end within `timeout_s`?"""
    try:
        async with asyncio.timeout(timeout_s):
            while not body.is_eof():
                await body.readany()
    except Exception:  # timed out, or the body broke: either way, close
        return False
    return True
