"""Every LLM API's stream through the HTTP port: it ends as its backend ended it, and is
counted right by the judge (a complete stream is never an error).

Each API has a fake backend of its own (`fake-backend --api ...`) as the canary, at
weight 100; each stream is read whole by a plain HTTP client, and then the proxy's
window stats (`/api/status`, what the rollout judge reads) and `/metrics` are checked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import aiohttp
import mmh3
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import BackendProcess, RunningProxy, proxy_yaml, running_proxy, start_backend

pytestmark = pytest.mark.timeout(30)

MESSAGES = [{"role": "user", "content": "hello there"}]
USAGE = {"stream_options": {"include_usage": True}}  # an OpenAI stream's usage event
SPREAD = {"x-fake-tokens-per-s": "200"}  # the stream over several reads of the proxy


@dataclass(frozen=True)
class Call:
    api: str
    path: str
    body: dict[str, Any]
    end: bytes  # what the complete stream ends with
    provider: str = "openai"  # the backend's `api`, as gen_ai.provider.name
    operation: str | None = "chat"  # gen_ai.operation.name; None: plain HTTP
    input_tokens: int | None = 2  # as the backend's usage says: words of the prompt


CALLS = {
    "openai-chat": Call(
        "openai",
        "/v1/chat/completions",
        {"model": "m", "messages": MESSAGES, "max_tokens": 4, "stream": True, **USAGE},
        b"data: [DONE]\n\n",
    ),
    "openai-completions": Call(
        "openai",
        "/v1/completions",
        {"model": "m", "prompt": "hello there", "max_tokens": 4, "stream": True, **USAGE},
        b"data: [DONE]\n\n",
        operation="text_completion",
    ),
    "responses": Call(
        "responses",
        "/v1/responses",
        {"model": "m", "input": "hello there", "max_output_tokens": 4, "stream": True},
        b'"type":"response.incomplete"',
        operation=None,
    ),
    "anthropic": Call(
        "anthropic",
        "/v1/messages",
        {"model": "m", "messages": MESSAGES, "max_tokens": 4, "stream": True},
        b'"type":"message_stop"',
        "anthropic",
    ),
    "llamacpp": Call(
        "llamacpp",
        "/completion",
        {"prompt": "hello there", "n_predict": 4, "stream": True},
        b'"stop":true',
        "llama.cpp",
        "text_completion",
    ),
    "tgi": Call(
        "tgi",
        "/generate_stream",
        {"inputs": "hello there", "parameters": {"max_new_tokens": 4}},
        b'"finish_reason":"length"',
        "tgi",
        "text_completion",
        None,  # TGI's stream does not count the prompt
    ),
    "ollama-chat": Call(
        "ollama",
        "/api/chat",
        {"model": "m", "messages": MESSAGES, "options": {"num_predict": 4}},
        b'"done":true',
        "ollama",
    ),
    "ollama-generate": Call(
        "ollama",
        "/api/generate",
        {"model": "m", "prompt": "hello there", "options": {"num_predict": 4}},
        b'"done":true',
        "ollama",
        "text_completion",
    ),
}
APIS = sorted({call.api for call in CALLS.values()})


@pytest.fixture(scope="module")
def api_backends() -> Iterator[dict[str, BackendProcess]]:
    started: dict[str, BackendProcess] = {}
    try:
        # Started side by side: one after another they can outlast a test's timeout on a
        # busy machine.
        with ThreadPoolExecutor(len(APIS)) as pool:
            starting = {api: pool.submit(start_backend, f"m-{api}", "--api", api) for api in APIS}
            for api, future in starting.items():
                started[api] = future.result()
        yield started
    finally:
        for backend in started.values():
            backend.stop()


BACKEND_API = {"responses": "openai"}  # the config's name of each fake backend's API


def canary_only(backend: BackendProcess, api: str = "openai", backend_lines: str = "") -> str:
    backend_lines = f"api: {BACKEND_API.get(api, api)}\n{backend_lines}"
    return proxy_yaml(backend.url, backend.url, "rollout: {weight: 100}", backend=backend_lines)


async def metrics(proxy: RunningProxy) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    url = f"http://127.0.0.1:{proxy.server.admin_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = (await response.read()).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def tokens(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> dict[str, object]:
    """gen_ai.client.token.usage sums by token type, with the labels they came under."""
    found: dict[str, object] = {}
    for (name, labels), value in samples.items():
        if name == "gen_ai_client_token_usage_sum":
            label = dict(labels)
            found[label["gen_ai_token_type"]] = (
                value,
                label["gen_ai_provider_name"],
                label["gen_ai_operation_name"],
            )
    return found


async def stream(proxy: RunningProxy, path: str, body: dict[str, Any], **headers: str) -> bytes:
    """The whole answer; aiohttp raises ClientPayloadError if the proxy cut it."""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{proxy.url}{path}", json=body, headers=headers) as response:
            assert response.status == 200
            return await response.read()


async def judged(proxy: RunningProxy) -> dict[str, Any]:
    """The canary's window stats, as the rollout judge reads them."""
    url = f"http://127.0.0.1:{proxy.server.admin_port}/api/status"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        status = json.loads(await response.read())
    canary: dict[str, Any] = status["routes"][0]["variants"]["canary"]
    return canary


