"""Sticky assignment through the HTTP port, against real fake-backend processes (SPEC §4)."""

from __future__ import annotations

import asyncio
import itertools
import json

import aiohttp
import mmh3
import openai
import pytest

from tests.conftest import Backends
from tests.harness import proxy_yaml, running_proxy

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


def formula(salt: str, key: str, weight: float) -> str:
    bucket = mmh3.hash(f"{salt}:{key}", 0, signed=False) % 10000
    return "canary" if bucket < round(weight * 100) else "stable"


async def variants_of(url: str, keys: list[str], header: str = "x-user-id") -> dict[str, str]:
    """The variant each key was served by, read from x-canary-variant and the answering model."""
    connector = aiohttp.TCPConnector(limit=32)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(key: str) -> tuple[str, str]:
            async with session.post(
                f"{url}/v1/chat/completions", json=CHAT, headers={header: key}
            ) as response:
                body = await response.json()
                variant = response.headers["x-canary-variant"]
                assert body["model"] == f"m-{variant}", "the header must say who really answered"
                return key, variant

        return dict(await asyncio.gather(*(one(k) for k in keys)))


async def test_thousands_of_keys_get_exactly_the_formula_variant(backends: Backends) -> None:
    config = proxy_yaml(
        backends.stable.url,
        backends.canary.url,
        route="sticky: {keys: [header:x-user-id], salt: s-2026}\nrollout: {weight: 37.5}",
    )
    keys = [f"user-{i}" for i in range(3000)]
    async with running_proxy(config) as proxy:
        served = await variants_of(proxy.url, keys)
    expected = {key: formula("s-2026", key, 37.5) for key in keys}
    assert served == expected
    assert 0.34 < list(served.values()).count("canary") / len(keys) < 0.41


async def test_raising_the_weight_only_moves_users_from_stable_to_canary(
    backends: Backends,
) -> None:
    keys = [f"ramp-{i}" for i in range(800)]
    served: dict[float, dict[str, str]] = {}
    for weight in (1, 10, 25, 50, 100):
        config = proxy_yaml(
            backends.stable.url, backends.canary.url, route=f"rollout: {{weight: {weight}}}"
        )
        async with running_proxy(config) as proxy:
            served[weight] = await variants_of(proxy.url, keys)
    weights = sorted(served)
    for low, high in itertools.pairwise(weights):
        canary_low = {k for k, v in served[low].items() if v == "canary"}
        canary_high = {k for k, v in served[high].items() if v == "canary"}
        assert canary_low <= canary_high, f"a canary user moved back between {low}% and {high}%"
        assert len(canary_high) > len(canary_low)
    assert set(served[100].values()) == {"canary"}


def request_carrying(source: str, key: str) -> dict[str, object]:
    """aiohttp request arguments that carry `key` in `source` and no other key."""
    if source == "header":
        return {"json": CHAT, "headers": {"x-user-id": key}}
    if source == "body":
        return {"json": {**CHAT, "user": key}}
    if source == "cookie":
        return {"json": CHAT, "headers": {"Cookie": f"uid={key}"}}
    if source == "query":
        return {"json": CHAT, "params": {"u": key}}
    if source == "auth":
        return {"json": CHAT, "headers": {"Authorization": f"Bearer {key}"}}
    # ip: the proxy trusts 127.0.0.1, so the client is the rightmost untrusted hop.
    return {"json": CHAT, "headers": {"X-Forwarded-For": f"198.51.100.1, {key}, 127.0.0.1"}}


@pytest.mark.parametrize("source", ["header", "body", "cookie", "query", "auth", "ip"])
async def test_each_key_source_is_read_through_the_port(backends: Backends, source: str) -> None:
    route = (
        "sticky:\n"
        "  keys: [header:x-user-id, body:user, cookie:uid, query:u, auth, ip]\n"
        "  salt: src\n"
        "rollout: {weight: 50}"
    )
    config = proxy_yaml(
        backends.stable.url, backends.canary.url, route=route, top="trusted_proxies: [127.0.0.1]"
    )
    # Sixteen keys per source: a source read wrongly passes with odds of 1 in 65536.
    keys = [f"203.0.113.{i}" if source == "ip" else f"{source}-{i}" for i in range(16)]
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as session:
        for key in keys:
            request = request_carrying(source, key)
            async with session.post(f"{proxy.url}/v1/chat/completions", **request) as response:  # type: ignore[arg-type]
                assert response.status == 200
                assert response.headers["x-canary-variant"] == formula("src", key, 50), key


