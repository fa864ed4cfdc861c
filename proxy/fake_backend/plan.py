"""What the fake backend answers: a pure function from a request to a `Plan`.

`plan_request` reads the method, path, `x-fake-*` headers and JSON body and returns how
long to wait before the response head and which `Action` to perform. It does no I/O and
keeps no state (the seeded error draw is made by the server and passed in), so each rule
is tested without a socket.

Rule 1: an invalid hook value answers 400 (`bad_fake_hook`); hooks never fail silently.
Rule 2: fault hooks come first, on any path; the first present wins, in the order
        hang, reset, garbage, status, json-garbage.
Rule 3: then an unknown (method, path) answers 404, a bad body 400, and an injected
        error (`error_rate`) 500; only then is the request answered normally.
Rule 4: a generation makes `x-fake-tokens`, else the request's token limit (its API's
        field: `max_completion_tokens`/`max_tokens`, `max_output_tokens`, `n_predict`,
        `parameters.max_new_tokens`, `options.num_predict`), else `default_tokens`
        tokens, capped by that limit; its finish reason is "length" when that limit was
        reached, else "stop" (each API's word for them in `proxy.fake_backend.apis`).
Rule 6: the endpoints are the `--api`'s (`endpoint_of`); a stream is asked for by
        `"stream": true`, by TGI's `/generate_stream`, and by Ollama unless
        `"stream": false`.
Rule 5: `latency_s` precedes the head; a stream then waits `ttft_s` before its first token
        and 1/tokens_per_s between tokens; a non-streamed answer waits all of that before
        its head.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.fake_backend.apis import FakeApi, Shape
from proxy.fake_backend.hooks import Hooks, parse_hooks
from proxy.fake_backend.options import FakeBackendOptions
from proxy.fake_backend.wire import Kind

__all__ = [
    "Action",
    "Endpoint",
    "ErrorReply",
    "Garbage",
    "Generate",
    "Hang",
    "JsonGarbage",
    "ModelList",
    "Plan",
    "Reset",
    "endpoint_of",
    "plan_request",
]

INVALID_REQUEST = "invalid_request_error"
_ERROR_TYPES = {
    400: INVALID_REQUEST,
    401: "authentication_error",
    403: "permission_error",
    404: INVALID_REQUEST,
    409: "conflict_error",
    422: INVALID_REQUEST,
    429: "rate_limit_error",
}


class Endpoint(enum.Enum):
    """The API endpoints the fake backend serves; the others answer 404."""

    CHAT = "chat"
    TEXT = "text"
    MODELS = "models"
    RESPONSES = "responses"
    MESSAGES = "messages"
    LLAMACPP = "llamacpp"
    TGI = "tgi"
    TGI_STREAM = "tgi_stream"
    OLLAMA_CHAT = "ollama_chat"
    OLLAMA_GENERATE = "ollama_generate"

    @property
    def generates(self) -> bool:
        """Whether a request here generates tokens (and so may draw an injected error)."""
        return self is not Endpoint.MODELS


_OPENAI = {
    ("POST", "/v1/chat/completions"): Endpoint.CHAT,
    ("POST", "/v1/completions"): Endpoint.TEXT,
    ("GET", "/v1/models"): Endpoint.MODELS,
}
# Each API's endpoints; llama.cpp and TGI serve OpenAI's beside their own, as they do.
_ENDPOINTS: dict[FakeApi, dict[tuple[str, str], Endpoint]] = {
    FakeApi.OPENAI: _OPENAI,
    FakeApi.RESPONSES: {
        ("POST", "/v1/responses"): Endpoint.RESPONSES,
        ("GET", "/v1/models"): Endpoint.MODELS,
    },
    FakeApi.ANTHROPIC: {("POST", "/v1/messages"): Endpoint.MESSAGES},
    FakeApi.LLAMACPP: {("POST", "/completion"): Endpoint.LLAMACPP, **_OPENAI},
    FakeApi.TGI: {
        ("POST", "/generate"): Endpoint.TGI,
        ("POST", "/generate_stream"): Endpoint.TGI_STREAM,
        ("POST", "/"): Endpoint.TGI,  # TGI's root: streamed with `"stream": true`
        ("POST", "/v1/chat/completions"): Endpoint.CHAT,
    },
    FakeApi.OLLAMA: {
        ("POST", "/api/chat"): Endpoint.OLLAMA_CHAT,
        ("POST", "/api/generate"): Endpoint.OLLAMA_GENERATE,
    },
}
_KINDS = {Endpoint.CHAT: Kind.CHAT, Endpoint.TEXT: Kind.TEXT}
_SHAPES = {
    Endpoint.RESPONSES: Shape.RESPONSES,
    Endpoint.MESSAGES: Shape.MESSAGES,
    Endpoint.LLAMACPP: Shape.LLAMACPP,
    Endpoint.TGI: Shape.TGI,
    Endpoint.TGI_STREAM: Shape.TGI,
    Endpoint.OLLAMA_CHAT: Shape.OLLAMA_CHAT,
    Endpoint.OLLAMA_GENERATE: Shape.OLLAMA_GENERATE,
}
# Where each endpoint's request carries its token limit: a path of keys into the body.
_LIMITS: dict[Endpoint, tuple[str, ...]] = {
    Endpoint.RESPONSES: ("max_output_tokens",),
    Endpoint.MESSAGES: ("max_tokens",),
    Endpoint.LLAMACPP: ("n_predict",),
    Endpoint.TGI: ("parameters", "max_new_tokens"),
    Endpoint.TGI_STREAM: ("parameters", "max_new_tokens"),
    Endpoint.OLLAMA_CHAT: ("options", "num_predict"),
    Endpoint.OLLAMA_GENERATE: ("options", "num_predict"),
}


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """Answer `status` with an OpenAI error body."""

    status: int
    message: str
    error_type: str
    code: str


@dataclass(frozen=True, slots=True)
class ModelList:
    """Answer the model list."""


@dataclass(frozen=True, slots=True)
class Hang:
    """Never answer; only the client leaving ends the request."""


@dataclass(frozen=True, slots=True)
class Reset:
    """Close the connection, before any response byte or right after a 200 chunked head."""

    after_headers: bool


@dataclass(frozen=True, slots=True)
class Garbage:
    """Write bytes that are not HTTP, then close."""


@dataclass(frozen=True, slots=True)
class JsonGarbage:
    """Answer 200 `application/json` with a body that is not JSON."""


@dataclass(frozen=True, slots=True)
class Generate:
    """Generate `n_tokens` tokens, streamed or in one body.

    `cut_after` breaks the connection after that many token events (a stream) or
    after a body shorter than its Content-Length; `overrun` (not streamed) declares a
    Content-Length of half the body and sends all of it; `no_done` ends a stream cleanly
    at the HTTP level but without its API's end (the finish_reason event and `[DONE]`);
    `stream_error` ends it cleanly after the API's failure event instead. `shape` is
    the API's shape, None for OpenAI chat and completions (`kind`).
    """

    kind: Kind
    stream: bool
    n_tokens: int
    finish_reason: str
    prompt_tokens: int
    include_usage: bool
    ttft_s: float
    token_interval_s: float
    cut_after: int | None = None
    overrun: bool = False
    no_done: bool = False
    stream_error: bool = False
    shape: Shape | None = None

    @property
    def generation_s(self) -> float:
        """Time from the head to the last token: ttft, then one interval between tokens."""
        return self.ttft_s + max(self.n_tokens - 1, 0) * self.token_interval_s


Action = ErrorReply | ModelList | Hang | Reset | Garbage | JsonGarbage | Generate


@dataclass(frozen=True, slots=True)
class Plan:
    """Wait `latency_s`, then perform `action`."""

    latency_s: float
    action: Action

    @property
    def is_fault(self) -> bool:
        """Whether the answer is an error status or a deliberately broken response."""
        action = self.action
        if isinstance(action, Generate):
            broken = action.cut_after is not None or (action.overrun and not action.stream)
            return broken or (action.stream and (action.no_done or action.stream_error))
        return not isinstance(action, ModelList | Hang)


def endpoint_of(method: str, path: str, api: FakeApi = FakeApi.OPENAI) -> Endpoint | None:
    """The endpoint `method path` names in `api`, or None (a 404)."""
    return _ENDPOINTS[api].get((method, path))


def _fault(hooks: Hooks) -> Action | None:
    """The fault a hook asks for (Rule 2), or None."""
    if hooks.hang:
        return Hang()
    if hooks.reset_after_headers is not None:
        return Reset(after_headers=hooks.reset_after_headers)
    if hooks.garbage:
        return Garbage()
    if hooks.status is not None:
        error_type = _ERROR_TYPES.get(hooks.status, INVALID_REQUEST)
        if hooks.status >= 500:
            error_type = "server_error"
        message = f"fake backend: status {hooks.status} requested by x-fake-status"
        return ErrorReply(hooks.status, message, error_type, "fake_status")
    if hooks.json_garbage:
        return JsonGarbage()
    return None


def _words(text: object) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def _content_words(content: object) -> int:
    """Words of a chat message's content: a string, or a list of parts with `text`."""
    if isinstance(content, list):
        return sum(_words(part.get("text")) for part in content if isinstance(part, dict))
    return _words(content)


