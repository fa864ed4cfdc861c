"""One client request, end to end: route it, assign a variant, send it, relay the answer.

Rules:
1. A request reads the current `RouteTable` once and finishes on it, whatever is
   swapped in meanwhile.
2. The body is read only when a decision or a model rewrite needs it, when a
   fallback may have to send it again, or when it is small (reading a small body is
   cheaper than streaming it); otherwise it streams to the backend unread.
3. An attempt succeeds when the backend sent its response head and first body bytes
   within `first_byte` of having the request (a streamed body is the client's time,
   bounded by `header_timeout` between pieces, not the backend's). Before that point
   a canary attempt that failed (connect error, timeout, reset, a 5xx or 429 status)
   is retried once on stable when the route says `fallback_to_stable`; the response
   then says `x-canary-variant: stable` and `x-canary-fallback: <why the canary failed>`.
4. Errors the proxy makes are answered in OpenAI's error shape with the status the
   error carries (`proxy.errors`); a backend's own 4xx/5xx passes through untouched.
   A request that found every connection to its backend busy for the pool timeout
   gets 503 `pool_timeout` (no fallback: the request never reached the canary); it
   is counted as its own error type and never as an error of its variant.
5. Library exceptions become `proxy.errors` here, at one boundary, with `from exc`.
6. The backend gets the request target in origin form (`/path?query`), whatever form
   the client used: an absolute-form target (`GET http://other.host/...`) would let a
   client name a host the backend believes over the Host header (RFC 9112 §3.2.2).
7. A request head over `MAX_HEAD_BYTES` is refused (431) before it reaches a backend:
   llhttp caps each line and the number of headers, not their sum.
8. A client's `x-request-id` is kept when it is printable ASCII of at most 200
   characters; any other is replaced by one of the proxy's (it goes into two heads).
9. Once `draining` (SIGTERM), a request that still reaches the proxy on an open
   connection is answered 503 `draining` with Retry-After, and its connection closed;
   requests already in flight run to their end.
10. `POST /v1/feedback` is the proxy's own (`proxy.telemetry.feedback`) unless
   `limits.feedback_ids` is 0: it rates an answered request, by its x-request-id,
   for the variant that served it. Every answered request's id is remembered for it.
11. A stable-served request of a route in shadow may be picked to be sent again to
   the canary (`proxy.http.shadow`): its body is then read, and it is offered to the
   shadow dispatcher once its answer is relayed. A route without shadow pays one
   attribute check.
12. A WebSocket upgrade (`GET` with `Connection: Upgrade` and `Upgrade: websocket`,
   as the OpenAI Realtime API opens) is routed and assigned as any request, from its
   path, headers, query and credentials (it has no body, so a `body:` key finds
   nothing and the next source is tried). It goes to the backend with its upgrade
   headers, on a connection that never goes back to the pool; it is an attempt as
   any other until the backend's 101, fallback included. A 101 is sent on to the
   client and the two connections become a tunnel (`proxy.http.tunnel`) until either
   side ends it; the session is recorded then (`Recorder.session_done`). Any other
   answer is relayed as usual, and the client's connection closed after it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from aiohttp import web

from proxy.config.model import Backend, BackendApi, Variant
from proxy.errors import (
    BadFeedback,
    Draining,
    HeadTooLarge,
    NoRoute,
    Overloaded,
    PoolExhausted,
    ProxyError,
    RequestTimeout,
    UnknownRequest,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnreachable,
    error_body,
)
from proxy.http.body import RequestBody
from proxy.http.deadlines import Deadlines, Watch
from proxy.http.headers import REQUEST_ID, VARIANT, request_head, switching_head, upgrade_head
from proxy.http.http1 import BackendClosed, BackendCut, BackendProtocolError, Connection
from proxy.http.pool import ConnectFailed, ConnectTimeout, PoolTimeout
from proxy.http.relay import Opened, relay
from proxy.http.shadow import ShadowDispatcher, ShadowRequest
from proxy.http.tunnel import End, Tunnel
from proxy.http.upstreams import Upstreams
from proxy.routing.assignment import RoutePlan, RouteTable, assign, match_route
from proxy.routing.keys import NEED_BODY, is_trusted
from proxy.telemetry.feedback import score_of
from proxy.telemetry.logs import REQUEST
from proxy.telemetry.recorder import Exchange, Recorder
from proxy.telemetry.tracing import format_traceparent

__all__ = [
    "FALLBACK",
    "FEEDBACK_PATH",
    "MAX_HEAD_BYTES",
    "ClientLine",
    "Forwarder",
    "Snapshot",
    "Switched",
    "error_response",
]

log = logging.getLogger("proxy.http.forwarding")

FALLBACK: Final = "x-canary-fallback"
# The status a request is recorded with when its client left before the answer
# (nginx's convention).
_CLIENT_GONE: Final = 499
# Bodies up to this size are read rather than streamed to the backend.
_SMALL_BODY_BYTES: Final = 64 * 1024
# The largest request head sent to a backend, as Envoy's default (60 KiB) and above
# nginx's (4 x 8 KiB): model servers refuse more (uvicorn's h11 at 16 KiB and up).
MAX_HEAD_BYTES: Final = 64 * 1024
# A client's x-request-id longer than this, or not printable ASCII, is replaced.
_MAX_REQUEST_ID_CHARS: Final = 200
FEEDBACK_PATH: Final = "/v1/feedback"
# A feedback body is an id and a score; anything larger is not one.
_FEEDBACK_BODY_BYTES: Final = 4096

Payload = bytes | RequestBody | None  # a whole body, one to stream on, or none


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a request reads once and finishes on, whatever is swapped in meanwhile:
    the routes with the weights in force, and the backends' connection pools."""

    table: RouteTable
    upstreams: Upstreams


