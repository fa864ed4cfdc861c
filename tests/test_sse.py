"""Telling a finished event stream from a cut one, by its last bytes."""

from __future__ import annotations

import pytest

from proxy.sse import is_event_stream, stream_is_complete

CHUNK = b'data: {"choices":[{"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
FINISH = b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":9}}\n\n'
DONE = b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("tail", "complete"),
    [
        (CHUNK + CHUNK, False),
        (CHUNK + FINISH, True),
        (FINISH + USAGE, True),
        (CHUNK + DONE, True),
        (b'data: {"finish_reason": "length"}\n\n', True),  # json.dumps spacing
        (b'data: {"finish_reason": null}\n\n', False),
        (b"", False),
    ],
)
def test_stream_is_complete(tail: bytes, complete: bool) -> None:
    assert stream_is_complete(tail) is complete


def test_is_event_stream() -> None:
    assert is_event_stream("text/event-stream; charset=utf-8")
    assert not is_event_stream("application/json")
    assert not is_event_stream(None)
