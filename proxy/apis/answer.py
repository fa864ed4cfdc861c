"""What the proxy learns of a backend's answer from its bytes. Pure.

An answer's usage, finish reasons and model sit in its last few hundred bytes (an
OpenAI stream's finish and usage events, a JSON answer's `usage`), except Anthropic's
input tokens and model, which its stream sends first (`message_start`). So the relay
keeps references to its first chunk and its last three (no copy, no scan per chunk),
and they are read once, at the end, with a few regular expressions per API rather
than a JSON parse. Each API names them its own way:

- OpenAI (and any API the proxy does not know): `prompt_tokens`, `completion_tokens`,
  `finish_reason`, `model`.
- Responses: `input_tokens`, `output_tokens`, the response's `status` (or its
  `incomplete_details.reason`), `model`.
- Anthropic: `input_tokens` (first), `output_tokens` (last), `stop_reason`, `model`.
- llama.cpp: `tokens_evaluated`, `tokens_predicted`, `stop_type`, `model`.
- TGI: `generated_tokens`, `finish_reason` (no input count, no model).
- Ollama: `prompt_eval_count`, `eval_count`, `done_reason`, `model`.

JSON escapes quotes inside strings, so `"model":"x"` written by the model inside its
answer never looks like the answer's own `"model"` key to these patterns.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

from proxy.apis.streams import Api

__all__ = ["AnswerFacts", "read_facts", "request_model"]


class _Key(NamedTuple):
    """A pattern for one key's value; the pattern begins with the key's `literal`."""

    literal: bytes
    pattern: re.Pattern[bytes]


def _count(name: str) -> _Key:
    literal = b'"%s"' % name.encode()
    return _Key(literal, re.compile(rb"%s\s*:\s*(\d{1,12})" % literal))


def _word(name: str, length: int = 64) -> _Key:
    literal = b'"%s"' % name.encode()
    return _Key(literal, re.compile(rb'%s\s*:\s*"([^"\\]{1,%d})"' % (literal, length)))


_FINISH_REASON: Final = _word("finish_reason")
_MODEL: Final = _word("model", 256)
_STREAM: Final = re.compile(rb'"stream"\s*:\s*true')
_INPUT_TOKENS: Final = _count("input_tokens")
_OUTPUT_TOKENS: Final = _count("output_tokens")
# A Responses object's own status: the first one after `"object":"response"`, not an
# output item's.
_RESPONSE_STATUS: Final = _Key(
    b'"object"',
    re.compile(rb'"object"\s*:\s*"response"[^{}]*?"status"\s*:\s*"(\w{1,32})"'),
)
_INCOMPLETE_REASON: Final = _Key(
    b'"incomplete_details"',
    re.compile(rb'"incomplete_details"\s*:\s*\{\s*"reason"\s*:\s*"([^"\\]{1,64})"'),
)


class _Fields(NamedTuple):
    """Where one API says its usage and finish; `input_first`: the input count is the
    first one of the answer (sent at its start), not the last."""

    input_tokens: _Key | None
    output_tokens: _Key
    finish: _Key | None
    input_first: bool = False


_OPENAI: Final = _Fields(_count("prompt_tokens"), _count("completion_tokens"), _FINISH_REASON)
_FIELDS: Final = {
    Api.OPENAI: _OPENAI,
    Api.UNKNOWN: _OPENAI,
    Api.RESPONSES: _Fields(_INPUT_TOKENS, _OUTPUT_TOKENS, None),
    Api.ANTHROPIC: _Fields(_INPUT_TOKENS, _OUTPUT_TOKENS, _word("stop_reason"), True),
    Api.LLAMACPP: _Fields(
        _count("tokens_evaluated"), _count("tokens_predicted"), _word("stop_type")
    ),
    Api.TGI: _Fields(None, _count("generated_tokens"), _FINISH_REASON),
    Api.OLLAMA: _Fields(_count("prompt_eval_count"), _count("eval_count"), _word("done_reason")),
}


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


def read_facts(
    tail: bytes, api: Api = Api.OPENAI, head: bytes = b"", *, usage_only: bool = False
) -> AnswerFacts:
    """Usage, finish reasons and model of an answer of `api` (JSON, SSE or NDJSON), from
    its last bytes and, for what an API sends first, its first chunk `head`; with
    `usage_only`, the usage alone (no finish reasons, no model)."""
    fields = _FIELDS[api]
    first = head + tail if fields.input_first else tail
    prompt = None
    if fields.input_tokens is not None:
        found = fields.input_tokens.pattern.search(first) if fields.input_first else None
        prompt = found.group(1) if found is not None else _last(fields.input_tokens, tail)
    completion = _last(fields.output_tokens, tail)
    input_tokens = int(prompt) if prompt is not None else None
    output_tokens = int(completion) if completion is not None else None
    if usage_only:
        return AnswerFacts(input_tokens, output_tokens)
    if fields.finish is not None:
        found_reasons = fields.finish.pattern.findall(tail)
        reasons = tuple(dict.fromkeys(m.decode() for m in found_reasons))
    else:  # Responses: the response's status, or why it is incomplete
        why = _last(_INCOMPLETE_REASON, tail) or _last(_RESPONSE_STATUS, tail)
        reasons = (why.decode(),) if why is not None else ()
    if fields.input_first:  # the model is said first as well
        found = _MODEL.pattern.search(first)
        model = found.group(1) if found is not None else None
    else:
        model = _last(_MODEL, tail)
    return AnswerFacts(
        input_tokens,
        output_tokens,
        reasons,
        model.decode(errors="replace") if model is not None else None,
    )


def request_model(body: bytes) -> tuple[str | None, bool]:
    """The "model" and "stream" a raw JSON request body asks for."""
    match = _MODEL.pattern.search(body)
    model = match.group(1).decode(errors="replace") if match is not None else None
    return model, _STREAM.search(body) is not None


def _last(key: _Key, data: bytes) -> bytes | None:
    """The group of `key`'s last match in `data`, looked for from the end: the last
    match starts at the last occurrence of the key's literal that begins one (an
    answer's last bytes are most of a JSON answer, and its usage comes last)."""
    literal, pattern = key
    end = len(data)
    while (at := data.rfind(literal, 0, end)) >= 0:
        match = pattern.match(data, at)
        if match is not None:
            return match.group(1)
        end = at
    return None
