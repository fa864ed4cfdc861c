"""What the admin ports log when a client's connection goes wrong.

aiohttp's server logs every request it cannot parse, and every exception a handler
raises, at ERROR with a traceback (`aiohttp.server`). A client that sends bad HTTP, or
closes or resets its connection mid-request or mid-response, is no fault of the
server's: a traceback there hides the ones that matter.

Rules:
1. An expected network error is one log line at INFO, without traceback and without
   the client's bytes: a request that is not valid HTTP (the line says why, in
   llhttp's words), a client gone mid-request or mid-response (closed or reset). Where
   aiohttp itself judged an event noise and logs it at DEBUG (bytes that are not HTTP
   as a connection's first request, such as a TLS handshake), it stays at DEBUG.
2. Any other exception is logged as aiohttp logs it, at ERROR with its traceback: a
   bug must stay loud. A `ConnectionError` counts as the client's only when the
   client's transport is closed; one from a call the handler made is a bug or an
   outage, not a client leaving.
3. Only aiohttp's public parts are used: the `logger` its servers take (`logger=`
   of `web.Server`, `web.AppRunner`) and a middleware for a `web.Application`.
4. Users: the admin port of a process (`proxy.server.admin`) and of a supervisor
   (`proxy.server.supervisor`); the public port only for `bad_http_reason`, since
   `proxy.http.inbound` answers and logs bad HTTP itself (at DEBUG, as the edge must)
   and a client leaving there is a 499 in the metrics. The fake backend keeps the same
   rules in its own code (`proxy.fake_backend.server`): it imports nothing of the proxy.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import BadStatusLine, HttpProcessingError, LineTooLong
from aiohttp.typedefs import Handler, Middleware

__all__ = [
    "NetworkErrorLog",
    "bad_http_reason",
    "client_gone",
    "log_client_left",
    "one_line_network_errors",
]

_MAX_REASON_CHARS: Final = 80


def bad_http_reason(exc: HttpProcessingError) -> str:
    """llhttp's reason for refusing a request, without the client's bytes that follow it."""
    if isinstance(exc, LineTooLong):
        return "a request line or header is too long"
    lines = str(exc.message).split("\n", 2)
    reason = lines[0].split(":", 1)[0].strip()
    if isinstance(exc, BadStatusLine) and len(lines) > 1:
        # aiohttp says "Bad status line" of a request line too; llhttp's reason follows.
        detail = lines[1].split(":", 1)[0].strip()
        if detail == "Invalid HTTP version":
            reason = "this HTTP version is not supported (send HTTP/1.1 or HTTP/1.0)"
        elif detail:
            reason = f"bad request line ({detail})"
    return reason[:_MAX_REASON_CHARS] or "malformed request"


def log_client_left(
    log: logging.Logger, request: web.BaseRequest, when: str, exc: BaseException | None = None
) -> None:
    """Rule 1: the one line for a client gone `when` ("mid-response"), with aiohttp's
    words for what failed (`exc`, a `ConnectionError`) if there are some."""
    detail = f" ({str(exc)[:_MAX_REASON_CHARS] or type(exc).__name__})" if exc else ""
    log.info(
        "%s %s from %s: the client left %s%s",
        request.method,
        request.path,
        _remote(request),
        when,
        detail,
    )


def client_gone(request: web.BaseRequest) -> bool:
    """Whether the connection `request` came on is closed, or closing (Rule 2)."""
    transport = request.transport
    return transport is None or transport.is_closing()


class NetworkErrorLog(logging.LoggerAdapter[logging.Logger]):
    """A logger for an aiohttp server (its `logger=`) that keeps Rules 1 and 2.

    aiohttp hands it what it would have logged, and the exception in `exc_info`. A
    request aiohttp could not parse becomes one line (Rule 1); anything else goes on
    to the wrapped logger as it came, traceback and all (Rule 2). A `ConnectionError`
    a handler raised is not judged here, where the request is unknown: the handlers
    (or `one_line_network_errors`) catch those.
    """

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, None)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = _exception_of(kwargs.get("exc_info"))
        if not isinstance(exc, HttpProcessingError):
            super().log(level, msg, *args, **kwargs)
            return
        level = min(level, logging.INFO)
        if self.logger.isEnabledFor(level):
            text = str(msg) % args if args else str(msg)
            self.logger.log(level, "%s: not valid HTTP: %s", text, bad_http_reason(exc))

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return msg, kwargs  # no `extra`: the records are the wrapped logger's own


def one_line_network_errors(log: logging.Logger) -> Middleware:
    """A middleware for a `web.Application`: a client gone mid-request or mid-response
    is one line on `log` (Rule 1), and the answer is written here, where its failure
    can be seen: aiohttp drops a failed write in silence."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            await _send(request, exc, log)
            raise  # aiohttp finishes it; prepare and write_eof are done, so nothing more
        except ConnectionError as exc:
            if not client_gone(request):
                raise  # Rule 2: not the client's doing
            log_client_left(log, request, "mid-request", exc)
            return web.Response()  # never sent: nobody is there to read it
        await _send(request, response, log)
        return response

    return middleware


async def _send(request: web.Request, response: web.StreamResponse, log: logging.Logger) -> None:
    if response.prepared:
        return  # the handler wrote it, and saw how that went
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError as exc:
        if not client_gone(request):
            raise
        log_client_left(log, request, "mid-response", exc)
        return
    if client_gone(request):
        # A reset can end the wait for the socket to drain without an error: the
        # transport is closing, and what it still held for the client is dropped.
        log.info(
            "%s %s from %s: the client left mid-response (its connection closed as the "
            "answer was written)",
            request.method,
            request.path,
            _remote(request),
        )


def _remote(request: web.BaseRequest) -> str:
    return request.remote or "an address no longer known"  # known while the connection is


def _exception_of(exc_info: object) -> BaseException | None:
    """The exception an `exc_info` argument names, as `logging` reads it."""
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple):
        value = exc_info[1] if len(exc_info) > 1 else None
        return value if isinstance(value, BaseException) else None
    if exc_info is True:
        return sys.exc_info()[1]
    return None
