"""Every LLM API's stream through the HTTP port: it ends as its backend ended it, and is
counted right by the judge (a complete stream is never an error).

Each API has a fake backend of its own (`fake-backend --api ...`) as the canary, at
weight 100; each stream is read whole by a plain HTTP client, and then the proxy's
window stats (`/api/status`, what the rollout judge reads) and `/metrics` are checked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from tests.harness import BackendProcess, RunningProxy, proxy_yaml, running_proxy, start_backend

pytestmark = pytest.mark.timeout(30)

MESSAGES = [{"role": "user", "content": "hello there"}]
SPREAD = {"x-fake-tokens-per-s": "200"}  # the stream over several reads of the proxy


@dataclass(frozen=True)
class Call:
    api: str
    path: str
    body: dict[str, Any]
    end: bytes  # what the complete stream ends with
    tokens: int = 4


CALLS = {
    "openai-chat": Call(
        "openai",
        "/v1/chat/completions",
        {"model": "m", "messages": MESSAGES, "max_tokens": 4, "stream": True},
        b"data: [DONE]\n\n",
    ),
    "openai-completions": Call(
        "openai",
        "/v1/completions",
        {"model": "m", "prompt": "hello", "max_tokens": 4, "stream": True},
        b"data: [DONE]\n\n",
    ),
    "responses": Call(
        "responses",
        "/v1/responses",
        {"model": "m", "input": "hello there", "max_output_tokens": 4, "stream": True},
        b'"type":"response.incomplete"',
    ),
    "anthropic": Call(
        "anthropic",
        "/v1/messages",
        {"model": "m", "messages": MESSAGES, "max_tokens": 4, "stream": True},
        b'"type":"message_stop"',
    ),
    "llamacpp": Call(
        "llamacpp",
        "/completion",
        {"prompt": "hello there", "n_predict": 4, "stream": True},
        b'"stop":true',
    ),
    "tgi": Call(
        "tgi",
        "/generate_stream",
        {"inputs": "hello there", "parameters": {"max_new_tokens": 4}},
        b'"finish_reason":"length"',
    ),
    "ollama-chat": Call(
        "ollama",
        "/api/chat",
        {"model": "m", "messages": MESSAGES, "options": {"num_predict": 4}},
        b'"done":true',
    ),
    "ollama-generate": Call(
        "ollama",
        "/api/generate",
        {"model": "m", "prompt": "hello there", "options": {"num_predict": 4}},
        b'"done":true',
    ),
}
APIS = sorted({call.api for call in CALLS.values()})


@pytest.fixture(scope="module")
def api_backends() -> Iterator[dict[str, BackendProcess]]:
    started: dict[str, BackendProcess] = {}
    try:
        for api in APIS:
            started[api] = start_backend(f"m-{api}", "--api", api)
        yield started
    finally:
        for backend in started.values():
            backend.stop()


def canary_only(backend: BackendProcess) -> str:
    return proxy_yaml(backend.url, backend.url, route="rollout: {weight: 100}")


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
    async with running_proxy(canary_only(api_backends[call.api])) as proxy:
        answer = await stream(proxy, call.path, call.body, **(SPREAD if spread else {}))
        stats = await judged(proxy)
    assert call.end in answer
    assert b"tok3 " in answer
    assert (stats["requests"], stats["errors"]) == (1, 0), stats


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
async def test_a_stream_of_each_api_without_its_end_is_cut_and_counted(
    api_backends: dict[str, BackendProcess], call: Call
) -> None:
    async with running_proxy(canary_only(api_backends[call.api])) as proxy:
        with pytest.raises(aiohttp.ClientPayloadError):
            await stream(proxy, call.path, call.body, **{"x-fake-no-done": "1", **SPREAD})
        stats = await judged(proxy)
    assert (stats["requests"], stats["errors"]) == (1, 1), stats
    assert stats["errors_by_type"] == {"stream_cut": 1}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
async def test_a_stream_of_each_api_that_reports_a_failure_ends_as_sent_and_is_an_error(
    api_backends: dict[str, BackendProcess], call: Call
) -> None:
    async with running_proxy(canary_only(api_backends[call.api])) as proxy:
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
    async with running_proxy(canary_only(api_backends["tgi"])) as proxy:
        answer = await stream(proxy, "/", body, **{"x-fake-no-done": "1", **SPREAD})
        stats = await judged(proxy)
    assert b"tok3 " in answer
    assert b"details" not in answer.replace(b'"details":null', b"")
    assert (stats["requests"], stats["errors"]) == (1, 0), stats
