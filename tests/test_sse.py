"""Telling a finished event stream from a cut one."""

from __future__ import annotations

import pytest

from proxy.sse import StreamEnd, is_event_stream

CHUNK = b'data: {"choices":[{"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
FINISH = b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
DONE = b"data: [DONE]\n\n"


def feed(*chunks: bytes) -> bool:
    end = StreamEnd()
    for chunk in chunks:
        end.feed(chunk)
    return end.complete


def test_a_stream_of_content_is_not_complete() -> None:
    assert not feed(CHUNK, CHUNK, CHUNK)


@pytest.mark.parametrize("last", [FINISH, DONE, b'data: {"finish_reason": "length"}\n\n'])
def test_finish_reason_or_done_completes_it(last: bytes) -> None:
    assert feed(CHUNK, last)


def test_null_finish_reason_does_not_complete_it() -> None:
    assert not feed(b'data: {"finish_reason": null}\n\n')


@pytest.mark.parametrize("split", range(1, len(DONE)))
def test_a_marker_split_across_chunks_is_seen(split: int) -> None:
    assert feed(CHUNK, DONE[:split], DONE[split:])


@pytest.mark.parametrize("split", range(1, len(FINISH)))
def test_finish_reason_split_across_chunks_is_seen(split: int) -> None:
    assert feed(CHUNK, FINISH[:split], FINISH[split:])


def test_marker_split_across_many_tiny_chunks_is_seen() -> None:
    assert feed(CHUNK, *(bytes([b]) for b in DONE))


def test_is_event_stream() -> None:
    assert is_event_stream("text/event-stream; charset=utf-8")
    assert not is_event_stream("application/json")
    assert not is_event_stream(None)