@pytest.mark.parametrize("spread", [False, True], ids=["one-read", "spread"])
@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
async def test_a_complete_stream_of_each_api_ends_cleanly_and_is_never_an_error(
    api_backends: dict[str, BackendProcess], call: Call, spread: bool
) -> None:
    async with running_proxy(canary_only(api_backends[call.api], call.api)) as proxy:
        answer = await stream(proxy, call.path, call.body, **(SPREAD if spread else {}))
        stats = await judged(proxy)
        samples = await metrics(proxy)
    assert call.end in answer
    assert b"tok3 " in answer
    assert (stats["requests"], stats["errors"]) == (1, 0), stats
    # Usage in the API's own words, onto the judge's stats and the metrics.
    assert stats["output_tokens"] == 4
    expected: dict[str, object] = {}
    if call.operation is not None:
        expected["output"] = (4.0, call.provider, call.operation)
        if call.input_tokens is not None:
            expected["input"] = (float(call.input_tokens), call.provider, call.operation)
    assert tokens(samples) == expected
    tpot = [
        value
        for (name, _), value in samples.items()
        if name == "canary_upstream_time_per_output_token_seconds_count"
    ]
    assert tpot == [1.0]


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
async def test_a_stream_of_each_api_without_its_end_is_cut_and_counted(
    api_backends: dict[str, BackendProcess], call: Call
) -> None:
    async with running_proxy(canary_only(api_backends[call.api], call.api)) as proxy:
        with pytest.raises(aiohttp.ClientPayloadError):
            await stream(proxy, call.path, call.body, **{"x-fake-no-done": "1", **SPREAD})
        stats = await judged(proxy)
    assert (stats["requests"], stats["errors"]) == (1, 1), stats
    assert stats["errors_by_type"] == {"stream_cut": 1}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
async def test_a_stream_of_each_api_that_reports_a_failure_ends_as_sent_and_is_an_error(
    api_backends: dict[str, BackendProcess], call: Call
) -> None:
    async with running_proxy(canary_only(api_backends[call.api], call.api)) as proxy:
        answer = await stream(proxy, call.path, call.body, **{"x-fake-stream-error": "1"})
        stats = await judged(proxy)
    assert b"x-fake-stream-error" in answer  # the backend's own failure event, relayed
    assert call.end not in answer
    assert (stats["requests"], stats["errors"]) == (1, 1), stats
    assert stats["errors_by_type"] == {"stream_error": 1}


