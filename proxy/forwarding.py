"""One client request, end to end: route it, assign a variant, send it, relay the answer.

Rules:
1. A request reads the current `RouteTable` once and finishes on it, whatever is
   swapped in meanwhile.
2. The body is read only when a decision or a model rewrite needs it, when a
   fallback may have to send it again, or when it is small (reading a small body is
   cheaper than streaming it); otherwise it streams to the backend unread.
3. An attempt succeeds when the backend sent its response head and first body bytes
   within `first_byte`. Before that point a canary attempt that failed (connect
   error, timeout, reset, a 5xx or 429 status) is retried once on stable when the
   route says `fallback_to_stable`; the response then says `x-canary-variant: stable`
   and `x-canary-fallback: <why the canary failed>`.
4. Errors the proxy makes are answered in OpenAI's error shape with the status the
   error carries (`proxy.errors`); a backend's own 4xx/5xx passes through untouched.
5. Library exceptions become `proxy.errors` here, at one boundary, with `from exc`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
from collections.abc import Mapping
from typing import Any, Final

import aiohttp
from aiohttp import web

from proxy.body import RequestBody
from proxy.config.model import Backend, Variant
from proxy.deadlines import Deadlines
from proxy.errors import (
    NoRoute,
    Overloaded,
    ProxyError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnreachable,
    error_body,
)
from proxy.headers import REQUEST_ID, VARIANT, request_head
from proxy.http1 import BackendClosed, BackendCut, BackendProtocolError, Connection
from proxy.keys import NEED_BODY, is_trusted
from proxy.pool import ConnectFailed, ConnectTimeout
from proxy.relay import Opened, relay
from proxy.routing import RoutePlan, RouteTable, assign, match_route
from proxy.upstreams import Upstreams

__all__ = ["FALLBACK", "Forwarder", "error_response"]

log = logging.getLogger("proxy.forwarding")

FALLBACK: Final = "x-canary-fallback"
# Bodies up to this size are read rather than streamed to the backend.
_SMALL_BODY_BYTES: Final = 64 * 1024

Payload = bytes | aiohttp.StreamReader | None  # a whole body, one to stream on, or none


class Forwarder:
    """The request handler of the public port. `table` is swapped whole to change routing."""

    def __init__(self, table: RouteTable, upstreams: Upstreams, deadlines: Deadlines) -> None:
        self.table = table
        self.upstreams = upstreams
        self.deadlines = deadlines
        self.in_flight = 0
        self._id_prefix = os.urandom(4).hex()
        self._id_counter = itertools.count(1)

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        table = self.table
        request_id = (
            request.headers.get(REQUEST_ID) or f"{self._id_prefix}-{next(self._id_counter):x}"
        )
        if self.in_flight >= table.config.limits.max_concurrency:
            return error_response(Overloaded("too many requests in flight"), request_id)
        self.in_flight += 1
        try:
            # Opening and relaying are two calls, not one inside the other, so that a
            # long stream keeps only this frame and the relay's alive.
            opened = await self._open(request, table, request_id)
            if isinstance(opened, web.StreamResponse):
                return opened
            response = await relay(request, opened, self.deadlines)
            if opened.cut is not None:
                log.debug(
                    "route %s: %s stream from %s cut: %s",
                    opened.route_name,
                    opened.variant,
                    opened.pool.backend.name,
                    opened.cut,
                )
            return response
        except ProxyError as error:
            return error_response(error, request_id)
        finally:
            self.in_flight -= 1

    async def _open(
        self, request: web.BaseRequest, table: RouteTable, request_id: str
    ) -> Opened | web.Response:
        """Route, assign and send: the first bytes of an answer, or an error response."""
        config = table.config
        body = RequestBody(request, config.limits.max_body_bytes)
        plan = match_route(table, request.path, None)
        if plan is NEED_BODY:
            plan = match_route(table, request.path, await body.json())
        if plan is None:
            raise NoRoute(f"no route for {request.method} {request.path}")
        parsed = await body.json() if body.is_parsed else None
        assignment = assign(plan, request, parsed, config.trusted_proxies)
        if assignment is NEED_BODY:
            assignment = assign(plan, request, await body.json(), config.trusted_proxies)
        variant = assignment.variant
        route = plan.route
        may_fall_back = variant is Variant.CANARY and route.fallback_to_stable
        peer_trusted = is_trusted(request.remote, config.trusted_proxies)
        try:
            return await self._attempt(
                request,
                request_id,
                peer_trusted,
                plan,
                variant,
                await _payload(body, plan, variant, buffer=may_fall_back),
                fail_on_status=may_fall_back,
            )
        except UpstreamError as error:
            if not may_fall_back:
                return error_response(error, request_id, variant)
            log.debug("route %s: canary failed before its first byte (%s)", route.name, error)
            canary_error = error
        stable = Variant.STABLE
        try:
            opened = await self._attempt(
                request,
                request_id,
                peer_trusted,
                plan,
                stable,
                await _payload(body, plan, stable, buffer=True),
                fail_on_status=False,
            )
        except UpstreamError as error:
            return error_response(error, request_id, stable)
        opened.extra_headers = {FALLBACK: canary_error.error_type}
        return opened

    async def _attempt(
        self,
        request: web.BaseRequest,
        request_id: str,
        peer_trusted: bool,
        plan: RoutePlan,
        variant: Variant,
        payload: Payload,
        *,
        fail_on_status: bool,
    ) -> Opened:
        """Send to `variant`'s backend: its response head and first body bytes.

        Raises:
            UpstreamError: the attempt failed before the first byte.
        """
        pool = self.upstreams[plan.route.backend_of(variant)]
        backend = pool.backend
        streamed = isinstance(payload, aiohttp.StreamReader)
        if isinstance(payload, aiohttp.StreamReader):
            content_length = request.content_length
        else:
            content_length = None if payload is None else len(payload)
        head = request_head(
            request.method,
            (backend.base_path + request.raw_path).encode("utf-8", "surrogateescape"),
            request.raw_headers,
            host=pool.host_header,
            peer=request.remote,
            peer_trusted=peer_trusted,
            scheme=request.scheme,
            api_key=backend.api_key,
            request_id=request_id,
            content_length=content_length,
        )
        deadlines = self.deadlines
        watch = deadlines.watch(backend.timeouts.first_byte_s)
        connection: Connection | None = None
        try:
            for retry in (False, True):
                connection = await pool.acquire(fresh=retry)
                try:
                    await _send(connection, head, payload, request.method == "HEAD")
                    response = await connection.head()
                    break
                except BackendClosed as exc:
                    # A kept-alive connection the backend closed just as it was reused
                    # saw nothing of the request: one retry on a new connection is safe.
                    if retry or streamed or not exc.before_any_byte or connection.exchanges == 0:
                        raise
                    pool.discard(connection)
            assert connection is not None
            if fail_on_status and (response.status >= 500 or response.status == 429):
                raise UpstreamStatus(response.status)
            first = await connection.read()
        except BaseException as exc:
            deadlines.unwatch(watch)
            if connection is not None:
                pool.discard(connection)
            if isinstance(exc, asyncio.CancelledError):
                if watch.expired_here():
                    first_byte_s = backend.timeouts.first_byte_s
                    raise UpstreamTimeout(
                        f"backend {backend.name} sent no response within {first_byte_s:g}s"
                    ) from None
                raise
            if isinstance(exc, ConnectFailed | BackendProtocolError | BackendCut):
                raise _upstream_error(exc, backend) from exc
            raise
        return Opened(pool, connection, response, first, watch, variant, request_id, plan.name)


async def _send(connection: Connection, head: bytes, payload: Payload, head_method: bool) -> None:
    if not isinstance(payload, aiohttp.StreamReader):
        connection.send(head, payload, head_method=head_method)
        return
    connection.start_streaming(head)
    while chunk := await payload.readany():
        connection.write_body(chunk)
        await connection.drain()


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
    return body.content


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