async def test_body_user_field_is_the_key_for_the_openai_client(backends: Backends) -> None:
    config = proxy_yaml(
        backends.stable.url,
        backends.canary.url,
        route="sticky: {keys: [body:user], salt: oa}\nrollout: {weight: 50}",
    )
    async with running_proxy(config) as proxy:
        client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0)
        for user in ("alice", "bob", "carol", "dave", "erin", "frank"):
            raw = await client.chat.completions.with_raw_response.create(
                model="any", messages=[{"role": "user", "content": "hi"}], user=user
            )
            completion = raw.parse()
            variant = raw.headers["x-canary-variant"]
            assert variant == formula("oa", user, 50)
            assert completion.model == f"m-{variant}"
            assert raw.headers["x-request-id"]
        await client.close()


async def test_override_header_forces_a_variant(backends: Backends) -> None:
    config = proxy_yaml(
        backends.stable.url,
        backends.canary.url,
        route="override_header: x-canary\nrollout: {weight: 0}",
    )
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as session:
        url = f"{proxy.url}/v1/chat/completions"
        async with session.post(url, json=CHAT, headers={"x-canary": "always"}) as response:
            assert response.headers["x-canary-variant"] == "canary"
        async with session.post(
            url, json=CHAT, headers={"x-canary": "never", "x-user-id": "u"}
        ) as response:
            assert response.headers["x-canary-variant"] == "stable"


async def test_cohort_keeps_excluded_and_non_included_users_on_stable(backends: Backends) -> None:
    route = (
        "cohort:\n"
        '  include: {"header:x-tier": [beta]}\n'
        '  exclude: {"body:org": [acme]}\n'
        "rollout: {weight: 100}"
    )
    config = proxy_yaml(backends.stable.url, backends.canary.url, route=route)
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as session:
        url = f"{proxy.url}/v1/chat/completions"
        cases = [
            ({"x-tier": "beta"}, {}, "canary"),
            ({"x-tier": "free"}, {}, "stable"),
            ({}, {}, "stable"),
            ({"x-tier": "beta"}, {"org": "acme"}, "stable"),
        ]
        for headers, extra, expected in cases:
            headers = {"x-user-id": "u", **headers}
            async with session.post(url, json={**CHAT, **extra}, headers=headers) as response:
                assert response.headers["x-canary-variant"] == expected, (headers, extra)


async def test_anonymous_stable_keeps_keyless_requests_on_stable(backends: Backends) -> None:
    config = proxy_yaml(
        backends.stable.url,
        backends.canary.url,
        route="sticky: {keys: [header:x-user-id], anonymous: stable}\nrollout: {weight: 100}",
    )
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as session:
        for _ in range(20):
            async with session.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as response:
                assert response.headers["x-canary-variant"] == "stable"


async def test_anonymous_random_sends_keyless_requests_to_both(backends: Backends) -> None:
    config = proxy_yaml(
        backends.stable.url,
        backends.canary.url,
        route="sticky: {keys: [header:x-user-id], anonymous: random}\nrollout: {weight: 50}",
    )
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as session:
        seen = set()
        for _ in range(60):
            async with session.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as response:
                seen.add(response.headers["x-canary-variant"])
        assert seen == {"stable", "canary"}


async def test_routes_match_by_path_prefix_and_body_model(backends: Backends) -> None:
    config = (
        "listen: 127.0.0.1:0\n"
        "admin: {listen: 127.0.0.1:0}\n"
        "backends:\n"
        f"  v1: {{url: {backends.stable.url}}}\n"
        f"  v2: {{url: {backends.canary.url}}}\n"
        "routes:\n"
        "  - {name: big, match: {path_prefix: /v1/, models: [big-model]}, stable: v2, canary: v2}\n"
        "  - {name: rest, match: {path_prefix: /v1/}, stable: v1, canary: v1}\n"
    )
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as session:
        url = f"{proxy.url}/v1/chat/completions"
        async with session.post(url, json={**CHAT, "model": "big-model"}) as response:
            assert (await response.json())["model"] == "m-canary"
        async with session.post(url, json={**CHAT, "model": "small"}) as response:
            assert (await response.json())["model"] == "m-stable"
        async with session.get(f"{proxy.url}/v1/models") as response:
            models = json.loads(await response.read())
            assert models["data"][0]["id"] == "m-stable"
        async with session.get(f"{proxy.url}/health") as response:
            assert response.status == 404
