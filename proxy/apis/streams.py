"""Which LLM API a request speaks, and how each one's stream ends. Pure; no I/O.

The API is told by the request's path (`api_of`), the way each server names its
endpoints; a stream's end is judged on its last bytes (`stream_end`), which the relay
keeps by reference (its last three chunks), once, when the backend's body has ended
cleanly in HTTP:

- OpenAI chat and completions (`.../chat/completions`, `.../completions`): complete at
  `data: [DONE]` or an event with a `finish_reason`; failed at a `data: {"error": ...}`.
- OpenAI Responses (`.../responses`): complete at `response.completed` or
  `response.incomplete`; failed at `response.failed` or an `error` event.
- Anthropic Messages (`.../messages`): complete at `message_stop`; failed at an `error`
  event.
- llama.cpp (`/completion`, `/infill`): complete at an event with `"stop": true`; failed
  at an event with an `error`.
- TGI (`/generate_stream`): complete at the event with `details` (a `finish_reason`);
  failed at an event with an `error`.
- Ollama, NDJSON (`/api/chat`, `/api/generate`): complete at a line with `"done": true`;
  failed at a line with an `error`.
- Anything else: a clean end of the body is complete.

A stream that ends cleanly in HTTP without its API's end is cut (the backend died
mid-generation behind a server that closed the body anyway); one that reports a
failure is failed: the client gets the backend's error event and a clean end, and the
attempt counts as an error of its variant. A complete stream is never an error.

JSON escapes quotes inside strings, so text the model writes (`"type":"message_stop"`)
never looks like the API's own keys to these patterns.
"""

from __future__ import annotations

import enum
import functools
import re
from typing import Final

__all__ = ["Api", "StreamEnd", "api_of", "stream_end"]


class Api(enum.Enum):
    """The wire protocol of one request, as its path names it."""

    OPENAI = "openai"
    RESPONSES = "responses"
    ANTHROPIC = "anthropic"
    LLAMACPP = "llamacpp"
    TGI = "tgi"
    OLLAMA = "ollama"
    UNKNOWN = "unknown"


class StreamEnd(enum.Enum):
    """How a stream that ended cleanly in HTTP ended in its API."""

    COMPLETE = "complete"
    CUT = "cut"  # no end marker: cut short
    FAILED = "failed"  # the backend reported a failure in the stream


# Suffixes, most specific first: `/chat/completions` before `/completions`.
_SUFFIXES: Final = (
    ("/chat/completions", Api.OPENAI),
    ("/completions", Api.OPENAI),
    ("/responses", Api.RESPONSES),
    ("/messages", Api.ANTHROPIC),
    ("/generate_stream", Api.TGI),
    ("/api/chat", Api.OLLAMA),
    ("/api/generate", Api.OLLAMA),
    ("/completion", Api.LLAMACPP),
    ("/infill", Api.LLAMACPP),
)


@functools.lru_cache(maxsize=512)  # a proxy sees few paths, again and again
def api_of(path: str) -> Api:
    """The API a request path belongs to (a query string is not part of `path`)."""
    path = path.rstrip("/")
    for suffix, api in _SUFFIXES:
        if path.endswith(suffix):
            return api
    return Api.UNKNOWN


def _key(name: str, value: str) -> re.Pattern[bytes]:
    return re.compile(rb'"%s"\s*:\s*%s' % (name.encode(), value.encode()))


_ERROR_KEY: Final = _key("error", "")
_ERROR_EVENT: Final = re.compile(rb'(?:^|\n)event:\s*error\s*\n|"type"\s*:\s*"error"')
_COMPLETE: Final[dict[Api, tuple[re.Pattern[bytes], ...]]] = {
    Api.OPENAI: (re.compile(rb"\[DONE\]"), _key("finish_reason", '"')),
    Api.RESPONSES: (_key("type", '"response\\.(?:completed|incomplete)"'),),
    Api.ANTHROPIC: (_key("type", '"message_stop"'),),
    Api.LLAMACPP: (_key("stop", "true"),),
    Api.TGI: (_key("finish_reason", '"'),),
    Api.OLLAMA: (_key("done", "true"),),
}
_FAILED: Final[dict[Api, tuple[re.Pattern[bytes], ...]]] = {
    Api.OPENAI: (re.compile(rb'(?:^|\n)data:\s*\{\s*"error"\s*:'),),
    Api.RESPONSES: (_key("type", '"response\\.failed"'), _ERROR_EVENT),
    Api.ANTHROPIC: (_ERROR_EVENT,),
    Api.LLAMACPP: (_ERROR_KEY,),
    Api.TGI: (_ERROR_KEY,),
    Api.OLLAMA: (_ERROR_KEY,),
}


def stream_end(api: Api, tail: bytes) -> StreamEnd:
    """How a stream of `api` whose last bytes are `tail` ended (see the table above)."""
    complete = _COMPLETE.get(api)
    if complete is None:
        return StreamEnd.COMPLETE  # an API without a known end: a clean end is its end
    # A failure first: some servers (vLLM) still end a failed stream with `[DONE]`.
    for pattern in _FAILED[api]:
        if pattern.search(tail) is not None:
            return StreamEnd.FAILED
    for pattern in complete:
        if pattern.search(tail) is not None:
            return StreamEnd.COMPLETE
    return StreamEnd.CUT
