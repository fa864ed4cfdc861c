"""The fake backend's other APIs: OpenAI Responses, Anthropic Messages, llama.cpp, TGI
and Ollama, their bodies and stream events as each server writes them. Pure.

OpenAI chat and completions keep their own pre-encoded module (`wire`), which the
benchmarks drive hard; these are built per event with `json`, which is plenty for
demos and tests. Token `i` reads `"tok{i} "` here too.

Each API's stream, as `ApiStream` produces it:
    responses   SSE `event:` + `data:`: response.created, response.in_progress,
                response.output_item.added, response.content_part.added, one
                response.output_text.delta per token, response.output_text.done,
                response.content_part.done, response.output_item.done, then
                response.completed (or response.incomplete at the token limit).
                Failure: response.failed.
    anthropic   SSE `event:` + `data:`: message_start (with the input tokens),
                content_block_start, ping, one content_block_delta per token,
                content_block_stop, message_delta (stop_reason, output tokens),
                message_stop. Failure: an `error` event (overloaded_error).
    llamacpp    SSE `data:` only (`POST /completion`): one event per token with
                `"stop": false`, then one with `"stop": true`, the token counts and
                `stop_type`. Failure: an event with an `error` object.
    tgi         SSE `data:` only (`POST /generate_stream`): one event per token, the
                last with `generated_text` and `details` (finish_reason,
                generated_tokens). Failure: an event with an `error` string.
    ollama      NDJSON (`POST /api/chat`, `/api/generate`), one line per token with
                `"done": false`, then `"done": true` with done_reason and the counts.
                Failure: a line with an `error` string.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from proxy.fake_backend.wire import completion_text, token_text

__all__ = ["ApiStream", "FakeApi", "Shape", "api_body", "api_error_body"]


class FakeApi(enum.Enum):
    """The API a fake backend speaks (`--api`)."""

    OPENAI = "openai"
    RESPONSES = "responses"
    ANTHROPIC = "anthropic"
    LLAMACPP = "llamacpp"
    TGI = "tgi"
    OLLAMA = "ollama"


class Shape(enum.Enum):
    """The generation endpoints of the APIs of this module."""

    RESPONSES = "responses"
    MESSAGES = "messages"
    LLAMACPP = "llamacpp"
    TGI = "tgi"
    OLLAMA_CHAT = "ollama_chat"
    OLLAMA_GENERATE = "ollama_generate"

    @property
    def content_type(self) -> str:
        """The content type of this shape's stream."""
        if self in (Shape.OLLAMA_CHAT, Shape.OLLAMA_GENERATE):
            return "application/x-ndjson"
        return "text/event-stream"


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _sse(event: str | None, data: object) -> bytes:
    line = b"data: " + _dumps(data) + b"\n\n"
    return b"event: " + event.encode() + b"\n" + line if event else line


# Each API's word for "stopped at the token limit" and "stopped by itself".
_FINISH = {
    Shape.RESPONSES: {"length": "max_output_tokens", "stop": "completed"},
    Shape.MESSAGES: {"length": "max_tokens", "stop": "end_turn"},
    Shape.LLAMACPP: {"length": "limit", "stop": "eos"},
    Shape.TGI: {"length": "length", "stop": "eos_token"},
    Shape.OLLAMA_CHAT: {"length": "length", "stop": "stop"},
    Shape.OLLAMA_GENERATE: {"length": "length", "stop": "stop"},
}
_CREATED_AT = "2026-01-01T00:00:00.000000Z"