class ClientLine(Protocol):
    """The client's connection, as an upgrade needs it (Rule 12)."""

    def take_over(self) -> tuple[asyncio.Transport, bytes]:
        """The connection's transport, no longer read as HTTP, and the bytes the client
        sent after its request head."""

    def gone(self, exc: Exception | None) -> None:
        """The transport taken over has closed."""


class Switched(web.StreamResponse):
    """The answer to an upgrade that became a session: its 101 went out before the
    session, which is over; there is nothing left to send, and the connection is closed."""

    def __init__(self) -> None:
        super().__init__(status=101)
        self.force_close()

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


class Forwarder:
    """The request handler of the public port. `snapshot` is swapped whole to change routing."""

    def __init__(self, snapshot: Snapshot, deadlines: Deadlines, telemetry: Recorder) -> None:
        self.snapshot = snapshot
        self.deadlines = deadlines
        self.telemetry = telemetry
        self.shadows = ShadowDispatcher(telemetry)
        self.in_flight = 0
        self.draining = False  # set at SIGTERM: new requests get 503 draining
        self._time = asyncio.get_running_loop().time
        self._id_prefix = os.urandom(4).hex()
        self._id_counter = itertools.count(1)

    @property
    def table(self) -> RouteTable:
        return self.snapshot.table

    async def __call__(
        self, request: web.BaseRequest, client: ClientLine | None = None
    ) -> web.StreamResponse:
        """Answer `request`; `client` only for a WebSocket upgrade (Rule 12)."""
        snapshot = self.snapshot
        telemetry = self.telemetry
        headers = request.headers
        traceparent = headers.get("traceparent")
        exchange = Exchange(
            request.method, request.path, self._time(), telemetry.begin(traceparent), traceparent
        )
        exchange.config_version = snapshot.table.config.version
        # What is logged while this request is served carries its trace.
        serving = REQUEST.set(exchange)
        request_id = headers.get(REQUEST_ID)
        if not request_id or not _is_request_id(request_id):
            request_id = f"{self._id_prefix}-{next(self._id_counter):x}"
        status = _CLIENT_GONE
        try:
            if self.draining:
                response: web.StreamResponse = error_response(
                    Draining("the proxy is shutting down; send this request again"), request_id
                )
                response.force_close()
            elif self.in_flight >= snapshot.table.config.limits.max_concurrency:
                response = error_response(Overloaded("too many requests in flight"), request_id)
            else:
                self.in_flight += 1
                try:
                    response = await self._serve(request, snapshot, request_id, exchange, client)
                finally:
                    self.in_flight -= 1
            status = response.status
            return response
        finally:
            telemetry.request_done(exchange, status, self._time())
            REQUEST.reset(serving)

    async def _serve(
        self,
        request: web.BaseRequest,
        snapshot: Snapshot,
        request_id: str,
        exchange: Exchange,
        client: ClientLine | None,
    ) -> web.StreamResponse:
        telemetry = self.telemetry
        try:
            if (
                request.path == FEEDBACK_PATH
                and request.method == "POST"
                and telemetry.recent.capacity
            ):
                exchange.http_route = FEEDBACK_PATH
                return await self._feedback(request, snapshot, request_id)
            # Opening and relaying are two calls, not one inside the other, so that a
            # long stream keeps only this frame and the relay's alive.
            opened = await self._open(request, snapshot, request_id, exchange, client is not None)
        except ProxyError as error:
            return error_response(error, request_id, exchange.variant)
        if isinstance(opened, web.StreamResponse):
            return opened
        if client is not None:
            if opened.head.status == 101:
                return await self._session(opened, client, exchange)
            opened.connection.close_after()  # an upgrade's connection is never reused
        attempt = opened.attempt
        try:
            response = await relay(request, opened, self.deadlines)
        except BaseException:
            attempt.cancelled = True
            raise
        finally:
            ended = self._time()
            telemetry.attempt_done(exchange, attempt, ended)
        telemetry.recent.remember(request_id, attempt.route, attempt.variant)
        shadow = opened.shadow
        if shadow is not None:
            self.shadows.offer(shadow, exchange, attempt, ended, snapshot.upstreams, request_id)
        if opened.cut is not None:
            log.debug(
                "route %s: %s stream from %s cut: %s",
                attempt.route,
                attempt.variant,
                attempt.backend,
                opened.cut,
            )
        return response

    async def _feedback(
        self, request: web.BaseRequest, snapshot: Snapshot, request_id: str
    ) -> web.Response:
        """Rule 10: count a score for the variant that served the rated request."""
        limits = snapshot.table.config.limits
        body = RequestBody(request, _FEEDBACK_BODY_BYTES, limits.header_timeout_s)
        parsed = await body.json()
        rated = parsed.get("request_id")
        if not isinstance(rated, str) or not rated:
            raise BadFeedback('give the rated answer\'s x-request-id as "request_id" (a string)')
        score = score_of(parsed.get("score"))
        if score is None:
            raise BadFeedback(
                '"score" must be a number: below 0 is negative, 0 neutral, above 0 positive'
            )
        served = self.telemetry.feedback(rated, score)
        if served is None:
            raise UnknownRequest(
                f"no request {rated!r} among the last {limits.feedback_ids} this process "
                "answered: it is older, was answered by another process, or was rated already"
            )
        route, variant = served
        return web.json_response(
            {"request_id": rated, "route": route, "variant": variant.value, "score": score},
            headers={REQUEST_ID: request_id},
        )

    async def _session(self, opened: Opened, client: ClientLine, exchange: Exchange) -> Switched:
        """Rule 12: the backend switched protocols; relay both ways until the session ends."""
        attempt = opened.attempt
        connection = opened.connection
        self.deadlines.unwatch(opened.watch)
        head = switching_head(
            opened.head.headers,
            variant=attempt.variant,
            request_id=opened.request_id,
            extra=opened.extra_headers,
        )
        client_transport, from_client = client.take_over()
        backend_transport, from_backend = connection.take_over()
        tunnel = Tunnel(
            client_transport,
            backend_transport,
            idle_s=opened.pool.backend.timeouts.upgrade_idle_s,
            client_lost=client.gone,
            backend_lost=connection.connection_lost,
        )
        client_transport.write(head)
        tunnel.start(from_backend, from_client)
        self.telemetry.recent.remember(opened.request_id, attempt.route, attempt.variant)
        try:
            await tunnel.done
        except BaseException:
            tunnel.close(End.SHUTDOWN)
            raise
        finally:
            self.telemetry.session_done(
                exchange, attempt, tunnel.end, tunnel.to_backend, tunnel.to_client, self._time()
            )
        return Switched()

    async def _open(
        self,
        request: web.BaseRequest,
        snapshot: Snapshot,
        request_id: str,
        exchange: Exchange,
        upgrade: bool,
    ) -> Opened | web.Response:
        """Route, assign and send: the first bytes of an answer, or an error response."""
        table = snapshot.table
        config = table.config
        limits = config.limits
        body = RequestBody(request, limits.max_body_bytes, limits.header_timeout_s)
        plan = match_route(table, request.path, None)
        if plan is NEED_BODY:
            plan = match_route(table, request.path, await body.json())
        if plan is None:
            raise NoRoute(f"no route for {request.method} {request.path}")
        route = plan.route
        exchange.route = route.name
        exchange.http_route = route.match.path_prefix
        parsed = await body.json() if body.is_parsed else None
        assignment = assign(plan, request, parsed, config.trusted_proxies)
        if assignment is NEED_BODY:
            assignment = assign(plan, request, await body.json(), config.trusted_proxies)
        variant = exchange.variant = assignment.variant
        exchange.assignment = assignment
        may_fall_back = variant is Variant.CANARY and route.fallback_to_stable
        peer_trusted = is_trusted(request.remote, config.trusted_proxies)
        shadow: ShadowRequest | None = None
        if plan.shadow and variant is Variant.STABLE:
            shadow = await self.shadows.pick(
                request, body, plan, assignment, config.trusted_proxies
            )
        payload = await _payload(body, plan, variant, buffer=may_fall_back)
        if exchange.trace is not None:
            exchange.body = body.raw
            exchange.user_agent = request.headers.get("user-agent")
        try:
            opened = await self._attempt(
                request,
                request_id,
                peer_trusted,
                snapshot.upstreams,
                plan,
                exchange,
                payload,
                fail_on_status=may_fall_back,
                upgrade=upgrade,
            )
        except UpstreamError as error:
            if not may_fall_back:
                return error_response(error, request_id, variant)
            log.debug("route %s: canary failed before its first byte (%s)", route.name, error)
            canary_error = error
        else:
            opened.shadow = shadow
            return opened
        variant = exchange.variant = Variant.STABLE
        exchange.fallback = True
        try:
            opened = await self._attempt(
                request,
                request_id,
                peer_trusted,
                snapshot.upstreams,
                plan,
                exchange,
                await _payload(body, plan, variant, buffer=True),
                fail_on_status=False,
                upgrade=upgrade,
            )
        except UpstreamError as error:
            return error_response(error, request_id, variant)
        opened.extra_headers = {FALLBACK: canary_error.error_type}
        return opened

    async def _attempt(
        self,
        request: web.BaseRequest,
        request_id: str,
        peer_trusted: bool,
        upstreams: Upstreams,
        plan: RoutePlan,
        exchange: Exchange,
        payload: Payload,
        *,
        fail_on_status: bool,
        upgrade: bool,
    ) -> Opened:
        """Send to the exchange's variant's backend: its response head and first body bytes.

        Raises:
            UpstreamError: the attempt failed before the first byte (it is recorded).
            PoolExhausted: no connection came free in time (it is recorded, as rejected).
            HeadTooLarge: the head is over `MAX_HEAD_BYTES` (nothing was sent or recorded).
        """
        variant = exchange.variant
        assert variant is not None
        pool = upstreams[plan.route.backend_of(variant)]
        backend = pool.backend
        attempt = self.telemetry.new_attempt(exchange, variant, backend.name, self._time())
        attempt.fallback = exchange.fallback
        attempt.host, attempt.port = pool.host, pool.port
        trace = exchange.trace
        streamed = isinstance(payload, RequestBody)
        if isinstance(payload, RequestBody):
            content_length = request.content_length
        else:
            content_length = None if payload is None else len(payload)
        target = request.raw_path
        if not target.startswith("/"):
            target = request.rel_url.raw_path_qs  # Rule 6
        head = request_head(
            request.method,
            (backend.base_path + target).encode("utf-8", "surrogateescape"),
            request.raw_headers,
            host=pool.host_header,
            peer=request.remote,
            peer_trusted=peer_trusted,
            scheme=request.scheme,
            api_key=backend.api_key,
            x_api_key=backend.api is BackendApi.ANTHROPIC,
            request_id=request_id,
            content_length=content_length,
            traceparent=(
                format_traceparent(trace.trace_id, attempt.span_id, True)
                if trace is not None and attempt.span_id is not None
                else None
            ),
        )
        if upgrade:
            head = upgrade_head(head)
        if len(head) > MAX_HEAD_BYTES:
            raise HeadTooLarge(
                f"the request head is {len(head)} bytes; the limit is {MAX_HEAD_BYTES}"
            )
        deadlines = self.deadlines
        now = self._time
        head_method = request.method == "HEAD"
        watch: Watch | None = None
        connection: Connection | None = None
        try:
            retry = False
            while True:
                connection = await pool.acquire(fresh=retry)
                if watch is None:
                    # The backend's clocks (first byte, and the attempt's duration and
                    # time to first token, which the judge reads) start with a connection
                    # in hand: a wait in the queue is the proxy's (pool rule 1).
                    watch = deadlines.watch(backend.timeouts.first_byte_s)
                    if connection.waited_s:
                        attempt.started += connection.waited_s
                        attempt.pool_wait_s = connection.waited_s
                        attempt.queued_ahead = connection.queued_ahead
                try:
                    if upgrade:
                        connection.expect_upgrade()
                    await _send(connection, head, payload, head_method, watch, now)
                    response = await connection.head()
                    break
                except BackendClosed as exc:
                    # A kept-alive connection the backend closed just as it was reused
                    # saw nothing of the request: one retry on a new connection is safe.
                    if retry or streamed or not exc.before_any_byte or connection.exchanges == 0:
                        raise
                    pool.discard(connection)
                    retry = True
            assert watch is not None
            attempt.status = response.status
            if fail_on_status and (response.status >= 500 or response.status == 429):
                raise UpstreamStatus(response.status)
            first = await connection.read()
            attempt.first_byte_at = self._time()
        except BaseException as exc:
            if watch is not None:
                deadlines.unwatch(watch)
            if connection is not None:
                pool.discard(connection)
            if isinstance(exc, PoolTimeout):
                attempt.pool_wait_s, attempt.queued_ahead = exc.waited_s, exc.queued_ahead
                attempt.error_type = PoolExhausted.error_type
                attempt.rejected = True
                self.telemetry.attempt_done(exchange, attempt, self._time())
                raise PoolExhausted(str(exc)) from exc
            failure = _attempt_failure(exc, watch, backend)
            if failure is None:
                # A client that left, or went silent mid-body, is no fault of the backend.
                attempt.cancelled = isinstance(exc, asyncio.CancelledError | RequestTimeout)
                attempt.error_type = None if attempt.cancelled else "proxy_error"
            else:
                attempt.error_type = failure.error_type
            self.telemetry.attempt_done(exchange, attempt, self._time())
            if failure is None or failure is exc:
                raise
            raise failure from exc
        return Opened(pool, connection, response, first, watch, attempt, request_id)


