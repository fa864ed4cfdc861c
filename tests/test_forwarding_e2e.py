"""What the backend receives and what the client gets back (SPEC §5), as seen on the wire."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tests.conftest import Backends
from tests.harness import proxy_yaml, running_proxy

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def header_values(recorded: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in recorded["headers"] if key.lower() == name.lower()]


async def raw_exchange(port: int, request: bytes, *, read_until_close: bool = True) -> bytes:
    """Send raw bytes to 127.0.0.1:port and return what came back until the server closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(-1), timeout=10)
    writer.close()
    await writer.wait_closed()
    return data


async def test_hop_by_hop_headers_do_not_reach_the_backend(backends: Backends) -> None:
    async with running_proxy(proxy_yaml(backends.stable.url, backends.canary.url)) as proxy:
        await backends.stable.clear()
        body = json.dumps(CHAT).encode()
        request = (
            b"POST /v1/chat/completions?a=1&b=%20x HTTP/1.1\r\n"
            b"Host: public.example\r\n"
            b"Connection: close, X-Hop\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"TE: trailers\r\n"
            b"Upgrade: h2c\r\n"
            b"Proxy-Authorization: Basic abc\r\n"
            b"X-Hop: must not pass\r\n"
            b"X-End-To-End: passes\r\n"
            b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n"
            b"X-Multi: one\r\n"
            b"X-Multi: two\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        response = await raw_exchange(proxy.server.port or 0, request)
        assert response.startswith(b"HTTP/1.1 200")
        (recorded,) = await backends.stable.requests()
    names = {name.lower() for name, _ in recorded["headers"]}
    for hop in ("connection", "keep-alive", "te", "upgrade", "proxy-authorization", "x-hop"):
        assert hop not in names, hop
    assert header_values(recorded, "x-end-to-end") == ["passes"]
    assert header_values(recorded, "traceparent") == [
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    ]
    assert header_values(recorded, "x-multi") == ["one", "two"]
    assert header_values(recorded, "host") == [f"127.0.0.1:{backends.stable.port}"]
    assert header_values(recorded, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(recorded, "x-forwarded-proto") == ["http"]
    assert header_values(recorded, "x-forwarded-host") == ["public.example"]
    assert recorded["path"] == "/v1/chat/completions?a=1&b=%20x"
    assert json.loads(recorded["body"]) == CHAT


async def test_the_proxy_adds_no_headers_the_client_did_not_send(backends: Backends) -> None:
    async with running_proxy(proxy_yaml(backends.stable.url, backends.canary.url)) as proxy:
        await backends.stable.clear()
        body = json.dumps(CHAT).encode()
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        await raw_exchange(proxy.server.port or 0, request)
        (recorded,) = await backends.stable.requests()
    names = sorted(name.lower() for name, _ in recorded["headers"])
    assert names == [
        "content-length",
        "host",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-request-id",
    ]


async def test_api_key_env_replaces_the_clients_authorization(backends: Backends) -> None:
    config = proxy_yaml(
        backends.stable.url, backends.canary.url, backend="api_key_env: TEST_BACKEND_KEY"
    )
    async with running_proxy(config, environ={"TEST_BACKEND_KEY": "sk-backend"}) as proxy:
        await backends.stable.clear()
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{proxy.url}/v1/chat/completions",
                json=CHAT,
                headers={"Authorization": "Bearer client-key"},
            ) as response,
        ):
            assert response.status == 200
        (recorded,) = await backends.stable.requests()
    assert header_values(recorded, "authorization") == ["Bearer sk-backend"]


async def test_without_api_key_env_the_clients_authorization_passes(backends: Backends) -> None:
    async with running_proxy(proxy_yaml(backends.stable.url, backends.canary.url)) as proxy:
        await backends.stable.clear()
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{proxy.url}/v1/chat/completions",
                json=CHAT,
                headers={"Authorization": "Bearer client-key"},
            ),
        ):
            pass
        (recorded,) = await backends.stable.requests()
    assert header_values(recorded, "authorization") == ["Bearer client-key"]


