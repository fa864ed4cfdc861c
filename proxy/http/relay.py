"""Relaying a backend's response to the client as it arrives (SPEC §5, streaming).

Rules:
1. Nothing waits for the whole body: each chunk is written to the client as it
   arrives; only a body that arrived complete with its first read is sent in one piece.
2. The response head goes out with the first body bytes, so until then a failed
   attempt can still fall back to stable (see `proxy.http.forwarding`).
3. A backend stream cut mid-way (reset, bad framing, idle timeout, a stream without
   its API's end, `proxy.apis.streams`) is never turned into a clean end: the client
   connection is closed without the terminating chunk, so the client sees a truncated
   answer. A stream that reports its own failure (an error event) ends as the backend
   ended it, and counts as an error (`stream_error`); a complete one never does. A
   stream is an event stream or NDJSON; its API is told by the request's path.
4. A client that goes away stops the relay at once and closes the backend
   connection, so the model server stops generating.
5. A backend connection is returned to the pool only after a complete exchange.
6. Answers that passed HTTP but are broken still count as errors of their variant:
   bytes after the declared end (`protocol_error`; the client gets what was declared,
   as nginx does) and, on an OpenAI endpoint that answers JSON (completions,
   embeddings), an uncompressed 200 that is not a JSON object (`bad_response`; it
   passes untouched).
"""

from __future__ import annotations

import asyncio
from typing import Final

from aiohttp import web

from proxy.apis.streams import StreamEnd, api_of, stream_end
from proxy.http.deadlines import Deadlines, Watch
from proxy.http.headers import response_headers
from proxy.http.http1 import BackendCut, Connection, Head
from proxy.http.pool import BackendPool
from proxy.http.shadow import ShadowRequest
from proxy.telemetry.recorder import Attempt

__all__ = ["Opened", "relay"]

_JSON_PATHS: Final = ("/completions", "/embeddings")
_JSON_ENDS: Final = (b"}", b"}\n", b"}\r\n", b"} ", b"}\n\n")
_STREAM_TYPES: Final = (b"text/event-stream", b"application/x-ndjson")


class Opened:
    """A backend attempt that produced a response head and its first body bytes.

    It carries what the relay needs; the relay records on its `attempt` how the answer
    ended, and on `cut` why it was cut short, if it was.
    """

    __slots__ = (
        "attempt",
        "connection",
        "cut",
        "extra_headers",
        "first",
        "head",
        "pool",
        "request_id",
        "shadow",
        "watch",
    )

    def __init__(
        self,
        pool: BackendPool,
        connection: Connection,
        head: Head,
        first: bytes,
        watch: Watch,
        attempt: Attempt,
        request_id: str,
    ) -> None:
        self.pool = pool
        self.connection = connection
        self.head = head
        self.first = first
        self.watch = watch  # still watched: the relay turns it into the idle limit
        self.attempt = attempt
        self.request_id = request_id
        self.extra_headers: dict[str, str] | None = None
        self.cut: str | None = None
        self.shadow: ShadowRequest | None = None  # to send to the canary once relayed


async def relay(
    request: web.BaseRequest, opened: Opened, deadlines: Deadlines
) -> web.StreamResponse:
    """Send `opened` to the client; the response for aiohttp to finish."""
    connection = opened.connection
    pool = opened.pool
    head = opened.head
    watch = opened.watch
    attempt = opened.attempt
    shadow = opened.shadow  # None unless this answer is half of a shadow pair
    headers = response_headers(
        head.headers,
        variant=attempt.variant,
        request_id=opened.request_id,
        extra=opened.extra_headers,
    )
    sse = head.content_type is not None and head.content_type.startswith(_STREAM_TYPES)
    attempt.event_stream = sse
    first = opened.first
    reason = head.reason.decode("latin-1")
    # A body that came whole with the first read goes out in one piece, unless it is a
    # stream without its end: that one is relayed and cut like any other.
    if connection.at_eof() and (not sse or _stream_ended(request, first, attempt)):
        deadlines.unwatch(watch)
        _judge_end(request, head, sse, connection, first, first, attempt)
        pool.release(connection)
        attempt.head = attempt.tail = first
        if shadow is not None:
            shadow.keep(first)
        return web.Response(status=head.status, reason=reason, body=first, headers=headers)
    attempt.head = first
    if shadow is not None:
        shadow.keep(first)
    out = web.StreamResponse(status=head.status, reason=reason, headers=headers)
    declared = head.content_length
    if declared is not None and declared.isdigit():
        out.content_length = int(declared)
    idle_s = pool.backend.timeouts.idle_s
    watch.idle(idle_s, deadlines.now())
    # The last three chunks, kept by reference: the end markers of an event stream are
    # in its last few hundred bytes, so they are looked for once, at the end.
    earlier, before, last = b"", b"", first
    try:
        await out.prepare(request)
        watch.busy = True
        await out.write(first)
        watch.busy = False
        while True:
            try:
                chunk = await connection.read()
            except BackendCut as exc:
                opened.cut = str(exc)
                attempt.error_type = "stream_cut"
                break
            if not chunk:
                attempt.tail = earlier + before + last
                if sse and not _stream_ended(request, attempt.tail, attempt):
                    opened.cut = "stream ended without its end event"
                    attempt.error_type = "stream_cut"
                break
            watch.progress += 1
            watch.busy = True
            await out.write(chunk)
            watch.busy = False
            earlier, before, last = before, last, chunk
            if shadow is not None:
                shadow.keep(chunk)
    except asyncio.CancelledError:
        if not watch.expired_here():
            pool.discard(connection)
            raise
        opened.cut = f"backend silent for more than {idle_s:g}s"
        attempt.error_type = "idle_timeout"
    except ConnectionError:
        # The client went away while we wrote to it.
        pool.discard(connection)
        attempt.cancelled = True
        return out
    except BaseException:
        pool.discard(connection)
        raise
    finally:
        deadlines.unwatch(watch)
    if opened.cut is not None:
        pool.discard(connection)
        _abort(request)
    else:
        _judge_end(request, head, sse, connection, first, last, attempt)
        pool.release(connection)
    return out


def _stream_ended(request: web.BaseRequest, tail: bytes, attempt: Attempt) -> bool:
    """Did a stream that ended cleanly in HTTP end in its API (Rule 3)? A failure it
    reported is an end, counted as an error."""
    end = stream_end(api_of(request.path), tail)
    if end is StreamEnd.FAILED:
        attempt.error_type = "stream_error"
    return end is not StreamEnd.CUT


def _judge_end(
    request: web.BaseRequest,
    head: Head,
    sse: bool,
    connection: Connection,
    first: bytes,
    last: bytes,
    attempt: Attempt,
) -> None:
    """Rule 6: the error an answer that ended cleanly in HTTP still counts as, if any."""
    if connection.overran:
        attempt.error_type = "protocol_error"
    elif (
        head.status == 200
        and not sse
        and request.path.endswith(_JSON_PATHS)
        and request.method != "HEAD"
        and head.content_encoding is None  # a compressed body is judged by no one here
        and not (first.lstrip()[:1] == b"{" and last.endswith(_JSON_ENDS))
    ):
        attempt.error_type = "bad_response"


def _abort(request: web.BaseRequest) -> None:
    """Close the client connection without ending the response, so it reads as truncated."""
    transport = request.transport
    # The client's connection is there: had it gone, its handler would have been
    # cancelled (`handler_cancellation`) at its last await, before this point.
    assert transport is not None
    transport.close()