async def _send(
    connection: Connection,
    head: bytes,
    payload: Payload,
    head_method: bool,
    watch: Watch,
    now: Callable[[], float],
) -> None:
    """Send the request.

    A streamed body comes at the client's pace: while the proxy waits for a piece the
    first-byte clock stops (`client_turn`; the body's own idle limit applies), and it
    starts again with each piece, and last from the end of the body.
    """
    if not isinstance(payload, RequestBody):
        connection.send(head, payload, head_method=head_method)
        return
    connection.start_streaming(head)
    first_byte_s = watch.first_byte_s
    try:
        watch.client_turn = True
        while chunk := await payload.next_piece():
            watch.client_turn = False
            watch.deadline = now() + first_byte_s  # for the backend to take this piece
            connection.write_body(chunk)
            await connection.drain()
            watch.client_turn = True
    finally:
        watch.client_turn = False
    watch.deadline = now() + first_byte_s


def _is_request_id(text: str) -> bool:
    """Can the client's x-request-id be sent on as it is (printable ASCII, not too long)?"""
    return len(text) <= _MAX_REQUEST_ID_CHARS and text.isascii() and text.isprintable()


def _attempt_failure(
    exc: BaseException, watch: Watch | None, backend: Backend
) -> UpstreamError | None:
    """The upstream error an attempt's exception stands for; None when it stands for none
    (a cancellation from outside, or a fault of the proxy's own)."""
    if isinstance(exc, asyncio.CancelledError):
        if watch is not None and watch.expired_here():
            first_byte_s = backend.timeouts.first_byte_s
            return UpstreamTimeout(
                f"backend {backend.name} sent no response within {first_byte_s:g}s"
            )
        return None
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, ConnectFailed | BackendProtocolError | BackendCut):
        return _upstream_error(exc, backend)
    return None


