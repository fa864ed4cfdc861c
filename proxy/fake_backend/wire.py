"""The fake backend's bytes: OpenAI JSON bodies and SSE events, encoded as little as possible.

Everything here is pure. A stream's per-request head (`id`, `created`, `model`) is encoded
once per request by `StreamEvents.for_request`, and each token's tail once per process,
so a token event costs one bytes concatenation: benchmarks drive ~25,000 events/s.

Token `i` reads `"tok{i} "`, so the content of `n` tokens is deterministic and a client
can check exactly what it received.
"""

from __future__ import annotations

import enum
import functools
import json
from dataclasses import dataclass

__all__ = [
    "DONE_EVENT",
    "GARBAGE_RESPONSE",
    "JSON_GARBAGE_BODY",
    "STREAM_ERROR_EVENT",
    "Kind",
    "StreamEvents",
    "completion_body",
    "completion_id",
    "completion_text",
    "error_body",
    "models_body",
    "token_text",
]

DONE_EVENT = b"data: [DONE]\n\n"
STREAM_ERROR_EVENT = (
    b'data: {"error":{"message":"fake backend: generation failed (x-fake-stream-error)",'
    b'"type":"server_error","code":null}}\n\n'
)
"""The event of `x-fake-stream-error`: the backend reports a failure mid-stream."""
GARBAGE_RESPONSE = b"\x00\x16\x03FAKE-BACKEND GARBAGE \xff\xfe this is not HTTP\r\n\r\n"
"""Written raw to the socket by `x-fake-garbage`: no status line any HTTP parser accepts."""
JSON_GARBAGE_BODY = b'{"id": "chatcmpl-fake", "choices": [{"message": {"content": "tok0'
"""The body of `x-fake-json-garbage`: JSON cut mid-string, so no JSON parser accepts it."""

_CACHED_TOKENS = 1024
_TOKEN_TAIL_END = b',"logprobs":null,"finish_reason":null}]}\n\n'


class Kind(enum.Enum):
    """The two response shapes: chat completions and legacy text completions."""

    CHAT = "chat"
    TEXT = "text"


_ID_PREFIX = {Kind.CHAT: "chatcmpl-fake-", Kind.TEXT: "cmpl-fake-"}
_BODY_OBJECT = {Kind.CHAT: "chat.completion", Kind.TEXT: "text_completion"}
_CHUNK_OBJECT = {Kind.CHAT: "chat.completion.chunk", Kind.TEXT: "text_completion"}


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def token_text(index: int) -> str:
    """The text of token `index`."""
    return f"tok{index} "


@functools.lru_cache(maxsize=128)
def completion_text(n_tokens: int) -> str:
    """The whole text of `n_tokens` tokens, as a stream of them concatenates to."""
    return "".join(map(token_text, range(n_tokens)))


def completion_id(kind: Kind, serial: int) -> str:
    """The response id of the `serial`-th generation of this kind."""
    return f"{_ID_PREFIX[kind]}{serial}"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_body(message: str, error_type: str, code: str) -> bytes:
    """An error body in OpenAI's shape, which SDKs turn into their typed exceptions."""
    return _dumps({"error": {"message": message, "type": error_type, "code": code}})


def models_body(model: str, created: int) -> bytes:
    """The `GET /v1/models` body: a list holding the one model."""
    entry = {"id": model, "object": "model", "created": created, "owned_by": "fake"}
    return _dumps({"object": "list", "data": [entry]})


def completion_body(
    kind: Kind,
    response_id: str,
    created: int,
    model: str,
    n_tokens: int,
    finish_reason: str,
    prompt_tokens: int,
) -> bytes:
    """A whole non-streaming completion of `n_tokens` tokens."""
    text = completion_text(n_tokens)
    choice: dict[str, object] = {"index": 0}
    if kind is Kind.CHAT:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice["logprobs"] = None
    choice["finish_reason"] = finish_reason
    return _dumps(
        {
            "id": response_id,
            "object": _BODY_OBJECT[kind],
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": _usage(prompt_tokens, n_tokens),
        }
    )


def _content_field(kind: Kind, text: str) -> bytes:
    """The choice field that carries `text`: a chat delta or a legacy `text`."""
    encoded = _dumps(text)
    if kind is Kind.CHAT:
        return b'"delta":{"content":' + encoded + b"}"
    return b'"text":' + encoded


def _token_tail(kind: Kind, index: int) -> bytes:
    return _content_field(kind, token_text(index)) + _TOKEN_TAIL_END


_TOKEN_TAILS = {
    kind: tuple(_token_tail(kind, index) for index in range(_CACHED_TOKENS)) for kind in Kind
}


@dataclass(frozen=True, slots=True)
class StreamEvents:
    """The SSE events of one streamed completion; `head` is every chunk's shared prefix."""

    kind: Kind
    response_id: str
    created: int
    model: str
    head: bytes
    tails: tuple[bytes, ...]

    @classmethod
    def for_request(cls, kind: Kind, response_id: str, created: int, model: str) -> StreamEvents:
        head = b"".join(
            (
                b'data: {"id":',
                _dumps(response_id),
                b',"object":',
                _dumps(_CHUNK_OBJECT[kind]),
                b',"created":',
                str(created).encode(),
                b',"model":',
                _dumps(model),
                b',"choices":[{"index":0,',
            )
        )
        return cls(kind, response_id, created, model, head, _TOKEN_TAILS[kind])

    def opening(self) -> list[bytes]:
        """The events before the first token: the assistant role for chat, none for text."""
        if self.kind is not Kind.CHAT:
            return []
        return [self.head + b'"delta":{"role":"assistant","content":""}' + _TOKEN_TAIL_END]

    def token(self, index: int) -> bytes:
        """The event carrying token `index`."""
        tails = self.tails
        if index < len(tails):
            return self.head + tails[index]
        return self.head + _token_tail(self.kind, index)

    def finish(self, finish_reason: str) -> bytes:
        """The event that ends the choice: no content, a `finish_reason`."""
        empty = b'"delta":{}' if self.kind is Kind.CHAT else b'"text":""'
        return (
            self.head
            + empty
            + b',"logprobs":null,"finish_reason":'
            + _dumps(finish_reason)
            + b"}]}\n\n"
        )

    def end(self, n_tokens: int, finish_reason: str, prompt_tokens: int | None) -> list[bytes]:
        """The events after the last token: the finish, the usage when `prompt_tokens` is
        given (`stream_options.include_usage`), then `[DONE]`."""
        events = [self.finish(finish_reason)]
        if prompt_tokens is not None:
            events.append(self.usage(prompt_tokens, n_tokens))
        events.append(DONE_EVENT)
        return events

    @staticmethod
    def failure(n_tokens: int) -> bytes:
        """The event by which the backend reports that the generation failed."""
        return STREAM_ERROR_EVENT

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The `stream_options.include_usage` event: no choices, the usage."""
        chunk = {
            "id": self.response_id,
            "object": _CHUNK_OBJECT[self.kind],
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": _usage(prompt_tokens, completion_tokens),
        }
        return b"data: " + _dumps(chunk) + b"\n\n"
