"""What the proxy learns of a backend's answer from its last bytes. Pure.

An OpenAI-style stream ends with an event that carries a `finish_reason`, perhaps a
usage event, and then `data: [DONE]`; a JSON answer ends with its `usage`. A stream
that stops before its end markers was cut short (the backend died, or was killed
mid-generation), even if its HTTP framing ended cleanly. All of this sits in the last
few hundred bytes, so the relay keeps references to its last three chunks (no copy,
no scan per chunk) and reads them once, at the end, with a few regular expressions
rather than a JSON parse.

JSON escapes quotes inside strings, so `"model":"x"` written by the model inside its
answer never looks like the answer's own `"model"` key to these patterns.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["AnswerFacts", "read_facts", "request_model"]

_FINISH_REASON: Final = re.compile(rb'"finish_reason"\s*:\s*"([^"\\]{1,64})"')
_PROMPT_TOKENS: Final = re.compile(rb'"prompt_tokens"\s*:\s*(\d{1,12})')
_COMPLETION_TOKENS: Final = re.compile(rb'"completion_tokens"\s*:\s*(\d{1,12})')
_MODEL: Final = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')
_STREAM: Final = re.compile(rb'"stream"\s*:\s*true')


class AnswerFacts:
    """What an answer said of itself; None (or empty) where it did not say."""

    __slots__ = ("finish_reasons", "input_tokens", "model", "output_tokens")

    def __init__(
        self,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        finish_reasons: tuple[str, ...] = (),
        model: str | None = None,
    ) -> None:
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.finish_reasons = finish_reasons
        self.model = model


def read_facts(tail: bytes) -> AnswerFacts:
    """Usage, finish reasons and model from the last bytes of an answer (JSON or SSE)."""
    prompt = _last(_PROMPT_TOKENS, tail)
    completion = _last(_COMPLETION_TOKENS, tail)
    reasons = tuple(dict.fromkeys(m.decode() for m in _FINISH_REASON.findall(tail)))
    model = _last(_MODEL, tail)
    return AnswerFacts(
        int(prompt) if prompt is not None else None,
        int(completion) if completion is not None else None,
        reasons,
        model.decode(errors="replace") if model is not None else None,
    )


def request_model(body: bytes) -> tuple[str | None, bool]:
    """The "model" and "stream" a raw JSON request body asks for."""
    match = _MODEL.search(body)
    model = match.group(1).decode(errors="replace") if match is not None else None
    return model, _STREAM.search(body) is not None


def _last(pattern: re.Pattern[bytes], data: bytes) -> bytes | None:
    found = pattern.findall(data)
    return found[-1] if found else None
