"""Every status the proxy makes itself, backends' own errors, and fallback (SPEC §5)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest
from multidict import CIMultiDictProxy

from tests.conftest import Backends
from tests.harness import BackendProcess, proxy_yaml, refused_port, running_proxy, start_backend

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def failing_canary() -> Iterator[BackendProcess]:
    backend = start_backend("m-failing", "--error-rate", "1.0", "--seed", "1")
    yield backend
    backend.stop()


async def post(url: str, **kwargs: Any) -> tuple[int, CIMultiDictProxy[str], bytes]:
    async with aiohttp.ClientSession() as session, session.post(url, **kwargs) as response:
        return response.status, response.headers, await response.read()


def assert_proxy_error(status: int, headers: CIMultiDictProxy[str], body: bytes, code: str) -> None:
    assert headers["Content-Type"] == "application/json"
    assert headers["x-request-id"]
    error = json.loads(body)["error"]
    assert error["type"] == "proxy_error"
    assert error["code"] == code
    assert error["message"]


async def test_400_when_a_body_that_must_be_read_is_not_json(backends: Backends) -> None:
    config = proxy_yaml(backends.stable.url, backends.canary.url, route="match: {models: [m1]}")
    async with running_proxy(config) as proxy:
        status, headers, body = await post(
            f"{proxy.url}/v1/chat/completions", data=b"{not json", headers={"x-user-id": "u"}
        )
    assert status == 400
    assert_proxy_error(status, headers, body, "bad_json")


async def test_a_body_that_need_not_be_read_is_not_judged(backends: Backends) -> None:
    config = proxy_yaml(backends.stable.url, backends.canary.url)
    async with running_proxy(config) as proxy:
        status, _, body = await post(
            f"{proxy.url}/v1/chat/completions", data=b"{not json", headers={"x-user-id": "u"}
        )
    # The backend, not the proxy, says it is bad JSON.
    assert status == 400
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


async def test_404_when_no_route_matches(backends: Backends) -> None:
    config = proxy_yaml(
        backends.stable.url, backends.canary.url, route="match: {path_prefix: /v1/}"
    )
    async with running_proxy(config) as proxy:
        client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v2", api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError) as raised:
            await client.models.list()
        await client.close()
    assert raised.value.code == "no_route"
    assert "no route for GET /v2/models" in raised.value.message


@pytest.mark.parametrize("chunked", [False, True])
async def test_413_when_the_body_is_over_the_limit(backends: Backends, chunked: bool) -> None:
    config = proxy_yaml(
        backends.stable.url, backends.canary.url, top="limits: {max_body_bytes: 1000}"
    )
    payload = json.dumps({**CHAT, "pad": "x" * 2000}).encode()

    async def chunks() -> Any:
        for start in range(0, len(payload), 500):
            yield payload[start : start + 500]

    await backends.stable.clear()
    async with running_proxy(config) as proxy:
        status, headers, body = await post(
            f"{proxy.url}/v1/chat/completions",
            data=chunks() if chunked else payload,
            headers={"x-user-id": "u"},
        )
    assert status == 413
    assert_proxy_error(status, headers, body, "body_too_large")
    assert await backends.stable.requests() == [], "an oversize body must not be forwarded"


async def test_502_when_the_backend_is_unreachable(backends: Backends) -> None:
    dead = f"http://127.0.0.1:{refused_port()}"
    async with running_proxy(proxy_yaml(dead, backends.canary.url)) as proxy:
        status, headers, body = await post(
            f"{proxy.url}/v1/chat/completions", json=CHAT, headers={"x-user-id": "u"}
        )
    assert status == 502
    assert_proxy_error(status, headers, body, "upstream_unreachable")
    assert headers["x-canary-variant"] == "stable"


@pytest.mark.parametrize(
    "fault",
    [
        {"x-fake-garbage": "1"},
        {"x-fake-reset": "before-headers"},
        {"x-fake-reset": "after-headers"},
    ],
)
async def test_502_when_the_backend_breaks_the_protocol(
    backends: Backends, fault: dict[str, str]
) -> None:
    async with running_proxy(proxy_yaml(backends.stable.url, backends.canary.url)) as proxy:
        status, headers, body = await post(
            f"{proxy.url}/v1/chat/completions", json=CHAT, headers={"x-user-id": "u", **fault}
        )
    assert status == 502
    assert_proxy_error(status, headers, body, "upstream_protocol_error")


async def test_503_with_retry_after_past_max_concurrency(backends: Backends) -> None:
    config = proxy_yaml(
        backends.stable.url, backends.canary.url, top="limits: {max_concurrency: 1}"
    )
    async with running_proxy(config) as proxy:
        url = f"{proxy.url}/v1/chat/completions"
        hanging = asyncio.create_task(post(url, json=CHAT, headers={"x-fake-hang": "1"}))
        await asyncio.sleep(0.3)
        status, headers, body = await post(url, json=CHAT)
        hanging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hanging
        # Once the slot is free again, requests pass.
        await asyncio.sleep(0.2)
        after, _, _ = await post(url, json=CHAT)
    assert status == 503
    assert headers["Retry-After"] == "1"
    assert_proxy_error(status, headers, body, "overloaded")
    assert after == 200


async def test_504_when_the_backend_sends_nothing_within_first_byte(backends: Backends) -> None:
    config = proxy_yaml(
        backends.stable.url, backends.canary.url, backend="timeouts: {first_byte: 300ms}"
    )
    async with running_proxy(config) as proxy:
        client = openai.AsyncOpenAI(
            base_url=f"{proxy.url}/v1",
            api_key="x",
            max_retries=0,
            default_headers={"x-fake-latency": "3"},
        )
        with pytest.raises(openai.APIStatusError) as raised:
            await client.chat.completions.create(model="m", messages=[])
        await client.close()
    assert raised.value.status_code == 504
    assert raised.value.code == "upstream_timeout"


async def test_504_when_a_stream_sends_no_first_token_within_first_byte(backends: Backends) -> None:
    config = proxy_yaml(
        backends.stable.url, backends.canary.url, backend="timeouts: {first_byte: 300ms}"
    )
    async with running_proxy(config) as proxy:
        status, headers, body = await post(
            f"{proxy.url}/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={"x-fake-ttft": "3"},
        )
    # The head arrived at once, but the first byte of the body did not.
    assert status == 504
    assert_proxy_error(status, headers, body, "upstream_timeout")


@pytest.mark.parametrize("code", ["400", "429", "500", "503"])
async def test_a_backends_own_error_passes_through_untouched(backends: Backends, code: str) -> None:
    async with running_proxy(proxy_yaml(backends.stable.url, backends.canary.url)) as proxy:
        status, headers, body = await post(
            f"{proxy.url}/v1/chat/completions", json=CHAT, headers={"x-fake-status": code}
        )
    assert status == int(code)
    assert headers["x-fake-model"] == "m-stable"
    assert json.loads(body)["error"]["code"] == "fake_status"


async def test_fallback_serves_stable_when_the_canary_fails(
    backends: Backends, failing_canary: BackendProcess
) -> None:
    config = proxy_yaml(
        backends.stable.url,
        failing_canary.url,
        route="fallback_to_stable: true\nrollout: {weight: 100}",
    )
    async with running_proxy(config) as proxy:
        client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], user="u"
        )
        await client.close()
    assert raw.parse().model == "m-stable"
    assert raw.headers["x-canary-variant"] == "stable"
    # The canary's failure is not hidden: it says why, and the canary saw the request fail.
    assert raw.headers["x-canary-fallback"] == "500"
    stats = await failing_canary.stats()
    assert stats["requests"] == 1
    assert stats["errors"] == 1


@pytest.mark.parametrize(
    ("canary_fault", "backend_lines", "why"),
    [
        (None, "", "connect_error"),  # the canary is not listening at all
        ({"x-fake-hang": "1"}, "timeouts: {first_byte: 300ms}", "timeout"),
        ({"x-fake-ttft": "3"}, "timeouts: {first_byte: 300ms}", "timeout"),
        ({"x-fake-reset": "before-headers"}, "", "protocol_error"),
        ({"x-fake-reset": "after-headers"}, "", "protocol_error"),
        ({"x-fake-status": "429"}, "", "429"),
        ({"x-fake-status": "503"}, "", "503"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_fallback_covers_every_failure_before_the_first_byte(
    backends: Backends,
    canary_fault: dict[str, str] | None,
    backend_lines: str,
    why: str,
    stream: bool,
) -> None:
    canary = backends.canary.url if canary_fault else f"http://127.0.0.1:{refused_port()}"
    config = proxy_yaml(
        backends.stable.url,
        canary,
        route="fallback_to_stable: true\nrollout: {weight: 100}",
        backend=backend_lines,
    )
    # x-fake-only puts the fault on the canary alone; the stable attempt gets the same
    # headers and must answer normally.
    headers = {"x-user-id": "u", "x-fake-only": "m-canary", **(canary_fault or {})}
    async with running_proxy(config) as proxy:
        status, response_headers, body = await post(
            f"{proxy.url}/v1/chat/completions", json={**CHAT, "stream": stream}, headers=headers
        )
    assert status == 200, body
    assert response_headers["x-canary-variant"] == "stable"
    assert response_headers["x-canary-fallback"] == why
    if stream:
        assert b'"model":"m-stable"' in body
        assert body.rstrip().endswith(b"data: [DONE]")
    else:
        assert json.loads(body)["model"] == "m-stable"


async def test_fallback_resends_the_body_with_the_stable_model(backends: Backends) -> None:
    config = proxy_yaml(
        backends.stable.url,
        backends.canary.url,
        route=(
            "fallback_to_stable: true\n"
            "model_rewrite: {stable: model-a, canary: model-b}\n"
            "rollout: {weight: 100}"
        ),
    )
    await backends.stable.clear()
    await backends.canary.clear()
    headers = {"x-user-id": "u", "x-fake-only": "m-canary", "x-fake-status": "500"}
    body = {**CHAT, "model": "asked", "extra": "é" * 10}
    async with running_proxy(config) as proxy:
        status, _, _ = await post(f"{proxy.url}/v1/chat/completions", json=body, headers=headers)
    assert status == 200
    (to_canary,) = await backends.canary.requests()
    (to_stable,) = await backends.stable.requests()
    assert json.loads(to_canary["body"]) == {**body, "model": "model-b"}
    assert json.loads(to_stable["body"]) == {**body, "model": "model-a"}


async def test_no_fallback_without_fallback_to_stable(
    backends: Backends, failing_canary: BackendProcess
) -> None:
    config = proxy_yaml(backends.stable.url, failing_canary.url, route="rollout: {weight: 100}")
    async with running_proxy(config) as proxy:
        status, headers, _ = await post(
            f"{proxy.url}/v1/chat/completions", json=CHAT, headers={"x-user-id": "u"}
        )
    assert status == 500
    assert headers["x-canary-variant"] == "canary"
    assert "x-canary-fallback" not in headers
