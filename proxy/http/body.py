"""The client's request body: read at most once, never past the limit, parsed only on demand.

Rules:
1. A declared Content-Length over `max_body_bytes` is refused (413) before a byte of
   the body is read or forwarded; a body without a declared length is refused as
   soon as it passes the limit.
4. A body still arriving is read with `idle_s` (the config's `header_timeout`) as the
   longest silence allowed between two pieces of it: a client that stops sending
   mid-body is answered 408 instead of holding its request slot for ever. A body that
   is all there is read without a timer.
2. The body is parsed as JSON only when a routing decision or a model rewrite needs
   it; a body that is not JSON then gets 400. A JSON body that is not an object is
   treated as an object with no fields.
3. `Expect: 100-continue` is answered only once the proxy has decided to take the body.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

from proxy.errors import BadRequestBody, BodyTooLarge, RequestTimeout

__all__ = ["RequestBody"]

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_EMPTY: Final[Mapping[str, Any]] = {}


class RequestBody:
    """The body of one request, read lazily."""

    __slots__ = ("_idle_s", "_json", "_limit", "_raw", "_request")

    def __init__(self, request: web.BaseRequest, limit: int, idle_s: float) -> None:
        self._request = request
        self._limit = limit
        self._idle_s = idle_s
        self._raw: bytes | None = None
        self._json: Mapping[str, Any] | None = None
        declared = request.content_length
        if declared is not None and declared > limit:
            raise BodyTooLarge(f"request body of {declared} bytes is over the limit of {limit}")

    @property
    def declared_length(self) -> int | None:
        return self._request.content_length

    @property
    def exists(self) -> bool:
        return self._request.body_exists

    @property
    def raw(self) -> bytes | None:
        """The body's bytes when they were read, else None."""
        return self._raw

    @property
    def is_parsed(self) -> bool:
        return self._json is not None

    @property
    def is_read(self) -> bool:
        return self._raw is not None

    async def accept(self) -> None:
        """Tell a client waiting on `Expect: 100-continue` to send its body: once, before
        the body is first read or streamed."""
        expect = self._request.headers.get("expect")
        if expect is not None and expect.lower() == "100-continue":
            await self._request.writer.write(_CONTINUE)

    async def read(self) -> bytes:
        """The whole body, read once; `BodyTooLarge` past the limit."""
        if self._raw is not None:
            return self._raw
        if not self._request.body_exists:
            self._raw = b""
            return self._raw
        await self.accept()
        content = self._request.content
        if content.is_eof():
            raw = await content.read()  # all of it is here: no wait, no timer
            if len(raw) > self._limit:
                raise BodyTooLarge(f"request body is over the limit of {self._limit} bytes")
            self._raw = raw
            return raw
        chunks: list[bytes] = []
        size = 0
        while chunk := await self.next_piece():
            size += len(chunk)
            if size > self._limit:
                raise BodyTooLarge(f"request body is over the limit of {self._limit} bytes")
            chunks.append(chunk)
        self._raw = b"".join(chunks)
        return self._raw

    async def next_piece(self) -> bytes:
        """The next piece of a body still arriving (b"" at its end); `RequestTimeout` after
        `idle_s` of silence."""
        content = self._request.content
        if content.is_eof():
            return await content.readany()  # the rest is here: no wait, no timer
        try:
            async with asyncio.timeout(self._idle_s):
                return await content.readany()
        except TimeoutError as exc:
            raise RequestTimeout(
                f"the request body stopped arriving for {self._idle_s:g}s"
            ) from exc

    async def json(self) -> Mapping[str, Any]:
        """The body as a JSON object; `BadRequestBody` when it is not JSON."""
        if self._json is not None:
            return self._json
        raw = await self.read()
        encoding = self._request.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise BadRequestBody(
                f"this route reads the request body; Content-Encoding {encoding} is not supported"
            )
        if not raw:
            self._json = _EMPTY
            return self._json
        try:
            parsed = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequestBody(f"request body is not valid JSON: {exc}") from exc
        self._json = parsed if isinstance(parsed, dict) else _EMPTY
        return self._json