async def test_model_rewrite_changes_only_the_model_for_that_variant(backends: Backends) -> None:
    config = proxy_yaml(
        backends.stable.url,
        backends.canary.url,
        route="model_rewrite: {canary: llama-3.1-8b}\nrollout: {weight: 50}",
    )
    body = {**CHAT, "model": "llama-3-8b", "temperature": 0.5}
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as session:
        await backends.stable.clear()
        await backends.canary.clear()
        url = f"{proxy.url}/v1/chat/completions"
        for i in range(40):
            async with session.post(url, json=body, headers={"x-user-id": f"user-{i}"}):
                pass
        to_canary = await backends.canary.requests()
        to_stable = await backends.stable.requests()
    assert to_canary
    assert to_stable
    assert {json.loads(r["body"])["model"] for r in to_canary} == {"llama-3.1-8b"}
    assert {json.loads(r["body"])["model"] for r in to_stable} == {"llama-3-8b"}
    assert all(json.loads(r["body"])["temperature"] == 0.5 for r in to_canary)


async def test_request_id_is_kept_or_made_and_reaches_the_backend(backends: Backends) -> None:
    async with running_proxy(proxy_yaml(backends.stable.url, backends.canary.url)) as proxy:
        await backends.stable.clear()
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{proxy.url}/v1/chat/completions", json=CHAT, headers={"x-request-id": "abc-123"}
            ) as response:
                assert response.headers.getall("x-request-id") == ["abc-123"]
            made = []
            for _ in range(3):
                async with session.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as response:
                    made.append(response.headers["x-request-id"])
        recorded = await backends.stable.requests()
    assert len(set(made)) == 3, "each request gets its own id"
    assert [header_values(r, "x-request-id") for r in recorded] == [[i] for i in ["abc-123", *made]]


async def test_a_large_body_passes_intact_in_both_directions(backends: Backends) -> None:
    payload = {**CHAT, "pad": "z" * 300_000}
    async with running_proxy(proxy_yaml(backends.stable.url, backends.canary.url)) as proxy:
        await backends.stable.clear()
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{proxy.url}/v1/chat/completions", json=payload, headers={"x-user-id": "u"}
            ) as response,
        ):
            assert response.status == 200
            await response.read()
        (recorded,) = await backends.stable.requests()
    sent = json.dumps(payload)
    assert header_values(recorded, "content-length") == [str(len(sent))]
    # The journal keeps the first 64 KiB of a body.
    assert sent.startswith(recorded["body"])
    assert len(recorded["body"]) == 64 * 1024


async def test_expect_100_continue_is_answered(backends: Backends) -> None:
    async with running_proxy(proxy_yaml(backends.stable.url, backends.canary.url)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
        body = json.dumps(CHAT).encode()
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\nConnection: close\r\n"
            b"Expect: 100-continue\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(body)
        rest = await asyncio.wait_for(reader.read(-1), timeout=5)
        writer.close()
        await writer.wait_closed()
    assert rest.startswith(b"HTTP/1.1 200")


async def test_backend_base_path_prefixes_every_request(backends: Backends) -> None:
    config = proxy_yaml(f"{backends.stable.url}/base", backends.canary.url)
    async with running_proxy(config) as proxy:
        await backends.stable.clear()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{proxy.url}/v1/models") as response,
        ):
            assert response.status == 404  # the fake backend has no /base/v1/models
        (recorded,) = await backends.stable.requests()
    assert recorded["path"] == "/base/v1/models"


async def test_methods_pass_through(backends: Backends) -> None:
    async with running_proxy(proxy_yaml(backends.stable.url, backends.canary.url)) as proxy:
        await backends.stable.clear()
        async with aiohttp.ClientSession() as session:
            for method in ("GET", "DELETE", "PUT", "PATCH", "OPTIONS"):
                async with session.request(method, f"{proxy.url}/v1/files/x"):
                    pass
        recorded = await backends.stable.requests()
    assert [r["method"] for r in recorded] == ["GET", "DELETE", "PUT", "PATCH", "OPTIONS"]
