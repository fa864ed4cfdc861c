"""The official clients through the proxy, as their users call them: `openai` (chat,
completions, responses), `anthropic` (messages, `messages.stream`) and `ollama` (chat,
generate), streamed and not, each against a fake backend speaking its API; after each,
the judge's counts (a complete answer, streamed or not, is never an error).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anthropic
import ollama
import openai
import pytest

from tests.harness import BackendProcess, RunningProxy, proxy_yaml, running_proxy, start_backend

pytestmark = pytest.mark.timeout(30)

TEXT = "tok0 tok1 tok2 tok3 "  # what 4 tokens of the fake backend read
BACKEND_API = {"responses": "openai"}


@pytest.fixture(scope="module")
def api_backends() -> Iterator[dict[str, BackendProcess]]:
    started: dict[str, BackendProcess] = {}
    try:
        for api in ("openai", "responses", "anthropic", "ollama"):
            started[api] = start_backend(f"m-{api}", "--api", api)
        yield started
    finally:
        for backend in started.values():
            backend.stop()


@asynccontextmanager
async def proxy_for(backend: BackendProcess, api: str) -> AsyncIterator[RunningProxy]:
    config = proxy_yaml(
        backend.url,
        backend.url,
        "rollout: {weight: 100}",
        backend=f"api: {BACKEND_API.get(api, api)}",
    )
    async with running_proxy(config) as proxy:
        yield proxy


async def judged(proxy: RunningProxy) -> tuple[int, int]:
    """(requests, errors) of the canary, as the rollout judge counts them."""
    url = f"http://127.0.0.1:{proxy.server.admin_port}/api/status"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        status = json.loads(await response.read())
    canary: dict[str, Any] = status["routes"][0]["variants"]["canary"]
    return canary["requests"], canary["errors"]


def openai_client(proxy: RunningProxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)


MESSAGES: list[Any] = [{"role": "user", "content": "hello there"}]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_openai_chat_and_completions(
    api_backends: dict[str, BackendProcess], stream: bool
) -> None:
    async with proxy_for(api_backends["openai"], "openai") as proxy:
        client = openai_client(proxy)
        if stream:
            chunks = await client.chat.completions.create(
                model="m", messages=MESSAGES, max_tokens=4, stream=True
            )
            chat = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
            pieces = await client.completions.create(
                model="m", prompt="hello", max_tokens=4, stream=True
            )
            text = "".join([c.choices[0].text async for c in pieces])
        else:
            answer = await client.chat.completions.create(
                model="m", messages=MESSAGES, max_tokens=4
            )
            chat = answer.choices[0].message.content or ""
            completion = await client.completions.create(model="m", prompt="hello", max_tokens=4)
            text = completion.choices[0].text
        await client.close()
        counts = await judged(proxy)
    assert (chat, text) == (TEXT, TEXT)
    assert counts == (2, 0)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_openai_responses(api_backends: dict[str, BackendProcess], stream: bool) -> None:
    async with proxy_for(api_backends["responses"], "responses") as proxy:
        client = openai_client(proxy)
        if stream:
            events = await client.responses.create(
                model="m", input="hello there", max_output_tokens=4, stream=True
            )
            kinds, text = [], ""
            async for event in events:
                kinds.append(event.type)
                if event.type == "response.output_text.delta":
                    text += event.delta
            assert kinds[-1] == "response.incomplete"
        else:
            response = await client.responses.create(
                model="m", input="hello there", max_output_tokens=4
            )
            text = response.output_text
            assert response.usage is not None
            assert response.usage.output_tokens == 4
        await client.close()
        counts = await judged(proxy)
    assert text == TEXT
    assert counts == (1, 0)


async def test_anthropic_messages_and_messages_stream(
    api_backends: dict[str, BackendProcess],
) -> None:
    async with proxy_for(api_backends["anthropic"], "anthropic") as proxy:
        client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
        message = await client.messages.create(model="m", max_tokens=4, messages=MESSAGES)
        async with client.messages.stream(model="m", max_tokens=4, messages=MESSAGES) as stream:
            streamed = "".join([text async for text in stream.text_stream])
            final = await stream.get_final_message()
        await client.close()
        counts = await judged(proxy)
    assert message.content[0].type == "text"
    assert (message.content[0].text, message.stop_reason) == (TEXT, "max_tokens")
    assert message.usage.output_tokens == 4
    assert streamed == TEXT
    assert (final.stop_reason, final.usage.input_tokens, final.usage.output_tokens) == (
        "max_tokens",
        2,
        4,
    )
    assert counts == (2, 0)


async def read_stream(client: anthropic.AsyncAnthropic) -> None:
    async with client.messages.stream(model="m", max_tokens=4, messages=MESSAGES) as stream:
        async for _ in stream.text_stream:
            pass


async def test_anthropic_client_sees_a_failed_stream_as_its_error(
    api_backends: dict[str, BackendProcess],
) -> None:
    async with proxy_for(api_backends["anthropic"], "anthropic") as proxy:
        client = anthropic.AsyncAnthropic(
            base_url=proxy.url,
            api_key="x",
            max_retries=0,
            default_headers={"x-fake-stream-error": "1"},
        )
        with pytest.raises(anthropic.APIStatusError, match="generation failed"):
            await read_stream(client)
        await client.close()
        counts = await judged(proxy)
    assert counts == (1, 1)


async def test_ollama_chat_and_generate(api_backends: dict[str, BackendProcess]) -> None:
    async with (
        proxy_for(api_backends["ollama"], "ollama") as proxy,
        ollama.AsyncClient(host=proxy.url) as client,
    ):
        options = {"num_predict": 4}
        chat = await client.chat(model="m", messages=MESSAGES, options=options, stream=False)
        parts = await client.chat(model="m", messages=MESSAGES, options=options, stream=True)
        streamed = [part async for part in parts]
        generated = await client.generate(model="m", prompt="hello", options=options)
        pieces = await client.generate(model="m", prompt="hello", options=options, stream=True)
        generated_streamed = "".join([piece.response or "" async for piece in pieces])
        counts = await judged(proxy)
    assert chat.message.content == TEXT
    assert (chat.done, chat.done_reason, chat.eval_count) == (True, "length", 4)
    assert "".join(part.message.content or "" for part in streamed) == TEXT
    assert streamed[-1].done is True
    assert (generated.response, generated_streamed) == (TEXT, TEXT)
    assert counts == (4, 0)