async def test_a_stream_of_an_unknown_api_that_ends_cleanly_is_complete(
    api_backends: dict[str, BackendProcess],
) -> None:
    # TGI's `POST /` streams too; the proxy knows no end for that path, so a clean end
    # of the body is the end, even without the event that carries `details`.
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 4}, "stream": True}
    async with running_proxy(canary_only(api_backends["tgi"], "tgi")) as proxy:
        answer = await stream(proxy, "/", body, **{"x-fake-no-done": "1", **SPREAD})
        stats = await judged(proxy)
    assert b"tok3 " in answer
    assert b"details" not in answer.replace(b'"details":null', b"")
    assert (stats["requests"], stats["errors"]) == (1, 0), stats


async def test_an_anthropic_backend_gets_its_key_as_x_api_key_and_the_clients_version(
    api_backends: dict[str, BackendProcess],
) -> None:
    backend = api_backends["anthropic"]
    await backend.clear()
    config = canary_only(backend, "anthropic", "api_key_env: ANTHROPIC_BACKEND_KEY")
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 4}
    headers = {
        "x-api-key": "client-key",
        "Authorization": "Bearer client-token",
        "anthropic-version": "2023-06-01",
    }
    async with running_proxy(config, environ={"ANTHROPIC_BACKEND_KEY": "backend-key"}) as proxy:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{proxy.url}/v1/messages", json=body, headers=headers
            ) as response:
                assert response.status == 200
                answer = json.loads(await response.read())
    assert answer["type"] == "message"
    [received] = await backend.requests()
    sent = [(name.lower(), value) for name, value in received["headers"]]
    assert ("x-api-key", "backend-key") in sent
    assert ("anthropic-version", "2023-06-01") in sent
    assert not [name for name, value in sent if "client" in value]


def bucket_variant(salt: str, key: str, weight: float) -> str:
    bucket = mmh3.hash(f"{salt}:{key}", 0, signed=False) % 10000
    return "canary" if bucket < round(weight * 100) else "stable"


async def test_a_sticky_key_inside_the_body_is_read_by_its_path(
    api_backends: dict[str, BackendProcess],
) -> None:
    backend = api_backends["anthropic"]
    route = "sticky: {keys: [body:metadata.user_id], salt: s}\nrollout: {weight: 50}"
    config = proxy_yaml(backend.url, backend.url, route, backend="api: anthropic")
    seen: dict[str, set[str]] = {}
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as session:
        for user in [f"user-{i}" for i in range(12)] * 2:
            body = {"model": "m", "messages": MESSAGES, "max_tokens": 2}
            body["metadata"] = {"user_id": user}
            async with session.post(f"{proxy.url}/v1/messages", json=body) as response:
                assert response.status == 200
                seen.setdefault(user, set()).add(response.headers["x-canary-variant"])
    assert {user: variants for user, variants in seen.items()} == {
        user: {bucket_variant("s", user, 50)} for user in seen
    }
    assert len({variant for variants in seen.values() for variant in variants}) == 2


ERROR_SHAPES = {  # what each API's error body says first, as its clients parse it
    "openai": b'{"error":{"message":',
    "responses": b'{"error":{"message":',
    "anthropic": b'{"type":"error","error":{"type":"overloaded_error"',
    "llamacpp": b'{"error":{"code":529,',
    "tgi": b'{"error":"fake backend',
    "ollama": b'{"error":"fake backend',
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
async def test_an_error_status_of_each_api_passes_in_its_shape_and_counts(
    api_backends: dict[str, BackendProcess], call: Call
) -> None:
    async with running_proxy(canary_only(api_backends[call.api], call.api)) as proxy:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{proxy.url}{call.path}", json=call.body, headers={"x-fake-status": "529"}
            ) as response:
                status, body = response.status, await response.read()
        stats = await judged(proxy)
    assert status == 529
    assert body.startswith(ERROR_SHAPES[call.api]), body
    assert (stats["errors"], stats["errors_by_type"]) == (1, {"529": 1})
