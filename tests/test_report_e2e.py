"""`canary-proxy report` and GET /api/routes/{name}/report against a running proxy: a
ramping canary's report over its rollout, a manual split's over a window, and the
errors a user can meet (an unknown route, a route with no requests yet)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Backends
from tests.harness import (
    RunningProxy,
    auto_rollout,
    eventually,
    proxy_yaml,
    run_cli,
    running_proxy_file,
    sticky,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def chats(url: str, count: int) -> None:
    async with aiohttp.ClientSession() as session:
        for n in range(count):
            async with session.post(
                f"{url}/v1/chat/completions", json=CHAT, headers={"x-user-id": f"user-{n}"}
            ) as response:
                assert response.status == 200
                await response.read()


def admin_url(proxy: RunningProxy) -> str:
    return f"http://127.0.0.1:{proxy.server.admin_port}"


def write(path: Path, backends: Backends, route: str) -> None:
    path.write_text(
        proxy_yaml(
            backends.stable.url,
            backends.canary.url,
            route=sticky("report") + route,
            top=f"state: {{path: '{path.parent / 'state.db'}'}}",
        )
    )


@pytest.mark.timeout(40)
async def test_a_ramping_canary_is_reported_over_its_rollout(
    backends: Backends, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    # It stays at its first step (min_requests is out of reach): a canary at 50%.
    write(path, backends, auto_rollout(0, steps="[50, 100]", min_requests=100_000))
    async with running_proxy_file(str(path)) as proxy:
        admin = admin_url(proxy)
        # The rollout's evidence starts at the first whole second after it began.
        await asyncio.sleep(1.05 - time.time() % 1.0)
        await chats(proxy.url, 200)

        async def report() -> Any:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{admin}/api/routes/chat/report") as response,
            ):
                return response.status, await response.json()

        # Once judged, the report is over the rollout: the judge's totals and the
        # slices since.
        _, document = await eventually(
            "a report over the rollout",
            report,
            holds=lambda found: found[0] == 200 and found[1]["source"] == "rollout",
            timeout_s=10,
            interval_s=0.2,
        )
        code, out, err = await run_cli("report", "--route", "chat", "--admin", admin)
        json_code, json_out, _ = await run_cli(
            "report", "--route", "chat", "--admin", admin, "--json"
        )
    assert (code, err) == (0, "")
    assert json_code == 0
    assert json.loads(json_out)["source"] == "rollout"
    variants = document["variants"]
    assert variants["stable"]["requests"] + variants["canary"]["requests"] == 200
    assert 50 < variants["canary"]["requests"] < 150
    assert document["status"] == "progressing"
    assert document["weight"] == 50
    signals = {s["signal"]: s for s in document["signals"]}
    assert signals["error_rate"]["difference"]["value"] == 0.0
    assert (
        signals["error_rate"]["difference"]["low"] < 0 < signals["error_rate"]["difference"]["high"]
    )
    tokens = signals["output_tokens_per_answer"]
    assert (tokens["stable"]["value"], tokens["canary"]["value"]) == (4.0, 4.0)
    assert tokens["ratio"]["value"] == 1.0
    latency = signals["latency_p50"]["ratio"]
    assert latency["low"] < latency["value"] < latency["high"]
    lines = out.splitlines()
    assert lines[0].startswith("route chat: canary v2 at 50% (progressing) against stable v1")
    assert "since the rollout began" in lines[0]
    assert any(line.startswith("error rate") and "+0.00pp [" in line for line in lines)
    assert any(line.startswith("output tokens per answer") and "x1.000" in line for line in lines)
    assert "fixed-sample" in lines[-1]


@pytest.mark.timeout(40)
async def test_report_errors_say_what_is_wrong(backends: Backends, tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    write(path, backends, "rollout: {weight: 50}\n")
    async with running_proxy_file(str(path)) as proxy:
        admin = admin_url(proxy)
        unknown = await run_cli("report", "--route", "nope", "--admin", admin)
        empty = await run_cli("report", "--route", "chat", "--admin", admin, "--window", "60")
        await chats(proxy.url, 40)
        manual = await run_cli("report", "--route", "chat", "--admin", admin, "--json")
    bad_window = await run_cli("report", "--route", "chat", "--admin", admin, "--window", "0")
    assert unknown[0] == 1
    assert unknown[2].strip().endswith("/api/routes/nope/report: no route named 'nope'")
    assert empty[0] == 1
    assert (
        empty[2]
        .strip()
        .endswith("route 'chat' has no requests in the last 60s: nothing to compare yet")
    )
    assert manual[0] == 0, manual[2]
    document = json.loads(manual[1])
    assert (document["source"], document["status"]) == ("window", "manual")
    assert (
        document["variants"]["stable"]["requests"] + document["variants"]["canary"]["requests"]
        == 40
    )
    # The proxy is gone: the CLI says it cannot reach it, in one line.
    assert bad_window[0] == 1
    assert "cannot read" in bad_window[2]
    assert len(bad_window[2].strip().splitlines()) == 1
