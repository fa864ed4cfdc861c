"""Relaying a backend's response to the client as it arrives (SPEC §5, streaming).

Rules:
1. Nothing waits for the whole body: each chunk is written to the client as it
   arrives; only a body that arrived complete with its first read is sent in one piece.
2. The response head goes out with the first body bytes, so until then a failed
   attempt can still fall back to stable (see `proxy.forwarding`).
3. A backend stream cut mid-way (reset, bad framing, idle timeout, an event stream
   without its end marker) is never turned into a clean end: the client connection
   is closed without the terminating chunk, so the client sees a truncated answer.
4. A client that goes away stops the relay at once and closes the backend
   connection, so the model server stops generating.
5. A backend connection is returned to the pool only after a complete exchange.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from proxy.headers import response_headers
from proxy.idle import IdleWatchdog
from proxy.sse import StreamEnd, is_event_stream

__all__ = ["Opened", "RelayResult", "relay"]

log = logging.getLogger("proxy.relay")


@dataclass(frozen=True, slots=True)
class Opened:
    """A backend attempt that produced a response head and its first body bytes."""

    response: aiohttp.ClientResponse
    first: bytes


@dataclass(frozen=True, slots=True)
class RelayResult:
    """How a relay ended, for the caller's bookkeeping."""

    response: web.StreamResponse
    cut: str | None = None  # why the backend's stream ended early, None if it did not
    client_gone: bool = False


async def relay(
    request: web.BaseRequest,
    opened: Opened,
    *,
    variant: str,
    request_id: str,
    idle_s: float,
    extra_headers: dict[str, str] | None = None,
) -> RelayResult:
    """Send `opened` to the client. Returns the response for aiohttp to finish."""
    upstream = opened.response
    headers = response_headers(upstream.headers, variant=variant, request_id=request_id)
    if extra_headers:
        headers.update(extra_headers)
    end = StreamEnd() if is_event_stream(upstream.headers.get("content-type")) else None
    if end is not None:
        end.feed(opened.first)
    # A body that came whole with the first read goes out in one piece, unless it is an
    # event stream without its end: that one is relayed and cut like any other.
    if upstream.content.at_eof() and (end is None or end.complete):
        upstream.release()
        return RelayResult(
            web.Response(
                status=upstream.status, reason=upstream.reason, body=opened.first, headers=headers
            )
        )
    out = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    declared = upstream.headers.get("content-length")
    if declared is not None and declared.isdigit():
        out.content_length = int(declared)
    try:
        await out.prepare(request)
        cut = await _pump(out, upstream, opened.first, end, idle_s)
    except ConnectionError:
        # The client went away while we wrote to it.
        upstream.close()
        return RelayResult(out, client_gone=True)
    except BaseException:
        upstream.close()
        raise
    if cut is None and end is not None and not end.complete:
        cut = "stream ended without finish_reason or [DONE]"
    if cut is not None:
        upstream.close()
        _abort(request)
        return RelayResult(out, cut=cut)
    upstream.release()
    return RelayResult(out)


async def _pump(
    out: web.StreamResponse,
    upstream: aiohttp.ClientResponse,
    first: bytes,
    end: StreamEnd | None,
    idle_s: float,
) -> str | None:
    """Copy the body chunk by chunk (`end` has seen `first`); why it was cut, or None.

    A failed write to the client raises `ConnectionError` to the caller; a failed read
    from the backend is a cut, returned.
    """
    content = upstream.content
    await out.write(first)
    try:
        async with asyncio.timeout(None) as timeout:
            watchdog = IdleWatchdog(timeout, idle_s)
            try:
                while True:
                    try:
                        chunk = await content.readany()
                    except (aiohttp.ClientError, OSError) as exc:
                        return f"backend stream broke: {exc.__class__.__name__}"
                    if not chunk:
                        return None
                    watchdog.writing()
                    if end is not None:
                        end.feed(chunk)
                    await out.write(chunk)
                    watchdog.waiting()
            finally:
                watchdog.cancel()
    except TimeoutError:
        return f"backend silent for more than {idle_s:g}s"


def _abort(request: web.BaseRequest) -> None:
    """Close the client connection without ending the response, so it reads as truncated."""
    transport = request.transport
    if transport is not None:
        transport.close()