def _upstream_error(exc: Exception, backend: Backend) -> UpstreamError:
    """The proxy error for a failed attempt before the first byte."""
    if isinstance(exc, ConnectTimeout):
        return UpstreamTimeout(str(exc))
    if isinstance(exc, ConnectFailed):
        return UpstreamUnreachable(str(exc))
    return UpstreamProtocolError(f"backend {backend.name} broke the protocol: {exc}")


async def _payload(
    body: RequestBody, plan: RoutePlan, variant: Variant, *, buffer: bool
) -> Payload:
    """What to send as the body to `variant`'s backend."""
    if not body.exists:
        return None
    model = plan.route.model_rewrite.get(variant)
    if model is not None:
        return _rewrite_model(await body.json(), model) or await body.read()
    declared = body.declared_length
    if buffer or body.is_read or declared is None or declared <= _SMALL_BODY_BYTES:
        return await body.read()
    await body.accept()
    return body


def _rewrite_model(parsed: Mapping[str, Any], model: str) -> bytes | None:
    """The JSON body with its "model" replaced; None when there is no JSON object to rewrite."""
    if not parsed:
        return None
    return json.dumps({**parsed, "model": model}, separators=(",", ":")).encode()


def error_response(
    error: ProxyError, request_id: str, variant: Variant | None = None
) -> web.Response:
    headers = {REQUEST_ID: request_id, "Content-Type": "application/json"}
    if variant is not None:
        headers[VARIANT] = variant.value
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(error.retry_after_s)
    return web.Response(status=error.status, body=error_body(error), headers=headers)
