"""Telling a finished server-sent-events stream from a truncated one, without buffering it.

An OpenAI-style stream ends with an event that carries a `finish_reason`, perhaps a
usage event, and then `data: [DONE]`. A stream that stops before these was cut short
(the backend died, or was killed mid-generation), even if its HTTP framing ended
cleanly. The end markers sit in the last few hundred bytes of a stream, so the relay
keeps references to its last two chunks (no copy, no scan per chunk) and asks once,
at the end, whether their bytes hold the end.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["is_event_stream", "stream_is_complete"]

_DONE: Final = b"[DONE]"
_FINISHED: Final = re.compile(rb'"finish_reason"\s*:\s*"')


def is_event_stream(content_type: str | None) -> bool:
    return content_type is not None and content_type.startswith("text/event-stream")


def stream_is_complete(tail: bytes) -> bool:
    """Do the last bytes of an event stream show that it ended (`[DONE]` or a finish_reason)?"""
    return _DONE in tail or _FINISHED.search(tail) is not None
