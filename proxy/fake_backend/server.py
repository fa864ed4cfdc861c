"""The fake backend's server: aiohttp's low-level `web.Server` and one small dispatch.

No router and no middlewares: a request is planned by the pure `plan_request`, then
performed here, so the only costs per request are the plan and the writes.

Rule 1: `/fake/*` is the server's own namespace (introspection), never counted.
Rule 2: the server notices a client leaving at once, even while it sleeps between
        tokens or hangs: `handler_cancellation=True` cancels the handler when the
        connection is lost, and the CancelledError is counted as `cancelled`.
Rule 3: a deliberate break (reset, cut, garbage) closes the transport and returns
        without awaiting, so it is counted `aborted`, never `cancelled`.
Rule 4: a client that sends bad HTTP, or leaves before its answer is whole, is one
        log line at INFO, never a traceback (a TLS handshake, which aiohttp calls
        noise, at DEBUG); a bug still logs its traceback at ERROR. The rules are the
        admin port's (`proxy.http.serverlog`), kept here too: this package stands alone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from aiohttp import WSMsgType, hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict

from proxy.fake_backend.apis import ApiStream, FakeApi, api_body, api_error_body
from proxy.fake_backend.hooks import parse_hooks
from proxy.fake_backend.journal import Outcome, RecordedRequest, RequestJournal, ServerStats
from proxy.fake_backend.options import FakeBackendOptions
from proxy.fake_backend.plan import (
    INVALID_REQUEST,
    Action,
    ErrorReply,
    Garbage,
    Generate,
    Hang,
    JsonGarbage,
    ModelList,
    Plan,
    Reset,
    endpoint_of,
    plan_request,
)
from proxy.fake_backend.wire import (
    GARBAGE_RESPONSE,
    JSON_GARBAGE_BODY,
    StreamEvents,
    completion_body,
    completion_id,
    error_body,
    models_body,
)

__all__ = ["FakeBackend", "run_forever"]

logger = logging.getLogger("proxy.fake_backend")

MODEL_HEADER = "x-fake-model"
REALTIME_PATH = "/v1/realtime"
_MAX_BODY_BYTES = 64 * 1024 * 1024
_SHUTDOWN_GRACE_S = 0.5
_BACKLOG = 1024
_INTROSPECTION_PREFIX = "/fake/"
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_UNANSWERED = "before its answer was whole"
_MAX_REASON_CHARS = 80

_Handled = tuple[web.StreamResponse, Outcome]
_Introspect = Callable[[], web.Response]

_TOO_LARGE = Plan(
    0.0,
    ErrorReply(
        413,
        f"fake backend: the request body is over {_MAX_BODY_BYTES} bytes",
        INVALID_REQUEST,
        "body_too_large",
    ),
)


class FakeBackend:
    """An OpenAI-compatible model server with fault hooks; see `proxy.fake_backend`."""

    def __init__(self, options: FakeBackendOptions) -> None:
        self.options = options
        self._rng = random.Random(options.seed)
        self._journal = RequestJournal()
        self._stats = ServerStats()
        self._serials = itertools.count(1)
        self._stream_bytes_sent = 0
        self._created = int(time.time())
        self._runner: web.ServerRunner | None = None
        self._port: int | None = None
        self._json_headers = CIMultiDict(
            {hdrs.CONTENT_TYPE: "application/json", MODEL_HEADER: options.model}
        )
        self._sse_headers = CIMultiDict(
            {
                hdrs.CONTENT_TYPE: "text/event-stream",
                hdrs.CACHE_CONTROL: "no-cache",
                MODEL_HEADER: options.model,
            }
        )
        self._introspection: dict[tuple[str, str], _Introspect] = {
            ("GET", "/fake/requests"): self._list_requests,
            ("DELETE", "/fake/requests"): self._clear_requests,
            ("GET", "/fake/stats"): self._show_stats,
            ("GET", "/fake/traffic"): self._show_traffic,
        }

    @property
    def port(self) -> int:
        """The bound port. Raises RuntimeError before `start`."""
        if self._port is None:
            raise RuntimeError("the fake backend is not started")
        return self._port

    @property
    def url(self) -> str:
        """`http://host:port`, the base URL clients use (add `/v1` for SDKs)."""
        host = self.options.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    async def start(self) -> int:
        """Bind and serve in the background; returns the bound port (useful with port 0).

        Raises:
            RuntimeError: already started.
            OSError: the address cannot be bound.
        """
        if self._runner is not None:
            raise RuntimeError("the fake backend is already started")
        server = web.Server(
            self._handle,
            request_factory=self._make_request,
            handler_cancellation=True,
            access_log=None,
            logger=_NetworkErrorLog(logger),  # aiohttp's server logs through it (Rule 4)
        )
        runner = web.ServerRunner(server, shutdown_timeout=_SHUTDOWN_GRACE_S)
        await runner.setup()
        site = web.TCPSite(runner, self.options.host, self.options.port, backlog=_BACKLOG)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = site.port
        return site.port

    async def stop(self) -> None:
        """Stop listening; requests still running after a short grace are cancelled."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def _make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        loop = asyncio.get_running_loop()
        return web.BaseRequest(
            message, payload, protocol, writer, task, loop, client_max_size=_MAX_BODY_BYTES
        )

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path.startswith(_INTROSPECTION_PREFIX):
            return self._introspect(request)
        if request.path == REALTIME_PATH:
            return await self._realtime(request)
        stats = self._stats
        stats.begin()
        outcome, is_fault = Outcome.CANCELLED, False
        try:
            body = await self._read_body(request)
            plan = _TOO_LARGE if body is None else self._plan(request, body)
            is_fault = plan.is_fault
            if plan.latency_s > 0:
                await asyncio.sleep(plan.latency_s)
            response, outcome = await self._perform(request, plan.action)
            return response
        except ConnectionError as exc:
            transport = request.transport
            if transport is not None and not transport.is_closing():
                raise  # not the client's doing: a bug, logged with its traceback
            # The client left while we wrote; aiohttp sees it too on its own final write.
            _client_left(request, exc)
            return web.Response()
        except asyncio.CancelledError:
            if self._runner is None:  # stopping: what still runs is cancelled
                logger.info(
                    "%s %s: cancelled, the server is stopping", request.method, request.path
                )
            else:  # Rule 2: the client left
                _client_left(request)
            raise
        finally:
            stats.end(outcome, is_fault)

    async def _realtime(self, request: web.BaseRequest) -> web.StreamResponse:
        """`GET /v1/realtime`: a WebSocket session in the shape of OpenAI's Realtime API
        (see the package's docstring); the hooks that apply before the 101 apply."""
        stats = self._stats
        stats.begin()
        outcome, is_fault = Outcome.CANCELLED, False
        self._journal.record(
            RecordedRequest(request.method, request.raw_path, request.raw_headers, b"", time.time())
        )
        try:
            try:
                hooks = parse_hooks(request.headers, self.options.model)
            except ValueError as exc:
                body = error_body(str(exc), INVALID_REQUEST, "bad_fake_hook")
                return await self._send(request, 400, body)
            if hooks.reset_after_headers is not None:
                _close(request)
                outcome, is_fault = Outcome.ABORTED, True
                return web.Response()
            if hooks.status is not None:
                body = error_body(
                    f"fake backend: x-fake-status {hooks.status}", "server_error", "fake_status"
                )
                outcome, is_fault = Outcome.COMPLETED, True
                return await self._send(request, hooks.status, body)
            if hooks.latency_s:
                await asyncio.sleep(hooks.latency_s)
            socket_ = web.WebSocketResponse()
            socket_.headers[MODEL_HEADER] = self.options.model
            if not socket_.can_prepare(request).ok:
                body = error_body(
                    f"{REALTIME_PATH} is a WebSocket endpoint", INVALID_REQUEST, "not_websocket"
                )
                outcome = Outcome.COMPLETED
                return await self._send(request, 400, body)
            await socket_.prepare(request)
            serials = itertools.count(1)
            await socket_.send_json(
                {
                    "type": "session.created",
                    "event_id": f"event_{next(serials)}",
                    "session": {"object": "realtime.session", "model": self.options.model},
                }
            )
            async for message in socket_:
                if message.type is WSMsgType.BINARY:
                    await socket_.send_bytes(message.data)
                    continue
                if message.type is not WSMsgType.TEXT:
                    continue
                if message.data == "fake.close":
                    await socket_.close()
                    break
                if message.data == "fake.reset":
                    _reset(request)
                    outcome, is_fault = Outcome.ABORTED, True
                    return socket_
                await socket_.send_json(
                    {
                        "type": "response.done",
                        "event_id": f"event_{next(serials)}",
                        "response": {
                            "object": "realtime.response",
                            "status": "completed",
                            "output": [{"type": "text", "text": message.data}],
                            "model": self.options.model,
                        },
                    }
                )
            outcome = Outcome.COMPLETED
            return socket_
        finally:
            stats.end(outcome, is_fault)

    async def _read_body(self, request: web.BaseRequest) -> bytes | None:
        """The whole body, recorded in the journal; None when it is over the size limit."""
        received_at = time.time()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            body = None
        recorded = RecordedRequest(
            request.method, request.raw_path, request.raw_headers, body or b"", received_at
        )
        self._journal.record(recorded)
        return body

    def _plan(self, request: web.BaseRequest, body: bytes) -> Plan:
        method, path = request.method, request.path
        endpoint = endpoint_of(method, path, self.options.api)
        # One draw per generation request, used or not, so a seed fixes the sequence.
        inject = endpoint is not None and endpoint.generates
        inject = inject and self._rng.random() < self.options.error_rate
        return plan_request(method, path, request.headers, body, self.options, inject)

    async def _perform(self, request: web.BaseRequest, action: Action) -> _Handled:
        match action:
            case Generate(stream=True):
                return await self._stream(request, action)
            case Generate():
                return await self._generate(request, action)
            case ErrorReply():
                api = self.options.api
                if api is FakeApi.OPENAI or action.code == "bad_fake_hook":
                    body = error_body(action.message, action.error_type, action.code)
                else:
                    body = api_error_body(api, action.status, action.message, action.error_type)
                return await self._send(request, action.status, body), Outcome.COMPLETED
            case ModelList():
                body = models_body(self.options.model, self._created)
                return await self._send(request, 200, body), Outcome.COMPLETED
            case JsonGarbage():
                return await self._send(request, 200, JSON_GARBAGE_BODY), Outcome.COMPLETED
            case Reset():
                return await self._reset(request, action.after_headers), Outcome.ABORTED
            case Garbage():
                _close(request, GARBAGE_RESPONSE)
                return web.Response(), Outcome.ABORTED
            case Hang():
                await _forever()

    async def _send(self, request: web.BaseRequest, status: int, body: bytes) -> web.Response:
        """Write a whole JSON response now, so `completed` means written."""
        response = web.Response(status=status, body=body, headers=self._json_headers)
        await response.prepare(request)
        await response.write_eof()
        return response

    async def _reset(self, request: web.BaseRequest, after_headers: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers=self._sse_headers)
        if after_headers:
            response.enable_chunked_encoding()
            await response.prepare(request)
        _close(request)
        return response

    async def _generate(self, request: web.BaseRequest, generate: Generate) -> _Handled:
        """Wait the whole generation time, then answer in one body (or a cut one)."""
        if generate.generation_s > 0:
            await asyncio.sleep(generate.generation_s)
        if generate.shape is None:
            body = completion_body(
                generate.kind,
                completion_id(generate.kind, next(self._serials)),
                int(time.time()),
                self.options.model,
                generate.n_tokens,
                generate.finish_reason,
                generate.prompt_tokens,
            )
        else:
            body = api_body(
                generate.shape,
                f"{generate.shape.value}-fake-{next(self._serials)}",
                int(time.time()),
                self.options.model,
                generate.n_tokens,
                generate.finish_reason,
                generate.prompt_tokens,
            )
        if generate.overrun:
            return await self._overrun(request, body), Outcome.ABORTED
        if generate.cut_after is None:
            return await self._send(request, 200, body), Outcome.COMPLETED
        response = web.StreamResponse(headers=self._json_headers)
        response.content_length = 2 * len(body)
        await response.prepare(request)
        await response.write(body)
        _close(request)
        return response, Outcome.ABORTED

    async def _overrun(self, request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        """Declare half of `body` and send all of it in one write, keeping the connection.

        The head is written raw, so that the answer and the bytes past its end leave in
        one write; aiohttp then sends the (empty) answer the handler returns after them.
        """
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client already left")
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"%s: %s\r\nContent-Length: %d\r\n\r\n"
            % (MODEL_HEADER.encode(), self.options.model.encode(), len(body) // 2)
        )
        transport.write(head + body)
        return web.Response()

    async def _stream(self, request: web.BaseRequest, generate: Generate) -> _Handled:
        """Stream one event per write in the request's API: opening, tokens, then its end
        (or a failure event, or nothing when told to cut or to leave out the end)."""
        shape = generate.shape
        serial = next(self._serials)
        if shape is None:
            events: StreamEvents | ApiStream = StreamEvents.for_request(
                generate.kind,
                completion_id(generate.kind, serial),
                int(time.time()),
                self.options.model,
            )
            headers = self._sse_headers
        else:
            events = ApiStream(
                shape,
                f"{shape.value}-fake-{serial}",
                int(time.time()),
                self.options.model,
                generate.prompt_tokens,
            )
            headers = CIMultiDict(self._sse_headers)
            headers[hdrs.CONTENT_TYPE] = shape.content_type
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        if generate.ttft_s > 0:
            await asyncio.sleep(generate.ttft_s)
        for event in events.opening():
            await response.write(event)
        n_tokens = generate.n_tokens
        if generate.cut_after is not None:
            n_tokens = min(n_tokens, generate.cut_after)
        await self._write_tokens(response, events, n_tokens, generate.token_interval_s)
        if generate.cut_after is not None:
            _close(request)
            return response, Outcome.ABORTED
        if generate.stream_error:
            await response.write(events.failure(n_tokens))
        elif not generate.no_done:
            if isinstance(events, StreamEvents):
                usage = generate.prompt_tokens if generate.include_usage else None
                ending = events.end(n_tokens, generate.finish_reason, usage)
            else:
                ending = events.end(n_tokens, generate.finish_reason)
            for event in ending:
                await response.write(event)
        await response.write_eof()
        return response, Outcome.COMPLETED

    def _introspect(self, request: web.BaseRequest) -> web.Response:
        show = self._introspection.get((request.method, request.path))
        if show is None:
            message = f"fake backend: no endpoint {request.method} {request.path}"
            body = error_body(message, INVALID_REQUEST, "not_found")
            return web.Response(status=404, body=body, headers=self._json_headers)
        return show()

    def _list_requests(self) -> web.Response:
        return web.Response(body=self._journal.to_json(), headers=self._json_headers)

    def _clear_requests(self) -> web.Response:
        cleared = self._journal.clear()
        body = b'{"cleared":%d}' % cleared
        return web.Response(body=body, headers=self._json_headers)

    def _show_stats(self) -> web.Response:
        return web.Response(body=self._stats.to_json(), headers=self._json_headers)

    def _show_traffic(self) -> web.Response:
        body = b'{"stream_bytes_sent":%d}' % self._stream_bytes_sent
        return web.Response(body=body, headers=self._json_headers)

    async def _write_tokens(
        self,
        response: web.StreamResponse,
        events: StreamEvents | ApiStream,
        n_tokens: int,
        interval_s: float,
    ) -> None:
        """Write token events `0..n_tokens-1`, one write each, `interval_s` apart without drift.

        A write returns once the socket took the event (aiohttp waits for the transport
        to drain), so `stream_bytes_sent` stops growing when the reader stops reading.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        for index in range(n_tokens):
            if interval_s > 0:
                delay = started + index * interval_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            event = events.token(index)
            await response.write(event)
            self._stream_bytes_sent += len(event)


class _NetworkErrorLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logs through it (Rule 4): a request it could not parse is one
    line, in llhttp's words without the client's bytes; anything else as it came."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, None)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")  # aiohttp passes the exception itself
        if not isinstance(exc, HttpProcessingError):
            super().log(level, msg, *args, **kwargs)
            return
        if isinstance(exc, LineTooLong):
            reason = "a request line or header is too long"
        else:
            reason = str(exc.message).split("\n", 1)[0].split(":", 1)[0].strip()
        level = min(level, logging.INFO)
        if self.logger.isEnabledFor(level):
            text = str(msg) % args if args else str(msg)
            self.logger.log(level, "%s: not valid HTTP: %s", text, reason[:_MAX_REASON_CHARS])

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return msg, kwargs  # no `extra`: the records are the wrapped logger's own


def _client_left(request: web.BaseRequest, exc: BaseException | None = None) -> None:
    """Rule 4: the one line for a client gone before its answer was whole."""
    detail = f" ({str(exc)[:_MAX_REASON_CHARS] or type(exc).__name__})" if exc else ""
    logger.info(
        "%s %s from %s: the client left %s%s",
        request.method,
        request.path,
        request.remote or "an address no longer known",
        _UNANSWERED,
        detail,
    )


def _close(request: web.BaseRequest, last_bytes: bytes = b"") -> None:
    """Close the connection after writing `last_bytes`; buffered bytes are still flushed."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client already left")
    if last_bytes:
        transport.write(last_bytes)
    transport.close()


def _reset(request: web.BaseRequest) -> None:
    """Reset the connection (an RST, not a FIN): the way a crashed server's end looks."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("the client already left")
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _forever() -> NoReturn:
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable: the future is never resolved")


async def run_forever(options: FakeBackendOptions) -> None:
    """Serve `options` until SIGINT or SIGTERM, for `canary-proxy fake-backend`.

    Prints one line, `fake-backend listening on http://HOST:PORT model=NAME`, once bound.
    Logs to stderr at `options.log_level`, in the format of `canary-proxy run`.
    """
    logging.basicConfig(level=options.log_level.upper(), format=_LOG_FORMAT, stream=sys.stderr)
    backend = FakeBackend(options)
    await backend.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stopping.set)
    try:
        print(f"fake-backend listening on {backend.url} model={options.model}", flush=True)
        await stopping.wait()
        logger.info("Fake backend stopping on a signal.")
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        await backend.stop()