def _prompt_words(prompt: object) -> int:
    """Words of a legacy prompt: a string, a list of them, or token ids (one word each)."""
    if isinstance(prompt, list):
        return sum(1 if isinstance(item, int) else _prompt_words(item) for item in prompt)
    return _words(prompt)


def _prompt_tokens(endpoint: Endpoint, body: dict[str, object]) -> int:
    if endpoint is Endpoint.RESPONSES and not isinstance(body.get("input"), list):
        words = _words(body.get("input"))
    elif endpoint in (Endpoint.CHAT, Endpoint.MESSAGES, Endpoint.OLLAMA_CHAT, Endpoint.RESPONSES):
        field = "input" if endpoint is Endpoint.RESPONSES else "messages"
        messages = body.get(field)
        words = 0
        if isinstance(messages, list):
            words = sum(
                _content_words(message.get("content"))
                for message in messages
                if isinstance(message, dict)
            )
        if endpoint is Endpoint.MESSAGES:
            words += _content_words(body.get("system"))
    elif endpoint in (Endpoint.TGI, Endpoint.TGI_STREAM):
        words = _words(body.get("inputs"))
    else:
        words = _prompt_words(body.get("prompt"))
    return max(words, 1)


def _max_tokens(endpoint: Endpoint, body: dict[str, object]) -> int | None:
    field = _LIMITS.get(endpoint)
    if field is not None:
        value: object = body
        for key in field:
            value = value.get(key) if isinstance(value, dict) else None
        name = ".".join(field)
    else:
        value = body.get("max_completion_tokens")
        name = "max_completion_tokens"
        if value is None:
            value = body.get("max_tokens")
            name = "max_tokens"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def _parse_body(body: bytes) -> dict[str, object]:
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("fake backend: the request body is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise ValueError("fake backend: the request body must be a JSON object")
    return parsed


def _include_usage(body: dict[str, object]) -> bool:
    stream_options = body.get("stream_options")
    return isinstance(stream_options, dict) and stream_options.get("include_usage") is True


def _generate(
    endpoint: Endpoint, hooks: Hooks, body: dict[str, object], options: FakeBackendOptions
) -> Generate:
    """The generation a valid request asks for (Rules 4 and 5)."""
    limit = _max_tokens(endpoint, body)
    wanted = options.default_tokens if hooks.tokens is None else hooks.tokens
    if limit is None:
        n_tokens = wanted
    elif hooks.tokens is None:
        n_tokens = limit
    else:
        n_tokens = min(wanted, limit)
    tokens_per_s = options.tokens_per_s if hooks.tokens_per_s is None else hooks.tokens_per_s
    if endpoint is Endpoint.TGI_STREAM:
        stream = True
    elif endpoint in (Endpoint.OLLAMA_CHAT, Endpoint.OLLAMA_GENERATE):
        stream = body.get("stream") is not False  # Ollama streams unless told not to
    else:
        stream = body.get("stream") is True
    return Generate(
        kind=_KINDS.get(endpoint, Kind.CHAT),
        stream=stream,
        n_tokens=n_tokens,
        finish_reason="length" if limit is not None and n_tokens >= limit else "stop",
        prompt_tokens=_prompt_tokens(endpoint, body),
        include_usage=_include_usage(body),
        ttft_s=options.ttft_s if hooks.ttft_s is None else hooks.ttft_s,
        token_interval_s=1.0 / tokens_per_s if tokens_per_s > 0 else 0.0,
        cut_after=hooks.cut_after,
        overrun=hooks.overrun,
        no_done=hooks.no_done,
        stream_error=hooks.stream_error,
        shape=_SHAPES.get(endpoint),
    )


def _action(
    method: str,
    path: str,
    hooks: Hooks,
    body: bytes,
    options: FakeBackendOptions,
    inject_error: bool,
) -> Action:
    fault = _fault(hooks)
    if fault is not None:
        return fault
    endpoint = endpoint_of(method, path, options.api)
    if endpoint is None:
        message = f"fake backend: no endpoint {method} {path}"
        return ErrorReply(404, message, INVALID_REQUEST, "not_found")
    if endpoint is Endpoint.MODELS:
        return ModelList()
    try:
        parsed = _parse_body(body)
    except ValueError as exc:
        return ErrorReply(400, str(exc), INVALID_REQUEST, "bad_json")
    try:
        generate = _generate(endpoint, hooks, parsed, options)
    except ValueError as exc:
        return ErrorReply(400, str(exc), INVALID_REQUEST, "invalid_value")
    if inject_error:
        message = f"fake backend: injected error (error rate {options.error_rate})"
        return ErrorReply(500, message, "server_error", "injected_error")
    return generate


def plan_request(
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    options: FakeBackendOptions,
    inject_error: bool = False,
) -> Plan:
    """The answer to a request, by Rules 1-5 of this module.

    Args:
        method, path: the request line (path without the query).
        headers: the request headers, looked up case-insensitively.
        body: the raw request body.
        options: the server's defaults.
        inject_error: the server's error draw for this request came up.
    """
    try:
        hooks = parse_hooks(headers, options.model)
    except ValueError as exc:
        return Plan(options.latency_s, ErrorReply(400, str(exc), INVALID_REQUEST, "bad_fake_hook"))
    latency_s = options.latency_s if hooks.latency_s is None else hooks.latency_s
    return Plan(latency_s, _action(method, path, hooks, body, options, inject_error))
