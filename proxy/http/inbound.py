"""The client side of the public port: aiohttp's low-level server, hardened for the edge.

aiohttp parses requests with llhttp in its strict mode, which already refuses what
request smuggling needs (Content-Length beside Transfer-Encoding, two lengths, a
length that is not a number, obs-folded lines, control bytes in the request line,
unknown methods, lines over 8190 bytes, more than 128 headers). This module adds
what a server at the edge needs beyond that, per connection, at almost no cost per
request on the usual path (a whole head in one read: a type check).

Rules:
1. A request head must arrive whole within `limits.header_timeout`: for the first
   request, counted from the connection's opening; for a later one on a kept-alive
   connection, from its first byte (an idle kept-alive connection is not a late head).
   A connection whose head is late is closed (slowloris).
2. A request that is not valid HTTP/1.1 is answered 400 in OpenAI's error shape
   (`bad_http`) and its connection is closed; it never reaches the `Forwarder`. It is
   logged at DEBUG, in one line without the client's bytes: hostile clients must not
   be able to fill the log.
3. A chunked body whose framing breaks after its head was read closes the connection:
   aiohttp would otherwise leave the handler waiting for the rest of the body forever.
4. A request that asks to upgrade the protocol is answered as a plain request, and its
   connection is then closed: the proxy upgrades nothing, and aiohttp's parser reads
   no more HTTP on such a connection.
5. An error of the proxy itself (a bug) is still answered in OpenAI's shape, 500,
   and logged at ERROR with its traceback.
6. A connection idle between requests longer than `limits.keepalive_timeout` is closed
   (aiohttp's keep-alive timer). Idle ends at a request's first byte: from there the
   head is Rule 1's.
7. The proxy speaks HTTP/1.1 and HTTP/1.0 and no other version. llhttp lets two more
   through, HTTP/0.9 (a request line without a version) and HTTP/2.0 (a request line
   that says so): such a request is answered 400 `bad_http` in HTTP/1.x, as in Rule 2,
   and never reaches the `Forwarder`. A bare HTTP/0.9 request line as a connection's
   first bytes (`GET /path` and a line end, after which llhttp would wait for headers)
   is answered at once; the same line arriving in pieces, or later on a kept-alive
   connection, gets its answer when its headers end, or is closed by Rule 1.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable
from typing import Any, Final

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from proxy.errors import BadHttp, ProxyError, error_body
from proxy.http.forwarding import Forwarder
from proxy.http.serverlog import bad_http_reason

__all__ = ["ClientConnection", "PublicServer", "UnsupportedVersion"]

log = logging.getLogger("proxy.http.inbound")

_CONTENT_TYPE: Final = "application/json"
_NOT_HTTP_1: Final = "the request is not valid HTTP/1.1"
_VERSIONS_SPOKEN: Final = "send HTTP/1.1 or HTTP/1.0"
_HTTP_1: Final = (HttpVersion11, HttpVersion10)
# A request line without a version (`GET /path` and a line end): HTTP/0.9 (Rule 7).
_HTTP09_LINE: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \r\n]+\r?\n")
_HTTP09_REASON: Final = f"HTTP/0.9 is not supported ({_VERSIONS_SPOKEN})"
_HTTP09_BODY: Final = error_body(BadHttp(f"{_NOT_HTTP_1}: {_HTTP09_REASON}"))
# Written raw: there is no request to answer through aiohttp, only a line.
_HTTP09_ANSWER: Final = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_HTTP09_BODY), _HTTP09_BODY)
)


class ClientConnection(RequestHandler):
    """One client connection to the public port (aiohttp's `RequestHandler`, Rules 1-7).

    It reads three attributes of aiohttp's handler that have no public name: `_waiter`
    (set while the connection waits for a request head), `_messages` (parsed requests
    not yet handled) and `_current_request`. The tests of this module fail if they change.
    """

    __slots__ = ("_fresh", "_head_timeout_s", "_head_timer")

    def __init__(self, manager: web.Server, *, head_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout_s = head_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        self._fresh = True  # no byte received yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._head_timer = self._loop.call_later(self._head_timeout_s, self._head_late)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._fresh:
            self._fresh = False
            if _HTTP09_LINE.match(data) is not None:
                self._refuse_http09()
                return
        super().data_received(data)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            # A head has begun and is not complete yet (Rule 1): a transport never hands
            # over empty data.
            if self._head_timer is None:
                self._head_timer = self._loop.call_later(self._head_timeout_s, self._head_late)
            # Rule 6: no longer idle. aiohttp's idle timer would close a connection whose
            # head is under way; this public call stops it (keep-alive is on already, or
            # the connection would not be waiting for a head).
            self.keep_alive(True)
            return
        messages = self._messages
        if not messages and not self._request_in_progress:
            return  # between two of aiohttp's steps: leave the timer as it is
        if self._head_timer is not None:
            self._head_timer.cancel()  # the head came whole
            self._head_timer = None
        if not messages:
            return
        message = messages[-1][0]
        if isinstance(message, _ErrInfo):
            self._check_body_framing()
        elif message.upgrade:
            self.close()  # Rule 4: once this request is answered

    def _check_body_framing(self) -> None:
        """Rule 3: an error that came while the current body is unfinished is the body's."""
        request = self._current_request
        if request is None or request.content.is_eof():
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        log.debug("closing a connection from %s: its request body is badly framed", _peer(self))
        # As if the client had left: the handler is cancelled when the connection is
        # lost (`handler_cancellation`), and so is any backend request it made.
        self.close()
        transport.close()

    def _refuse_http09(self) -> None:
        """Rule 7: answer a bare HTTP/0.9 request line at once, in HTTP/1.0, and close."""
        log.debug("answered 400 to %s: %s", _peer(self), _HTTP09_REASON)
        transport = self.transport
        assert transport is not None  # it is handing over data
        transport.write(_HTTP09_ANSWER)
        self.force_close()  # the transport sends what it holds before it closes

    def _head_late(self) -> None:
        # The timer only runs while a head is awaited: `data_received` cancels it as soon
        # as one is whole, and `connection_lost` when the client goes.
        self._head_timer = None
        log.debug(
            "closing a connection from %s: no whole request head within %gs",
            _peer(self),
            self._head_timeout_s,
        )
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The answer to a request aiohttp could not parse, or whose handler failed."""
        if request.writer.output_size > 0:
            # Part of an answer went out already: all that is left is to close.
            raise ConnectionError("an answer was under way; the connection is closed")
        error: ProxyError
        if isinstance(exc, HttpProcessingError) and status < 500:
            error = BadHttp(f"{_NOT_HTTP_1}: {bad_http_reason(exc)}")
            log.debug("answered 400 to %s: %s", request.remote, error.message)
        else:
            log.error(
                "the proxy failed answering %s %s", request.method, request.path, exc_info=exc
            )
            error = ProxyError("the proxy failed to answer this request (an internal error)")
            error.status = status
        response = web.Response(
            status=error.status, body=error_body(error), content_type=_CONTENT_TYPE
        )
        response.force_close()
        return response


class UnsupportedVersion(web.BaseRequest):
    """A request in an HTTP version other than 1.0 and 1.1 (Rule 7), to be refused.

    It says HTTP/1.x itself, so that its answer's status line is one its client's
    parser may read: HTTP/1.1 to an HTTP/2.0 request line, HTTP/1.0 to an HTTP/0.9 one.
    """

    ATTRS = web.BaseRequest.ATTRS | frozenset(["sent_version"])

    def __init__(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        sent = message.version
        answered_in = RawRequestMessage(
            message.method,
            message.path,
            HttpVersion11 if sent.major >= 1 else HttpVersion10,
            message.headers,
            message.raw_headers,
            True,  # should_close
            message.compression,
            message.upgrade,
            message.chunked,
            message.url,
        )
        super().__init__(answered_in, payload, protocol, writer, task, loop)
        self.sent_version = sent


class PublicServer(web.Server):
    """aiohttp's low-level server whose connections are `ClientConnection`s.

    The head and keep-alive timeouts are read from the config in force when a
    connection opens, so a reload applies them to new connections.
    """

    def __init__(
        self, forwarder: Forwarder, *, handler_cancellation: bool, **handler_kwargs: Any
    ) -> None:
        super().__init__(
            self._dispatch,
            request_factory=self._make_request,
            handler_cancellation=handler_cancellation,
        )
        self._forwarder = forwarder
        self._event_loop = asyncio.get_running_loop()
        self._handler_kwargs = handler_kwargs

    def __call__(self) -> ClientConnection:
        limits = self._forwarder.table.config.limits
        return ClientConnection(
            self,
            loop=self._event_loop,
            head_timeout_s=limits.header_timeout_s,
            keepalive_timeout=limits.keepalive_timeout_s,
            **self._handler_kwargs,
        )

    def _make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        """What aiohttp's own factory makes, or an `UnsupportedVersion` (Rule 7)."""
        if message.version in _HTTP_1:
            return web.BaseRequest(message, payload, protocol, writer, task, self._event_loop)
        return UnsupportedVersion(message, payload, protocol, writer, task, self._event_loop)

    def _dispatch(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        # A plain function, not a coroutine: the Forwarder's coroutine is handed to
        # aiohttp as it is, with no frame of this module's around it. `type() is`, not
        # isinstance: through the ABC metaclass of a request isinstance costs 0.5 µs.
        if type(request) is UnsupportedVersion:
            return _refuse_version(request)
        return self._forwarder(request)


async def _refuse_version(request: UnsupportedVersion) -> web.StreamResponse:
    """Rule 7: 400 `bad_http`, the connection closed; nothing is forwarded."""
    version = request.sent_version
    error = BadHttp(
        f"{_NOT_HTTP_1}: HTTP/{version.major}.{version.minor} is not supported ({_VERSIONS_SPOKEN})"
    )
    log.debug("answered 400 to %s: %s", request.remote, error.message)
    response = web.Response(status=error.status, body=error_body(error), content_type=_CONTENT_TYPE)
    response.force_close()
    return response


def _peer(handler: RequestHandler) -> object:
    transport = handler.transport
    return transport.get_extra_info("peername") if transport is not None else None
