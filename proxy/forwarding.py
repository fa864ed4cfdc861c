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
from yarl import URL

from proxy.body import RequestBody
from proxy.config.model import Variant
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
from proxy.headers import REQUEST_ID, VARIANT, request_headers
from proxy.keys import NEED_BODY, is_trusted
from proxy.relay import Opened, relay
from proxy.routing import RoutePlan, RouteTable, assign, match_route
from proxy.upstreams import Upstream, Upstreams

__all__ = ["FALLBACK", "Forwarder", "error_response"]

log = logging.getLogger("proxy.forwarding")

FALLBACK: Final = "x-canary-fallback"
# Bodies up to this size are read rather than streamed to the backend.
_SMALL_BODY_BYTES: Final = 64 * 1024

Payload = bytes | aiohttp.StreamReader | None


class Forwarder:
    """The request handler of the public port. `table` is swapped whole to change routing."""

    def __init__(self, table: RouteTable, upstreams: Upstreams) -> None:
        self.table = table
        self.upstreams = upstreams
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
            return await self._forward(request, table, request_id)
        except ProxyError as error:
            return error_response(error, request_id)
        finally:
            self.in_flight -= 1

    async def _forward(
        self, request: web.BaseRequest, table: RouteTable, request_id: str
    ) -> web.StreamResponse:
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
        may_fall_back = variant is Variant.CANARY and plan.route.fallback_to_stable
        send = _Send(request, request_id, is_trusted(request.remote, config.trusted_proxies))
        try:
            opened = await send.attempt(
                self.upstreams[plan.route.backend_of(variant)],
                await _payload(body, plan, variant, buffer=may_fall_back),
                fail_on_status=may_fall_back,
            )
        except UpstreamError as error:
            if not may_fall_back:
                return error_response(error, request_id, variant)
            log.debug(
                "route %s: canary failed before its first byte (%s); falling back", plan.name, error
            )
            return await self._fall_back(send, body, plan, error)
        return await self._relay(send, plan, variant, opened)

    async def _fall_back(
        self, send: _Send, body: RequestBody, plan: RoutePlan, canary_error: UpstreamError
    ) -> web.StreamResponse:
        stable = Variant.STABLE
        try:
            opened = await send.attempt(
                self.upstreams[plan.route.stable],
                await _payload(body, plan, stable, buffer=True),
                fail_on_status=False,
            )
        except UpstreamError as error:
            return error_response(error, send.request_id, stable)
        return await self._relay(send, plan, stable, opened, {FALLBACK: canary_error.error_type})

    async def _relay(
        self,
        send: _Send,
        plan: RoutePlan,
        variant: Variant,
        opened: Opened,
        extra_headers: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        backend = self.upstreams[plan.route.backend_of(variant)].backend
        result = await relay(
            send.request,
            opened,
            variant=variant.value,
            request_id=send.request_id,
            idle_s=backend.timeouts.idle_s,
            extra_headers=extra_headers,
        )
        if result.cut is not None:
            log.debug(
                "route %s: %s stream from %s cut: %s", plan.name, variant, backend.name, result.cut
            )
        return result.response


class _Send:
    """Sends one client request to backends; one per request, shared by its attempts."""

    __slots__ = ("peer_trusted", "request", "request_id")

    def __init__(self, request: web.BaseRequest, request_id: str, peer_trusted: bool) -> None:
        self.request = request
        self.request_id = request_id
        self.peer_trusted = peer_trusted

    async def attempt(
        self, upstream: Upstream, payload: Payload, *, fail_on_status: bool
    ) -> Opened:
        """Send to `upstream`; the response head and first body bytes, or an UpstreamError."""
        request = self.request
        backend = upstream.backend
        headers = request_headers(
            request.headers,
            peer=request.remote,
            peer_trusted=self.peer_trusted,
            scheme=request.scheme,
            api_key=backend.api_key,
            request_id=self.request_id,
        )
        if isinstance(payload, aiohttp.StreamReader):
            headers["Content-Length"] = str(request.content_length)
        url = URL(upstream.url_for(request.raw_path), encoded=True)
        try:
            async with asyncio.timeout(backend.timeouts.first_byte_s):
                response = await upstream.session.request(
                    request.method, url, headers=headers, data=payload, allow_redirects=False
                )
                try:
                    if fail_on_status and (response.status >= 500 or response.status == 429):
                        raise UpstreamStatus(response.status)
                    first = await response.content.readany()
                except BaseException:
                    response.close()
                    raise
        except aiohttp.ConnectionTimeoutError as exc:
            connect_s = backend.timeouts.connect_s
            raise UpstreamTimeout(
                f"could not connect to backend {backend.name} within {connect_s:g}s"
            ) from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"backend {backend.name} sent no response within {backend.timeouts.first_byte_s:g}s"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnreachable(
                f"cannot connect to backend {backend.name}: {exc.strerror}"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamProtocolError(
                f"backend {backend.name} broke the protocol: {exc.__class__.__name__}"
            ) from exc
        return Opened(response, first)


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
