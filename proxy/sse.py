"""Telling a finished server-sent-events stream from a truncated one, without buffering it.

An OpenAI-style stream ends with a chunk that carries a `finish_reason` and then
`data: [DONE]`. A stream that stops before either was cut short (the backend died,
or was killed mid-generation), even if its HTTP framing ended cleanly. The scan
looks at each chunk as it passes plus a few bytes kept from the previous one, so a
marker split across two chunks is still seen, and it stops once the end is seen.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["StreamEnd", "is_event_stream"]

_DONE: Final = b"[DONE]"
_FINISHED: Final = re.compile(rb'"finish_reason"\s*:\s*"')
# Longer than any marker, so a marker split across two chunks is inside tail + head.
_OVERLAP: Final = 32


def is_event_stream(content_type: str | None) -> bool:
    return content_type is not None and content_type.startswith("text/event-stream")


class StreamEnd:
    """Fed every chunk of a stream; `complete` once the stream says it has ended."""

    __slots__ = ("_tail", "complete")

    def __init__(self) -> None:
        self._tail = b""
        self.complete = False

    def feed(self, chunk: bytes) -> None:
        if self.complete:
            return
        if _DONE in chunk or _FINISHED.search(chunk):
            self.complete = True
            return
        seam = self._tail + chunk[:_OVERLAP]
        if _DONE in seam or _FINISHED.search(seam):
            self.complete = True
            return
        self._tail = (
            (self._tail + chunk)[-_OVERLAP:] if len(chunk) < _OVERLAP else chunk[-_OVERLAP:]
        )
