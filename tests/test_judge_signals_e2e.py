"""The judge's user and resource checks end to end: a canary its users rate badly
(`POST /v1/feedback`), and one answering four times as long as stable, are rolled back
through the HTTP port, with the check's numbers in the decision."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import (
    RunningProxy,
    auto_rollout,
    eventually,
    proxy_yaml,
    running_proxy_file,
    start_backend,
    sticky,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def write_config(path: Path, stable: str, canary: str, checks: str) -> None:
    rollout = auto_rollout(0, steps="[50, 100]", min_requests=20, checks=checks)
    path.write_text(
        proxy_yaml(
            stable,
            canary,
            route=sticky("signals") + rollout,
            top=f"state: {{path: '{path.parent / 'state.db'}'}}",
        )
    )


@contextlib.asynccontextmanager
async def users(url: str, rate: bool) -> AsyncIterator[None]:
    """Users chatting until the block ends; with `rate`, each rates the answer: thumbs
    down for the canary's, thumbs up for stable's."""
    stop = asyncio.Event()

    async def run(offset: int) -> None:
        async with aiohttp.ClientSession() as session:
            n = offset
            while not stop.is_set():
                n += 1
                headers = {"x-user-id": f"user-{n}"}
                async with session.post(
                    f"{url}/v1/chat/completions", json=CHAT, headers=headers
                ) as response:
                    await response.read()
                    request_id = response.headers["x-request-id"]
                    variant = response.headers["x-canary-variant"]
                if rate:
                    score = -1 if variant == "canary" else 1
                    body = json.dumps({"request_id": request_id, "score": score}).encode()
                    async with session.post(f"{url}/v1/feedback", data=body) as response:
                        assert response.status == 200, await response.read()
                await asyncio.sleep(0.004)

    tasks = [asyncio.create_task(run(k * 1_000_000)) for k in range(2)]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def rolled_back(proxy: RunningProxy) -> dict[str, Any]:
    url = f"http://127.0.0.1:{proxy.server.admin_port}/api/status"

    async def probe() -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            route: dict[str, Any] = (await response.json())["routes"][0]
            return route

    route: dict[str, Any] = await eventually(
        "the rollout rolled back",
        probe,
        holds=lambda found: found["rollout"]["status"] == "rolled_back",
        timeout_s=20,
        interval_s=0.2,
    )
    return route


@pytest.mark.timeout(45)
async def test_a_canary_users_rate_badly_is_rolled_back(tmp_path: Path) -> None:
    stable, canary = start_backend("m-stable"), start_backend("m-canary")
    try:
        path = tmp_path / "proxy.yaml"
        write_config(path, stable.url, canary.url, "feedback_negative_rate: {max_increase: 0.1}")
        async with running_proxy_file(str(path)) as proxy, users(proxy.url, rate=True):
            route = await rolled_back(proxy)
    finally:
        stable.stop()
        canary.stop()
    (check,) = route["rollout"]["decisions"][0]["judgement"]["checks"]
    assert (check["check"], check["verdict"]) == ("feedback_negative_rate", "fail")
    assert (check["canary"], check["stable"]) == (1.0, 0.0)
    assert "negative feedback rate 100.00%" in check["reason"]
    assert route["weight"] == 0


@pytest.mark.timeout(45)
async def test_a_canary_answering_four_times_as_long_is_rolled_back(tmp_path: Path) -> None:
    stable = start_backend("m-stable", "--tokens", "16")
    canary = start_backend("m-canary", "--tokens", "64")
    try:
        path = tmp_path / "proxy.yaml"
        write_config(path, stable.url, canary.url, "output_tokens_ratio: {max: 1.5}")
        async with running_proxy_file(str(path)) as proxy, users(proxy.url, rate=False):
            route = await rolled_back(proxy)
    finally:
        stable.stop()
        canary.stop()
    (check,) = route["rollout"]["decisions"][0]["judgement"]["checks"]
    assert (check["check"], check["verdict"]) == ("output_tokens_ratio", "fail")
    assert (check["canary"], check["stable"], check["limit"]) == (64.0, 16.0, 24.0)
    assert "output tokens per answer 64.0" in check["reason"]
    assert "beyond 1.5x stable" in check["reason"]
    variants = route["variants"]
    assert variants["canary"]["output_tokens_per_request"] == 64
    assert variants["stable"]["output_tokens_per_request"] == 16
