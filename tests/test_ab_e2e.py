"""An A/B test end to end: a fixed split from the config file, served through the
HTTP port at its weight however its numbers look, complete at the end of its duration
(or when an operator says so), then reported with confidence intervals."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Backends
from tests.harness import (
    RunningProxy,
    eventually,
    proxy_yaml,
    run_cli,
    running_proxy_file,
    sticky,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def write(path: Path, backends: Backends, ab: str) -> None:
    path.write_text(
        proxy_yaml(
            backends.stable.url,
            backends.canary.url,
            route=sticky("ab") + f"rollout: {{weight: 30, ab: {ab}}}\n",
            top=f"state: {{path: '{path.parent / 'state.db'}'}}",
        )
    )


async def chats(url: str, count: int) -> list[str]:
    """`count` users' requests; the variant that answered each."""
    served = []
    async with aiohttp.ClientSession() as session:
        for n in range(count):
            async with session.post(
                f"{url}/v1/chat/completions", json=CHAT, headers={"x-user-id": f"user-{n}"}
            ) as response:
                assert response.status == 200
                await response.read()
                served.append(response.headers["x-canary-variant"])
    return served


async def admin(proxy: RunningProxy, method: str, path: str) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{proxy.server.admin_port}{path}"
    async with aiohttp.ClientSession() as session, session.request(method, url) as response:
        return response.status, json.loads(await response.read())


async def rollout(proxy: RunningProxy) -> dict[str, Any]:
    _, document = await admin(proxy, "GET", "/api/status")
    found: dict[str, Any] = document["routes"][0]["rollout"]
    return found


@pytest.mark.timeout(40)
async def test_an_ab_test_holds_its_split_completes_on_time_and_reports(
    backends: Backends, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    write(path, backends, "{duration: 5s, interval: 1s}")
    async with running_proxy_file(str(path)) as proxy:
        testing = await rollout(proxy)
        await asyncio.sleep(1.05 - time.time() % 1.0)  # its evidence starts at a whole second
        served = await chats(proxy.url, 100)  # well within the test, even on a busy machine
        done = await eventually(
            "the test complete",
            lambda: rollout(proxy),
            holds=lambda found: found["status"] == "complete",
            timeout_s=12,
            interval_s=0.2,
        )
        # Complete, the split stays: the operator decides what comes next.
        after = await chats(proxy.url, 100)
        code, report = await admin(proxy, "GET", "/api/routes/chat/report")
        code_cli, out, err = await run_cli(
            "report", "--route", "chat", "--admin", f"http://127.0.0.1:{proxy.server.admin_port}"
        )
    assert (testing["status"], testing["step"]) == ("testing", 0)
    assert 0 < testing["ab_left_s"] <= 5
    assert 15 < served.count("canary") < 45  # 30% of 100, by the users' buckets
    assert done["decisions"][0]["action"] == "complete"
    assert done["decisions"][0]["cause"] == "duration"
    assert done["decisions"][0]["weight_after"] == 30
    assert done["decisions"][1]["action"] == "test"
    assert done["ab_left_s"] is None
    assert 15 < after.count("canary") < 50
    assert code == 200
    assert (report["mode"], report["status"], report["weight"]) == ("ab", "complete", 30)
    # The test's requests, not those after it.
    variants = report["variants"]
    assert variants["stable"]["requests"] + variants["canary"]["requests"] == 100
    assert variants["canary"]["requests"] == served.count("canary")
    assert "over the rollout, to its end" in report["headline"]
    assert (code_cli, err) == (0, "")
    assert out.startswith("route chat: canary v2 at 30% (complete)")


@pytest.mark.timeout(40)
async def test_an_operator_completes_a_test_early(backends: Backends, tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    write(path, backends, "{duration: 2h}")
    async with running_proxy_file(str(path)) as proxy:
        await chats(proxy.url, 20)
        table = await run_cli("status", "--admin", f"http://127.0.0.1:{proxy.server.admin_port}")
        pause = await admin(proxy, "POST", "/api/routes/chat/pause")
        complete = await admin(proxy, "POST", "/api/routes/chat/complete")
        again = await admin(proxy, "POST", "/api/routes/chat/complete")
        state = await rollout(proxy)
    assert pause == (409, {"error": "cannot pause route 'chat': it is testing"})
    code, body = complete
    assert (code, body["status"], body["weight"]) == (200, "complete", 30)
    assert body["decisions"][0]["reason"].startswith("A/B test completed by an operator after")
    assert again == (409, {"error": "cannot complete route 'chat': it is complete"})
    assert state["status"] == "complete"
    code, out, _ = table
    (row,) = [line for line in out.splitlines() if line.startswith("chat ")]
    assert code == 0
    assert row.split()[3:6] == ["30%", "testing", "1/1"]
    assert re.search(r"A/B test running, (2h|1h 59m) left$", row), row
    # Nothing ramps: there is nothing to simulate.
    code, _, err = await run_cli("simulate", "-c", str(path), "--route", "chat")
    assert code == 1
    assert err.strip() == (
        "canary-proxy: error: route 'chat' is an A/B test (rollout.ab): nothing ramps to simulate"
    )