def _responses_object(
    response_id: str,
    created: int,
    model: str,
    status: str,
    text: str | None,
    usage: tuple[int, int] | None,
    finish_reason: str | None = None,
) -> dict[str, object]:
    output: list[object] = []
    if text is not None:
        output.append(
            {
                "type": "message",
                "id": f"msg_{response_id}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        )
    incomplete = None
    if status == "incomplete":
        incomplete = {"reason": _FINISH[Shape.RESPONSES].get(finish_reason or "", "")}
    body: dict[str, object] = {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "model": model,
        "output": output,
        "incomplete_details": incomplete,
        "error": None,
        "usage": None,
    }
    if usage is not None:
        body["usage"] = {
            "input_tokens": usage[0],
            "output_tokens": usage[1],
            "total_tokens": usage[0] + usage[1],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }
    return body


def api_body(
    shape: Shape,
    response_id: str,
    created: int,
    model: str,
    n_tokens: int,
    finish_reason: str,
    prompt_tokens: int,
) -> bytes:
    """A whole non-streaming answer of `n_tokens` tokens in `shape`."""
    text = completion_text(n_tokens)
    reason = _FINISH[shape][finish_reason]
    if shape is Shape.RESPONSES:
        status = "incomplete" if finish_reason == "length" else "completed"
        return _dumps(
            _responses_object(
                response_id,
                created,
                model,
                status,
                text,
                (prompt_tokens, n_tokens),
                finish_reason,
            )
        )
    if shape is Shape.MESSAGES:
        return _dumps(
            {
                "id": response_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": reason,
                "stop_sequence": None,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": n_tokens},
            }
        )
    if shape is Shape.LLAMACPP:
        return _dumps(_llamacpp_last(text, model, n_tokens, prompt_tokens, reason))
    if shape is Shape.TGI:
        details = {"finish_reason": reason, "generated_tokens": n_tokens, "seed": None}
        return _dumps({"generated_text": text, "details": details})
    return _dumps(_ollama_last(shape, model, text, n_tokens, prompt_tokens, reason))


def _llamacpp_last(
    content: str, model: str, n_tokens: int, prompt_tokens: int, stop_type: str
) -> dict[str, object]:
    return {
        "content": content,
        "id_slot": 0,
        "stop": True,
        "model": model,
        "tokens_predicted": n_tokens,
        "tokens_evaluated": prompt_tokens,
        "stop_type": stop_type,
        "stopped_eos": stop_type == "eos",
        "stopped_limit": stop_type == "limit",
        "stopped_word": False,
        "truncated": False,
    }


def _ollama_line(shape: Shape, model: str, text: str) -> dict[str, object]:
    line: dict[str, object] = {"model": model, "created_at": _CREATED_AT}
    if shape is Shape.OLLAMA_CHAT:
        line["message"] = {"role": "assistant", "content": text}
    else:
        line["response"] = text
    return line


def _ollama_last(
    shape: Shape, model: str, text: str, n_tokens: int, prompt_tokens: int, reason: str
) -> dict[str, object]:
    line = _ollama_line(shape, model, text)
    line.update(
        {
            "done": True,
            "done_reason": reason,
            "total_duration": 1000,
            "load_duration": 0,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": 100,
            "eval_count": n_tokens,
            "eval_duration": 900,
        }
    )
    return line


# Anthropic's error types by status, as its API documents them.
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def api_error_body(api: FakeApi, status: int, message: str, error_type: str) -> bytes:
    """An error answer in `api`'s own shape, which its SDK turns into its typed error."""
    if api is FakeApi.ANTHROPIC:
        kind = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else error_type)
        return _dumps({"type": "error", "error": {"type": kind, "message": message}})
    if api is FakeApi.OLLAMA:
        return _dumps({"error": message})
    if api is FakeApi.TGI:
        return _dumps({"error": message, "error_type": error_type})
    if api is FakeApi.LLAMACPP:
        return _dumps({"error": {"code": status, "message": message, "type": error_type}})
    return _dumps({"error": {"message": message, "type": error_type, "code": None}})


@dataclass(frozen=True, slots=True)
class ApiStream:
    """The stream events of one streamed generation in `shape`."""

    shape: Shape
    response_id: str
    created: int
    model: str
    prompt_tokens: int

    def _responses(self, event: str, sequence: int, **fields: object) -> bytes:
        return _sse(event, {"type": event, "sequence_number": sequence, **fields})

    def opening(self) -> list[bytes]:
        """The events before the first token."""
        shape = self.shape
        if shape is Shape.RESPONSES:
            pending = _responses_object(
                self.response_id, self.created, self.model, "in_progress", None, None
            )
            item = {
                "type": "message",
                "id": f"msg_{self.response_id}",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            part = {"type": "output_text", "text": "", "annotations": []}
            return [
                self._responses("response.created", 0, response=pending),
                self._responses("response.in_progress", 1, response=pending),
                self._responses("response.output_item.added", 2, output_index=0, item=item),
                self._responses(
                    "response.content_part.added",
                    3,
                    item_id=item["id"],
                    output_index=0,
                    content_index=0,
                    part=part,
                ),
            ]
        if shape is Shape.MESSAGES:
            message: dict[str, object] = {
                "id": self.response_id,
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 1},
            }
            return [
                _sse("message_start", {"type": "message_start", "message": message}),
                _sse(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    },
                ),
                _sse("ping", {"type": "ping"}),
            ]
        return []

    def token(self, index: int) -> bytes:
        """The event carrying token `index`."""
        shape = self.shape
        text = token_text(index)
        if shape is Shape.RESPONSES:
            return self._responses(
                "response.output_text.delta",
                4 + index,
                item_id=f"msg_{self.response_id}",
                output_index=0,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        if shape is Shape.MESSAGES:
            delta = {"type": "text_delta", "text": text}
            return _sse(
                "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
            )
        if shape is Shape.LLAMACPP:
            return _sse(None, {"content": text, "stop": False, "id_slot": 0})
        if shape is Shape.TGI:
            token = {"id": index, "text": text, "logprob": -0.1, "special": False}
            event = {"index": index + 1, "token": token, "generated_text": None, "details": None}
            return b"data:" + _dumps(event) + b"\n\n"  # TGI writes no space after the colon
        line = _ollama_line(shape, self.model, text)
        line["done"] = False
        return _dumps(line) + b"\n"

    def end(self, n_tokens: int, finish_reason: str) -> list[bytes]:
        """The events after the last token, ending the stream in its API."""
        shape = self.shape
        reason = _FINISH[shape][finish_reason]
        text = completion_text(n_tokens)
        if shape is Shape.RESPONSES:
            sequence = 4 + n_tokens
            item_id = f"msg_{self.response_id}"
            status = "incomplete" if finish_reason == "length" else "completed"
            done = _responses_object(
                self.response_id,
                self.created,
                self.model,
                status,
                text,
                (self.prompt_tokens, n_tokens),
                finish_reason,
            )
            part = {"type": "output_text", "text": text, "annotations": []}
            where = {"item_id": item_id, "output_index": 0, "content_index": 0}
            output = done["output"]
            assert isinstance(output, list)
            return [
                self._responses("response.output_text.done", sequence, **where, text=text),
                self._responses("response.content_part.done", sequence + 1, **where, part=part),
                self._responses(
                    "response.output_item.done", sequence + 2, output_index=0, item=output[0]
                ),
                self._responses(f"response.{status}", sequence + 3, response=done),
            ]
        if shape is Shape.MESSAGES:
            return [
                _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
                _sse(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": reason, "stop_sequence": None},
                        "usage": {"output_tokens": n_tokens},
                    },
                ),
                _sse("message_stop", {"type": "message_stop"}),
            ]
        if shape is Shape.LLAMACPP:
            return [
                _sse(None, _llamacpp_last("", self.model, n_tokens, self.prompt_tokens, reason))
            ]
        if shape is Shape.TGI:
            token = {"id": n_tokens, "text": "", "logprob": -0.1, "special": True}
            details = {"finish_reason": reason, "generated_tokens": n_tokens, "seed": None}
            event = {
                "index": n_tokens + 1,
                "token": token,
                "generated_text": text,
                "details": details,
            }
            return [b"data:" + _dumps(event) + b"\n\n"]
        line = _ollama_last(shape, self.model, "", n_tokens, self.prompt_tokens, reason)
        return [_dumps(line) + b"\n"]

    def failure(self, n_tokens: int) -> bytes:
        """The event by which the backend reports that the generation failed."""
        shape = self.shape
        message = "fake backend: generation failed (x-fake-stream-error)"
        if shape is Shape.RESPONSES:
            failed = _responses_object(
                self.response_id, self.created, self.model, "failed", None, None
            )
            failed["error"] = {"code": "server_error", "message": message}
            return self._responses("response.failed", 4 + n_tokens, response=failed)
        if shape is Shape.MESSAGES:
            error = {"type": "overloaded_error", "message": message}
            return _sse("error", {"type": "error", "error": error})
        if shape is Shape.LLAMACPP:
            return _sse(None, {"error": {"code": 500, "message": message, "type": "server_error"}})
        if shape is Shape.TGI:
            return b"data:" + _dumps({"error": message, "error_type": "generation"}) + b"\n\n"
        return _dumps({"error": message}) + b"\n"
