"""The fake OpenAI-compatible backend: its pure rules, then the real server over loopback.

The pure parts (options, hooks, plan, wire) are table-driven and synchronous; the server
is started in-process on 127.0.0.1 port 0 and driven by the official `openai` client,
aiohttp, or raw sockets where the exact bytes on the wire matter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from multidict import CIMultiDict

from proxy.fake_backend import (
    FakeBackend,
    FakeBackendOptions,
    add_arguments,
    options_from_args,
    run_forever,
)
from proxy.fake_backend.hooks import Hooks, parse_hooks
from proxy.fake_backend.plan import (
    ErrorReply,
    Garbage,
    Generate,
    Hang,
    JsonGarbage,
    ModelList,
    Plan,
    Reset,
    plan_request,
)
from proxy.fake_backend.wire import (
    GARBAGE_RESPONSE,
    Kind,
    StreamEvents,
    completion_body,
    completion_text,
)
from tests.harness import eventually

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
MODEL = "fake-test-model"
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "say hello to me"}]}

StartBackend = Callable[..., Awaitable[FakeBackend]]


# --- options -------------------------------------------------------------------------


def test_options_defaults_match_the_contract() -> None:
    options = FakeBackendOptions()
    assert (options.host, options.port, options.model) == ("127.0.0.1", 8000, "fake-model")
    assert (options.error_rate, options.latency_s, options.ttft_s, options.tokens_per_s) == (
        0.0,
        0.0,
        0.0,
        0.0,
    )
    assert (options.seed, options.default_tokens) == (None, 16)


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"port": -1}, "--port"),
        ({"port": 65536}, "--port"),
        ({"error_rate": 1.5}, "--error-rate"),
        ({"error_rate": -0.1}, "--error-rate"),
        ({"error_rate": float("nan")}, "--error-rate"),
        ({"latency_s": -1.0}, "--latency"),
        ({"ttft_s": float("inf")}, "--ttft"),
        ({"tokens_per_s": -5.0}, "--tokens-per-s"),
        ({"model": ""}, "--model"),
        ({"host": ""}, "--host"),
        ({"default_tokens": -1}, "--tokens"),
    ],
)
def test_options_reject_bad_values_with_one_line(changes: dict[str, Any], flag: str) -> None:
    with pytest.raises(ValueError, match=flag) as caught:
        FakeBackendOptions(**changes)
    assert "\n" not in str(caught.value)


def test_options_from_args_reads_every_flag() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(
        [
            *("--port", "0", "--host", "0.0.0.0", "--error-rate", "0.25"),
            *("--latency", "0.1", "--ttft", "0.2", "--tokens-per-s", "50"),
            *("--model", "m1", "--seed", "7", "--tokens", "64"),
        ]
    )
    assert options_from_args(ns) == FakeBackendOptions(
        host="0.0.0.0",
        port=0,
        error_rate=0.25,
        latency_s=0.1,
        ttft_s=0.2,
        tokens_per_s=50.0,
        default_tokens=64,
        model="m1",
        seed=7,
    )
    assert options_from_args(parser.parse_args([])) == FakeBackendOptions()


def test_options_from_args_raises_value_error_on_a_bad_flag() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(
        ValueError, match=re.escape("--error-rate must be between 0 and 1, got 2.0")
    ):
        options_from_args(parser.parse_args(["--error-rate", "2"]))


# --- hooks -----------------------------------------------------------------------------


def test_parse_hooks_reads_every_hook_case_insensitively() -> None:
    headers = CIMultiDict(
        {
            "X-Fake-Status": "429",
            "x-fake-latency": "1.5",
            "x-fake-ttft": "0.25",
            "x-fake-tokens-per-s": "5",
            "x-fake-tokens": "7",
            "x-fake-hang": "1",
            "x-fake-reset": "After-Headers",
            "x-fake-cut-after": "3",
            "x-fake-no-done": "true",
            "x-fake-garbage": "yes",
            "x-fake-json-garbage": "on",
        }
    )
    assert parse_hooks(headers) == Hooks(
        status=429,
        latency_s=1.5,
        ttft_s=0.25,
        tokens_per_s=5.0,
        tokens=7,
        hang=True,
        reset_after_headers=True,
        cut_after=3,
        no_done=True,
        garbage=True,
        json_garbage=True,
    )
    assert parse_hooks({}) == Hooks()
    assert parse_hooks({"x-fake-hang": "0", "x-fake-reset": "before-headers"}) == Hooks(
        reset_after_headers=False
    )


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-fake-status", "200"),
        ("x-fake-status", "600"),
        ("x-fake-status", "oops"),
        ("x-fake-ttft", "-1"),
        ("x-fake-latency", "nan"),
        ("x-fake-tokens-per-s", "fast"),
        ("x-fake-tokens", "2.5"),
        ("x-fake-cut-after", "-3"),
        ("x-fake-hang", "maybe"),
        ("x-fake-reset", "sometimes"),
    ],
)
def test_parse_hooks_rejects_a_bad_value_naming_the_header(header: str, value: str) -> None:
    with pytest.raises(ValueError, match=header):
        parse_hooks({header: value})


def test_only_hook_applies_the_hooks_on_the_listed_models_alone() -> None:
    headers = {"x-fake-status": "503", "x-fake-only": "m-canary, m-other"}
    assert parse_hooks(headers, "m-canary") == Hooks(status=503)
    assert parse_hooks(headers, "m-other") == Hooks(status=503)
    assert parse_hooks(headers, "m-stable") == Hooks()
    # Ignored hooks are not even validated: they are not this server's.
    assert parse_hooks({"x-fake-status": "oops", "x-fake-only": "x"}, "m") == Hooks()


# --- plan ------------------------------------------------------------------------------

OPTIONS = FakeBackendOptions(
    model=MODEL, latency_s=0.1, ttft_s=0.2, tokens_per_s=10.0, default_tokens=5
)


def plan(
    path: str = CHAT,
    body: object = HELLO,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    inject_error: bool = False,
) -> Plan:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return plan_request(method, path, headers or {}, raw, OPTIONS, inject_error)


def test_plan_answers_a_chat_request_with_the_default_generation() -> None:
    assert plan() == Plan(
        0.1,
        Generate(
            kind=Kind.CHAT,
            stream=False,
            n_tokens=5,
            finish_reason="stop",
            prompt_tokens=4,
            include_usage=False,
            ttft_s=0.2,
            token_interval_s=0.1,
        ),
    )


@pytest.mark.parametrize(
    ("body", "headers", "n_tokens", "finish_reason"),
    [
        ({}, {}, 5, "stop"),
        ({"max_tokens": 3}, {}, 3, "length"),
        ({"max_completion_tokens": 2, "max_tokens": 9}, {}, 2, "length"),
        ({"max_tokens": 0}, {}, 0, "length"),
        ({}, {"x-fake-tokens": "8"}, 8, "stop"),
        ({"max_tokens": 10}, {"x-fake-tokens": "4"}, 4, "stop"),
        ({"max_tokens": 3}, {"x-fake-tokens": "9"}, 3, "length"),
    ],
)
def test_plan_counts_tokens_and_picks_the_finish_reason(
    body: dict[str, object], headers: dict[str, str], n_tokens: int, finish_reason: str
) -> None:
    action = plan(body=body, headers=headers).action
    assert isinstance(action, Generate)
    assert (action.n_tokens, action.finish_reason) == (n_tokens, finish_reason)


@pytest.mark.parametrize(
    ("path", "body", "prompt_tokens"),
    [
        (CHAT, {"messages": [{"content": "a b"}, {"content": " c\nd  e "}]}, 5),
        (
            CHAT,
            {"messages": [{"content": [{"type": "text", "text": "x y"}, {"type": "image"}]}]},
            2,
        ),
        (CHAT, {"messages": []}, 1),
        (CHAT, {}, 1),
        (TEXT, {"prompt": "one two three"}, 3),
        (TEXT, {"prompt": ["a b", "c"]}, 3),
        (TEXT, {"prompt": [1, 2, 3, 4]}, 4),
        (TEXT, {"prompt": [[1, 2], [3]]}, 3),
    ],
)
def test_plan_counts_prompt_words_at_least_one(
    path: str, body: dict[str, object], prompt_tokens: int
) -> None:
    action = plan(path=path, body=body).action
    assert isinstance(action, Generate)
    assert action.prompt_tokens == prompt_tokens


def test_plan_reads_stream_usage_and_timing_overrides() -> None:
    action = plan(
        body={"stream": True, "stream_options": {"include_usage": True}},
        headers={"x-fake-ttft": "1.5", "x-fake-tokens-per-s": "0", "x-fake-cut-after": "2"},
    ).action
    assert isinstance(action, Generate)
    assert (action.stream, action.include_usage, action.ttft_s) == (True, True, 1.5)
    assert (action.token_interval_s, action.cut_after) == (0.0, 2)
    assert plan(headers={"x-fake-latency": "0"}).latency_s == 0.0


def test_generation_time_is_ttft_plus_one_interval_between_tokens() -> None:
    action = plan().action
    assert isinstance(action, Generate)
    assert action.generation_s == pytest.approx(0.2 + 4 * 0.1)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-fake-hang": "1", "x-fake-status": "503"}, Hang()),
        ({"x-fake-reset": "before-headers", "x-fake-garbage": "1"}, Reset(after_headers=False)),
        ({"x-fake-garbage": "1", "x-fake-status": "503"}, Garbage()),
        (
            {"x-fake-status": "503", "x-fake-json-garbage": "1"},
            ErrorReply(
                503,
                "fake backend: status 503 requested by x-fake-status",
                "server_error",
                "fake_status",
            ),
        ),
        ({"x-fake-json-garbage": "1"}, JsonGarbage()),
    ],
)
def test_plan_fault_hooks_win_in_their_documented_order(
    headers: dict[str, str], expected: object
) -> None:
    assert plan(headers=headers, inject_error=True).action == expected


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(400, "invalid_request_error"), (401, "authentication_error"), (429, "rate_limit_error")],
)
def test_plan_status_hook_uses_openai_error_types(status: int, error_type: str) -> None:
    action = plan(headers={"x-fake-status": str(status)}).action
    assert isinstance(action, ErrorReply)
    assert (action.status, action.error_type) == (status, error_type)


def test_plan_fault_hooks_work_on_any_path() -> None:
    action = plan(path="/v1/embeddings", headers={"x-fake-status": "502"}).action
    assert isinstance(action, ErrorReply)
    assert action.status == 502


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/v1/embeddings", HELLO, 404, "not_found"),
        ("GET", CHAT, b"", 404, "not_found"),
        ("POST", CHAT, b"{not json", 400, "bad_json"),
        ("POST", TEXT, b"[1, 2]", 400, "bad_json"),
        ("POST", CHAT, b"\xff\xfe", 400, "bad_json"),
        ("POST", CHAT, {"max_tokens": -1}, 400, "invalid_value"),
        ("POST", CHAT, {"max_tokens": "ten"}, 400, "invalid_value"),
    ],
)
def test_plan_answers_unknown_paths_and_bad_bodies_in_openai_shape(
    method: str, path: str, body: object, status: int, code: str
) -> None:
    action = plan(method=method, path=path, body=body, inject_error=True).action
    assert isinstance(action, ErrorReply)
    assert (action.status, action.error_type, action.code) == (
        status,
        "invalid_request_error",
        code,
    )


def test_plan_injects_errors_only_into_valid_generation_requests() -> None:
    action = plan(inject_error=True).action
    assert isinstance(action, ErrorReply)
    assert (action.status, action.code) == (500, "injected_error")
    assert plan(method="GET", path="/v1/models", body=b"", inject_error=True).action == ModelList()


def test_plan_answers_a_bad_hook_with_400() -> None:
    action = plan(headers={"x-fake-tokens": "many"}).action
    assert isinstance(action, ErrorReply)
    assert (action.status, action.code) == (400, "bad_fake_hook")
    assert "x-fake-tokens" in action.message


@pytest.mark.parametrize(
    ("headers", "body", "is_fault"),
    [
        ({}, HELLO, False),
        ({"x-fake-hang": "1"}, HELLO, False),
        ({"x-fake-status": "503"}, HELLO, True),
        ({"x-fake-cut-after": "1"}, HELLO, True),
        ({"x-fake-no-done": "1"}, {"stream": True}, True),
        ({"x-fake-no-done": "1"}, HELLO, False),
        ({"x-fake-json-garbage": "1"}, HELLO, True),
    ],
)
def test_plan_tells_which_answers_are_faults(
    headers: dict[str, str], body: object, is_fault: bool
) -> None:
    assert plan(headers=headers, body=body).is_fault is is_fault


# --- wire ------------------------------------------------------------------------------


def sse_data(event: bytes) -> Any:
    assert event.startswith(b"data: ")
    assert event.endswith(b"\n\n")
    return json.loads(event[len(b"data: ") : -2])


@pytest.mark.parametrize("kind", list(Kind))
def test_stream_events_are_valid_openai_chunks(kind: Kind) -> None:
    events = StreamEvents.for_request(kind, "id-1", 1700000000, 'model "quoted"')
    token = sse_data(events.token(3))
    far_token = sse_data(events.token(5000))
    finish = sse_data(events.finish("length"))
    usage = sse_data(events.usage(4, 2))
    for chunk in (token, finish, usage):
        assert (chunk["id"], chunk["created"], chunk["model"]) == (
            "id-1",
            1700000000,
            'model "quoted"',
        )
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert finish["choices"][0]["finish_reason"] == "length"
    assert token["choices"][0]["finish_reason"] is None
    if kind is Kind.CHAT:
        assert token["object"] == "chat.completion.chunk"
        assert token["choices"][0]["delta"] == {"content": "tok3 "}
        assert far_token["choices"][0]["delta"] == {"content": "tok5000 "}
        assert finish["choices"][0]["delta"] == {}
        (opening,) = events.opening()
        assert sse_data(opening)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    else:
        assert token["object"] == "text_completion"
        assert token["choices"][0]["text"] == "tok3 "
        assert far_token["choices"][0]["text"] == "tok5000 "
        assert events.opening() == []


def test_completion_body_concatenates_the_stream_tokens() -> None:
    body = json.loads(completion_body(Kind.TEXT, "cmpl-1", 1, "m", 3, "length", 2))
    assert body["choices"][0]["text"] == completion_text(3) == "tok0 tok1 tok2 "
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


# --- the server: fixtures and helpers ---------------------------------------------------


@pytest.fixture
async def start_backend() -> AsyncIterator[StartBackend]:
    started: list[FakeBackend] = []

    async def start(**changes: Any) -> FakeBackend:
        backend = FakeBackend(FakeBackendOptions(port=0, model=MODEL, **changes))
        await backend.start()
        started.append(backend)
        return backend

    yield start
    for backend in started:
        await backend.stop()


@pytest.fixture
async def backend(start_backend: StartBackend) -> FakeBackend:
    return await start_backend()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


def openai_client(backend: FakeBackend) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{backend.url}/v1", api_key="sk-test", max_retries=0)


async def fake_json(session: aiohttp.ClientSession, backend: FakeBackend, path: str) -> Any:
    async with session.get(f"{backend.url}{path}") as response:
        return await response.json()


async def raw_exchange(
    backend: FakeBackend, headers: dict[str, str] | list[tuple[str, str]], body: object
) -> bytes:
    """Send one request over a bare socket; everything received until the server closes."""
    payload = json.dumps(body).encode()
    pairs = list(headers.items()) if isinstance(headers, dict) else headers
    lines = [f"POST {CHAT}?trace=1 HTTP/1.1", f"Host: 127.0.0.1:{backend.port}"]
    lines += [f"{name}: {value}" for name, value in pairs]
    lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}", "", ""]
    reader, writer = await asyncio.open_connection("127.0.0.1", backend.port)
    try:
        writer.write("\r\n".join(lines).encode() + payload)
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()


async def collect_lines(response: aiohttp.ClientResponse, into: list[bytes]) -> None:
    async for line in response.content:
        into.append(line)


async def wait_for_stats(
    session: aiohttp.ClientSession, backend: FakeBackend, timeout_s: float, **expected: int
) -> dict[str, int]:
    stats: dict[str, int] = await eventually(
        f"stats {expected}",
        lambda: fake_json(session, backend, "/fake/stats"),
        holds=lambda stats: all(stats[name] == value for name, value in expected.items()),
        timeout_s=timeout_s,
        interval_s=0.02,
    )
    return stats


def stream_events(raw: bytes) -> list[bytes]:
    """The SSE `data:` payloads in a body."""
    return [line[len(b"data: ") :] for line in raw.split(b"\n\n") if line.startswith(b"data: ")]


# --- the server through the official openai client ---------------------------------------


async def test_openai_client_gets_a_chat_completion(backend: FakeBackend) -> None:
    async with openai_client(backend) as client:
        completion = await client.chat.completions.create(
            model="anything", messages=[{"role": "user", "content": "one two three"}], max_tokens=4
        )
    assert completion.object == "chat.completion"
    assert completion.model == MODEL
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "tok0 tok1 tok2 tok3 "
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 4)
    assert completion.usage.total_tokens == 7


async def test_openai_client_streams_a_chat_completion_with_usage(backend: FakeBackend) -> None:
    async with openai_client(backend) as client:
        stream = await client.chat.completions.create(
            model="anything",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == completion_text(16)
    assert chunks[0].choices[0].delta.role == "assistant"
    finish_reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish_reasons[-1] == "stop"
    assert finish_reasons[:-1] == [None] * (len(finish_reasons) - 1)
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (1, 16)


async def test_openai_client_stream_without_include_usage_has_no_usage(
    backend: FakeBackend,
) -> None:
    async with openai_client(backend) as client:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=2
        )
        chunks = [chunk async for chunk in stream]
    assert all(chunk.choices and chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_openai_client_gets_legacy_completions(backend: FakeBackend) -> None:
    async with openai_client(backend) as client:
        completion = await client.completions.create(model="m", prompt="a b c d e", max_tokens=2)
        stream = await client.completions.create(model="m", prompt="a", max_tokens=3, stream=True)
        chunks = [chunk async for chunk in stream]
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "tok0 tok1 "
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 5
    assert "".join(chunk.choices[0].text for chunk in chunks) == "tok0 tok1 tok2 "
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_openai_client_lists_the_model(backend: FakeBackend) -> None:
    async with openai_client(backend) as client:
        page = await client.models.list()
    assert [(model.id, model.object, model.owned_by) for model in page.data] == [
        (MODEL, "model", "fake")
    ]


async def test_error_rate_one_makes_openai_raise_internal_server_error(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend(error_rate=1.0)
    async with openai_client(backend) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="m", messages=[])
    assert caught.value.status_code == 500
    assert caught.value.code == "injected_error"


async def test_error_rate_zero_never_fails(
    backend: FakeBackend, session: aiohttp.ClientSession
) -> None:
    for _ in range(50):
        async with session.post(f"{backend.url}{CHAT}", json=HELLO) as response:
            assert response.status == 200
            await response.read()


async def test_a_seed_makes_the_error_sequence_reproducible(
    start_backend: StartBackend, session: aiohttp.ClientSession
) -> None:
    async def statuses(backend: FakeBackend) -> list[int]:
        seen = []
        for _ in range(40):
            async with session.post(f"{backend.url}{CHAT}", json=HELLO) as response:
                seen.append(response.status)
                await response.read()
        return seen

    first = await statuses(await start_backend(error_rate=0.5, seed=42))
    again = await statuses(await start_backend(error_rate=0.5, seed=42))
    other = await statuses(await start_backend(error_rate=0.5, seed=43))
    assert first == again
    assert set(first) == {200, 500}
    assert first != other


@pytest.mark.parametrize(
    ("status", "exception"),
    [
        (503, openai.InternalServerError),
        (429, openai.RateLimitError),
        (400, openai.BadRequestError),
    ],
)
async def test_status_hook_answers_that_status_in_openai_shape(
    backend: FakeBackend, status: int, exception: type[openai.APIStatusError]
) -> None:
    async with openai_client(backend) as client:
        with pytest.raises(exception) as caught:
            await client.chat.completions.create(
                model="m", messages=[], extra_headers={"x-fake-status": str(status)}
            )
    assert caught.value.status_code == status
    assert caught.value.response.headers["x-fake-model"] == MODEL


# --- the server: plain answers ------------------------------------------------------------


async def test_unknown_path_and_bad_json_answer_openai_errors(
    backend: FakeBackend, session: aiohttp.ClientSession
) -> None:
    async with session.get(f"{backend.url}/v2/whatever") as response:
        assert response.status == 404
        assert response.headers["x-fake-model"] == MODEL
        error = (await response.json())["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "not_found")
    async with session.post(f"{backend.url}{CHAT}", data=b"{oops") as response:
        assert response.status == 400
        error = (await response.json())["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "bad_json")


async def test_every_response_names_the_model(
    backend: FakeBackend, session: aiohttp.ClientSession
) -> None:
    for method, path in [("GET", "/v1/models"), ("GET", "/fake/stats"), ("GET", "/fake/nope")]:
        async with session.request(method, f"{backend.url}{path}") as response:
            assert response.headers["x-fake-model"] == MODEL
    async with session.post(f"{backend.url}{CHAT}", json={"stream": True}) as response:
        assert response.headers["x-fake-model"] == MODEL
        assert response.headers["Content-Type"] == "text/event-stream"
        await response.read()


async def test_tokens_hook_sets_the_length(
    backend: FakeBackend, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        f"{backend.url}{CHAT}", json=HELLO, headers={"x-fake-tokens": "2"}
    ) as response:
        body = await response.json()
    assert body["choices"][0]["message"]["content"] == "tok0 tok1 "
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_a_bad_hook_value_answers_400(
    backend: FakeBackend, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        f"{backend.url}{CHAT}", json=HELLO, headers={"x-fake-cut-after": "soon"}
    ) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "bad_fake_hook"


# --- the server: fault hooks on the wire -------------------------------------------------


async def test_cut_after_sends_that_many_tokens_then_breaks_the_stream(
    backend: FakeBackend, session: aiohttp.ClientSession
) -> None:
    received: list[bytes] = []
    async with session.post(
        f"{backend.url}{CHAT}", json={"stream": True}, headers={"x-fake-cut-after": "3"}
    ) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await collect_lines(response, received)
    contents = [
        json.loads(data)["choices"][0]["delta"].get("content")
        for data in stream_events(b"\n\n".join(line.rstrip(b"\n") for line in received))
    ]
    assert contents == ["", "tok0 ", "tok1 ", "tok2 "]
    await wait_for_stats(session, backend, 2.0, aborted=1, errors=1, cancelled=0)


async def test_cut_after_on_the_wire_has_no_terminating_chunk(backend: FakeBackend) -> None:
    raw = await raw_exchange(backend, {"x-fake-cut-after": "2"}, {"stream": True})
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert body.count(b"data: ") == 3
    assert b"[DONE]" not in body
    assert not body.endswith(b"0\r\n\r\n")


async def test_cut_after_without_stream_sends_a_short_body(
    backend: FakeBackend, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        f"{backend.url}{CHAT}", json=HELLO, headers={"x-fake-cut-after": "1"}
    ) as response:
        assert response.status == 200
        declared = response.content_length
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    raw = await raw_exchange(backend, {"x-fake-cut-after": "1"}, HELLO)
    _, _, body = raw.partition(b"\r\n\r\n")
    assert declared == 2 * len(body)
    assert json.loads(body)["object"] == "chat.completion"


async def test_no_done_ends_cleanly_without_finish_or_done(
    backend: FakeBackend, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        f"{backend.url}{CHAT}",
        json={"stream": True, "max_tokens": 4, "stream_options": {"include_usage": True}},
        headers={"x-fake-no-done": "1"},
    ) as response:
        raw = await response.read()
    events = stream_events(raw)
    assert len(events) == 5
    assert b"[DONE]" not in raw
    assert all(json.loads(data)["choices"][0]["finish_reason"] is None for data in events)
    await wait_for_stats(session, backend, 2.0, completed=1, errors=1)


async def test_garbage_writes_bytes_that_are_not_http(
    backend: FakeBackend, session: aiohttp.ClientSession
) -> None:
    assert await raw_exchange(backend, {"x-fake-garbage": "1"}, HELLO) == GARBAGE_RESPONSE
    with pytest.raises(aiohttp.ClientError):
        async with session.post(
            f"{backend.url}{CHAT}", json=HELLO, headers={"x-fake-garbage": "1"}
        ) as response:
            await response.read()


async def test_json_garbage_is_a_200_json_response_that_does_not_parse(
    backend: FakeBackend, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        f"{backend.url}{CHAT}", json=HELLO, headers={"x-fake-json-garbage": "1"}
    ) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        raw = await response.read()
    with pytest.raises(ValueError, match="Unterminated string"):
        json.loads(raw)


async def test_reset_before_headers_closes_without_a_byte(
    backend: FakeBackend, session: aiohttp.ClientSession
) -> None:
    assert await raw_exchange(backend, {"x-fake-reset": "before-headers"}, HELLO) == b""
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with session.post(
            f"{backend.url}{CHAT}", json=HELLO, headers={"x-fake-reset": "before-headers"}
        ):
            pass


async def test_reset_after_headers_sends_only_the_head(
    backend: FakeBackend, session: aiohttp.ClientSession
) -> None:
    raw = await raw_exchange(backend, {"x-fake-reset": "after-headers"}, HELLO)
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Transfer-Encoding: chunked" in raw
    assert raw.endswith(b"\r\n\r\n")
    async with session.post(
        f"{backend.url}{CHAT}", json=HELLO, headers={"x-fake-reset": "after-headers"}
    ) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_hang_never_answers_and_a_disconnect_counts_as_cancelled(
    backend: FakeBackend, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(TimeoutError):
        async with session.post(
            f"{backend.url}{CHAT}",
            json=HELLO,
            headers={"x-fake-hang": "1"},
            timeout=aiohttp.ClientTimeout(total=0.3),
        ):
            pass
    await wait_for_stats(session, backend, 2.0, cancelled=1, in_flight=0, requests=1)


async def test_a_client_leaving_a_slow_stream_is_counted_cancelled_at_once(
    start_backend: StartBackend, session: aiohttp.ClientSession
) -> None:
    backend = await start_backend(tokens_per_s=2.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", backend.port)
    payload = json.dumps({"stream": True, "max_tokens": 100}).encode()
    writer.write(
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    assert b"tok0 " in await asyncio.wait_for(reader.readuntil(b"tok0 "), timeout=5)
    await wait_for_stats(session, backend, 2.0, in_flight=1)
    writer.close()
    await writer.wait_closed()
    stats = await wait_for_stats(session, backend, 2.0, cancelled=1, in_flight=0)
    assert (stats["completed"], stats["errors"]) == (0, 0)


# --- the server: timing -----------------------------------------------------------------


async def test_ttft_hook_delays_the_first_token(
    backend: FakeBackend, session: aiohttp.ClientSession
) -> None:
    started = time.monotonic()
    async with session.post(
        f"{backend.url}{CHAT}", json={"stream": True}, headers={"x-fake-ttft": "0.3"}
    ) as response:
        head_s = time.monotonic() - started
        await response.content.readuntil(b"\n\n")
        first_s = time.monotonic() - started
        await response.read()
    assert 0.3 <= first_s < 5
    assert first_s - head_s >= 0.15  # the wait is after the head, not before it


async def test_latency_hook_delays_the_head(
    backend: FakeBackend, session: aiohttp.ClientSession
) -> None:
    started = time.monotonic()
    async with session.post(
        f"{backend.url}{CHAT}", json=HELLO, headers={"x-fake-latency": "0.3"}
    ) as response:
        assert 0.3 <= time.monotonic() - started < 5
        await response.read()


async def test_options_delay_a_non_streamed_answer_by_the_whole_generation(
    start_backend: StartBackend, session: aiohttp.ClientSession
) -> None:
    backend = await start_backend(latency_s=0.1, ttft_s=0.1, tokens_per_s=20.0)
    started = time.monotonic()
    async with session.post(f"{backend.url}{CHAT}", json={"max_tokens": 5}) as response:
        await response.read()
    assert 0.1 + 0.1 + 4 / 20 <= time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("tokens_per_s", "headers", "n_tokens", "min_span_s"),
    [(20.0, {}, 10, 0.3), (0.0, {"x-fake-tokens-per-s": "10"}, 4, 0.25)],
)
async def test_stream_tokens_arrive_separately_at_the_token_rate(
    start_backend: StartBackend,
    session: aiohttp.ClientSession,
    tokens_per_s: float,
    headers: dict[str, str],
    n_tokens: int,
    min_span_s: float,
) -> None:
    backend = await start_backend(tokens_per_s=tokens_per_s)
    arrivals: list[float] = []
    async with session.post(
        f"{backend.url}{CHAT}", json={"stream": True, "max_tokens": n_tokens}, headers=headers
    ) as response:
        async for line in response.content:
            if b'"content":"tok' in line:
                arrivals.append(time.monotonic())
    assert len(arrivals) == n_tokens
    assert arrivals[-1] - arrivals[0] >= min_span_s


# --- the server: introspection and lifecycle ---------------------------------------------


async def test_fake_requests_records_what_was_received(
    backend: FakeBackend, session: aiohttp.ClientSession
) -> None:
    headers = [("X-User-Id", "alice"), ("x-dup", "1"), ("X-Dup", "2"), ("Connection", "close")]
    await raw_exchange(backend, headers, {"messages": []})
    recorded = await fake_json(session, backend, "/fake/requests")
    assert len(recorded) == 1
    entry = recorded[0]
    assert (entry["method"], entry["path"]) == ("POST", f"{CHAT}?trace=1")
    assert entry["body"] == '{"messages": []}'
    assert ["X-User-Id", "alice"] in entry["headers"]
    assert [pair for pair in entry["headers"] if pair[0].lower() == "x-dup"] == [
        ["x-dup", "1"],
        ["X-Dup", "2"],
    ]
    assert abs(entry["received_at"] - time.time()) < 60
    async with session.delete(f"{backend.url}/fake/requests") as response:
        assert await response.json() == {"cleared": 1}
    assert await fake_json(session, backend, "/fake/requests") == []


async def test_fake_requests_keeps_the_last_200_and_truncates_bodies(
    backend: FakeBackend, session: aiohttp.ClientSession
) -> None:
    big = json.dumps({"prompt": "x" * 100_000}).encode()
    async with session.post(f"{backend.url}{TEXT}", data=big) as response:
        assert response.status == 200
    for index in range(200):
        async with session.get(f"{backend.url}/v1/models?n={index}") as response:
            await response.read()
    recorded = await fake_json(session, backend, "/fake/requests")
    assert len(recorded) == 200
    assert recorded[-1]["path"] == "/v1/models?n=199"
    async with session.delete(f"{backend.url}/fake/requests"):
        pass
    async with session.post(f"{backend.url}{TEXT}", data=big) as response:
        await response.read()
    (entry,) = await fake_json(session, backend, "/fake/requests")
    assert len(entry["body"]) == 64 * 1024


async def test_fake_stats_counts_api_traffic_only(
    backend: FakeBackend, session: aiohttp.ClientSession
) -> None:
    for headers in ({}, {"x-fake-status": "500"}, {"x-fake-reset": "before-headers"}):
        try:
            async with session.post(f"{backend.url}{CHAT}", json=HELLO, headers=headers) as r:
                await r.read()
        except aiohttp.ServerDisconnectedError:
            pass
    await fake_json(session, backend, "/fake/requests")
    stats = await wait_for_stats(session, backend, 2.0, requests=3)
    assert stats == {
        "requests": 3,
        "completed": 2,
        "aborted": 1,
        "cancelled": 0,
        "in_flight": 0,
        "errors": 2,
    }


async def test_start_binds_port_zero_and_refuses_a_second_start(backend: FakeBackend) -> None:
    assert backend.port > 0
    assert backend.url == f"http://127.0.0.1:{backend.port}"
    with pytest.raises(RuntimeError, match="already started"):
        await backend.start()
    await backend.stop()
    await backend.stop()


async def test_stop_cancels_a_hanging_request_after_a_short_grace(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend()
    reader, writer = await asyncio.open_connection("127.0.0.1", backend.port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-fake-hang: 1\r\n\r\n")
    await writer.drain()
    async with aiohttp.ClientSession() as client_session:
        await wait_for_stats(client_session, backend, 2.0, in_flight=1)
    started = time.monotonic()
    await backend.stop()
    assert time.monotonic() - started < 3
    assert await asyncio.wait_for(reader.read(), timeout=2) == b""
    writer.close()
    await writer.wait_closed()


async def test_run_forever_prints_its_address_and_stops_on_sigterm(
    capsys: pytest.CaptureFixture[str],
) -> None:
    task = asyncio.create_task(run_forever(FakeBackendOptions(port=0, model=MODEL)))
    printed: list[str] = []

    def output() -> str:
        printed.append(capsys.readouterr().out)
        return "".join(printed)

    out = await eventually(
        "the listening line", output, holds=lambda out: "listening" in out, timeout_s=5
    )
    line = out.strip()
    assert line.startswith("fake-backend listening on http://127.0.0.1:")
    assert line.endswith(f" model={MODEL}")
    port = int(line.split(":")[2].split()[0])
    async with (
        aiohttp.ClientSession() as client_session,
        client_session.get(f"http://127.0.0.1:{port}/v1/models") as response,
    ):
        assert response.status == 200
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, timeout=5)
