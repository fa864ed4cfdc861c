"""An answer's text, in each API's words: what a shadow pair's answers are compared on. Pure.

Rules:
1. A whole answer is one JSON object; a stream is SSE `data:` lines or NDJSON lines,
   one JSON event each, whose text pieces are joined in order. The API is the
   request's (`proxy.apis.streams.api_of`).
2. The text is the first choice's (OpenAI), the output text (Responses), the text
   blocks (Anthropic), the message or response (Ollama), `content` (llama.cpp) or the
   generated text (TGI). An answer with no text (an embedding, an error, a tool call
   alone) has none: None.
3. A body cut at the capture bound still gives the text of its whole events; a whole
   answer cut short gives none.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from proxy.apis.streams import Api

__all__ = ["answer_text"]


def answer_text(body: bytes, api: Api) -> str | None:
    """The text of an answer (rule 1), None when it has none or cannot be read."""
    start = body.lstrip()[:1]
    if start == b"{":
        try:
            whole = json.loads(body)
        except ValueError:
            whole = None  # NDJSON (several objects), or a whole answer cut short
        if isinstance(whole, dict):
            pieces = list(_pieces(whole, api))
            return "".join(pieces) if pieces else None
    if start == b"[" and api is Api.TGI:
        try:
            listed = json.loads(body)
        except ValueError:
            return None
        first = listed[0] if isinstance(listed, list) and listed else None
        return _string(first.get("generated_text")) if isinstance(first, dict) else None
    found: list[str] = []
    any_event = False
    for line in body.splitlines():
        line = line.strip()
        if line.startswith(b"data:"):
            line = line[5:].strip()
        if not line.startswith(b"{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue  # the last event, cut at the bound
        if isinstance(event, dict):
            any_event = True
            found.extend(_pieces(event, api))
    return "".join(found) if any_event and found else None


def _pieces(event: dict[str, Any], api: Api) -> Iterator[str]:
    """The text pieces of one answer or stream event (rule 2)."""
    if api is Api.OPENAI:
        choices = event.get("choices")
        first = choices[0] if isinstance(choices, list) and choices else None
        if isinstance(first, dict):
            for holder in (first.get("message"), first.get("delta")):
                if isinstance(holder, dict):
                    yield from _maybe(holder.get("content"))
            yield from _maybe(first.get("text"))
    elif api is Api.RESPONSES:
        kind = event.get("type")
        if kind == "response.output_text.delta":
            yield from _maybe(event.get("delta"))
        elif kind is None or kind == "response":
            for item in _list(event.get("output")):
                for part in _list(item.get("content") if isinstance(item, dict) else None):
                    if isinstance(part, dict) and part.get("type") == "output_text":
                        yield from _maybe(part.get("text"))
    elif api is Api.ANTHROPIC:
        delta = event.get("delta")
        if event.get("type") == "content_block_delta" and isinstance(delta, dict):
            yield from _maybe(delta.get("text"))
        for block in _list(event.get("content")):
            if isinstance(block, dict) and block.get("type") == "text":
                yield from _maybe(block.get("text"))
    elif api is Api.OLLAMA:
        message = event.get("message")
        if isinstance(message, dict):
            yield from _maybe(message.get("content"))
        yield from _maybe(event.get("response"))
    elif api is Api.LLAMACPP:
        yield from _maybe(event.get("content"))
    elif api is Api.TGI:
        token = event.get("token")
        if isinstance(token, dict) and not token.get("special"):
            yield from _maybe(token.get("text"))
        elif event.get("generated_text") is not None and token is None:
            yield from _maybe(event.get("generated_text"))


def _maybe(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _string(value: object) -> str | None:
    return value if isinstance(value, str) else None
