"""The rollout controller end to end: real fake backends, real traffic, 1-second intervals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import mmh3
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import (
    BackendProcess,
    RunningProxy,
    auto_rollout,
    eventually,
    proxy_yaml,
    running_proxy_file,
    start_backend,
    sticky,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def write_config(
    path: Path,
    stable: str,
    canary: str,
    *,
    weight: float = 0,
    steps: str = "[20, 50, 100]",
    min_requests: int = 30,
    checks: str = "error_rate: {max: 0.2, max_increase: 0.05}",
    admin: str = "{listen: 127.0.0.1:0}",
    auto: str = "",
) -> None:
    """`auto`: more lines under `rollout.auto`."""
    rollout = auto_rollout(weight, steps=steps, min_requests=min_requests, checks=checks)
    rollout += "".join(f"    {line}\n" for line in auto.splitlines())
    path.write_text(
        proxy_yaml(
            stable,
            canary,
            route=sticky("ctl") + "override_header: x-canary\n" + rollout,
            top=f"state: {{path: '{path.parent / 'state.db'}'}}",
            admin=admin,
        )
    )


@contextlib.asynccontextmanager
async def steady_traffic(url: str, pace_s: float = 0.004) -> AsyncIterator[list[str]]:
    """Requests from many users until the block ends; yields the variants served."""
    served: list[str] = []
    stop = asyncio.Event()

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            n = 0
            while not stop.is_set():
                n += 1
                async with session.post(
                    f"{url}/v1/chat/completions", json=CHAT, headers={"x-user-id": f"user-{n}"}
                ) as response:
                    await response.read()
                    served.append(response.headers.get("x-canary-variant", "?"))
                await asyncio.sleep(pace_s)

    task = asyncio.create_task(run())
    try:
        yield served
    finally:
        stop.set()
        await task


async def status(proxy: RunningProxy) -> dict[str, Any]:
    document: dict[str, Any] = await admin_json(proxy, "GET", "/api/status")
    return document


async def admin_json(proxy: RunningProxy, method: str, path: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"http://127.0.0.1:{proxy.server.admin_port}{path}"
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers) as response,
    ):
        body = await response.read()
        return json.loads(body) if response.status == 200 else (response.status, body)


def rollout(document: dict[str, Any]) -> dict[str, Any]:
    (route,) = document["routes"]
    return {**route["rollout"], "weight": route["weight"]}


async def current_rollout(proxy: RunningProxy) -> dict[str, Any]:
    return rollout(await status(proxy))


async def wait_for_status(proxy: RunningProxy, wanted: str, timeout_s: float) -> dict[str, Any]:
    return await eventually(
        f"the rollout {wanted}",
        lambda: current_rollout(proxy),
        holds=lambda current: current["status"] == wanted,
        timeout_s=timeout_s,
        interval_s=0.2,
    )


@pytest.mark.timeout(60)
async def test_a_faulty_canary_is_rolled_back_with_an_explained_decision(tmp_path: Path) -> None:
    stable = start_backend("m-stable")
    canary = start_backend("m-canary", "--error-rate", "0.4", "--seed", "3")
    try:
        path = tmp_path / "proxy.yaml"
        write_config(path, stable.url, canary.url)
        async with running_proxy_file(str(path)) as proxy:
            async with steady_traffic(proxy.url) as served:
                state = await wait_for_status(proxy, "rolled_back", timeout_s=20)
                await asyncio.sleep(0.5)
                after = len(served)
                await asyncio.sleep(1.0)
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{proxy.server.admin_port}/metrics") as response,
            ):
                metrics = await response.text()
    finally:
        stable.stop()
        canary.stop()
    assert state["status"] == "rolled_back"
    assert state["weight"] == 0
    decision = state["decisions"][0]
    assert decision["action"] == "rollback"
    assert decision["weight_before"] == 20
    assert decision["weight_after"] == 0
    assert decision["reason"].startswith("rolled back after 1 failing judgement: error rate")
    (check,) = decision["judgement"]["checks"]
    assert check["check"] == "error_rate"
    assert check["verdict"] == "fail"
    assert check["canary"] > 0.2
    assert check["stable"] == 0
    assert check["canary_n"] >= 30
    assert check["stable_n"] > check["canary_n"]
    assert check["limit"] == pytest.approx(0.05)
    # Served at once: nothing reaches the canary after the rollback.
    assert set(served[after:]) == {"stable"}
    decisions = {
        sample.labels["verdict"]: sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "canary_rollout_decisions_total"
    }
    assert decisions["fail"] == 1
    weights = [
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "canary_weight_ratio"
    ]
    assert weights == [0]


@pytest.mark.timeout(60)
async def test_a_healthy_canary_is_promoted_step_by_step(
    tmp_path: Path, pair: tuple[BackendProcess, BackendProcess]
) -> None:
    stable, canary = pair
    path = tmp_path / "proxy.yaml"
    write_config(path, stable.url, canary.url)
    async with running_proxy_file(str(path)) as proxy, steady_traffic(proxy.url) as served:
        state = await wait_for_status(proxy, "promoted", timeout_s=25)
        count = len(served)
        await asyncio.sleep(0.5)
    assert state["status"] == "promoted"
    assert state["weight"] == 100
    actions = [(d["action"], d["weight_after"]) for d in reversed(state["decisions"])]
    assert actions == [("restart", 20), ("advance", 50), ("promote", 100)]
    assert set(served[count:]) == {"canary"}


@pytest.mark.timeout(60)
async def test_too_little_traffic_stays_inconclusive(
    tmp_path: Path, pair: tuple[BackendProcess, BackendProcess]
) -> None:
    stable, canary = pair
    path = tmp_path / "proxy.yaml"
    write_config(path, stable.url, canary.url, min_requests=5000)
    async with running_proxy_file(str(path)) as proxy, steady_traffic(proxy.url, pace_s=0.05):
        await asyncio.sleep(3.5)
        state = rollout(await status(proxy))
    assert state["status"] == "progressing"
    assert state["weight"] == 20
    assert state["last_verdict"]["verdict"] == "inconclusive"
    assert "too little data" in state["last_verdict"]["reason"]
    assert [d["action"] for d in state["decisions"]] == ["restart"]


@pytest.mark.timeout(60)
async def test_a_latency_only_regression_is_caught(tmp_path: Path) -> None:
    stable = start_backend("m-stable")
    canary = start_backend("m-canary", "--latency", "0.08")
    try:
        path = tmp_path / "proxy.yaml"
        write_config(
            path,
            stable.url,
            canary.url,
            checks="error_rate: {max: 0.2}, latency_p95: {max_ratio: 1.5}",
        )
        async with running_proxy_file(str(path)) as proxy, steady_traffic(proxy.url):
            state = await wait_for_status(proxy, "rolled_back", timeout_s=25)
    finally:
        stable.stop()
        canary.stop()
    assert state["status"] == "rolled_back"
    checks = {c["check"]: c for c in state["decisions"][0]["judgement"]["checks"]}
    assert checks["error_rate"]["verdict"] != "fail"
    assert checks["latency_p95"]["verdict"] == "fail"
    assert checks["latency_p95"]["canary"] > 0.06
    assert checks["latency_p95"]["stable"] < 0.05


@pytest.mark.timeout(60)
async def test_a_canary_failing_everything_is_rolled_back_long_before_min_requests(
    tmp_path: Path,
) -> None:
    # Slow traffic, and a min_requests the canary would need many minutes to reach: it
    # gates passing only; a canary that fails every request is rolled back at once.
    stable = start_backend("m-stable")
    canary = start_backend("m-canary", "--error-rate", "1")
    try:
        path = tmp_path / "proxy.yaml"
        write_config(path, stable.url, canary.url, min_requests=5000)
        async with running_proxy_file(str(path)) as proxy, steady_traffic(proxy.url, 0.03):
            state = await wait_for_status(proxy, "rolled_back", timeout_s=20)
    finally:
        stable.stop()
        canary.stop()
    assert state["status"] == "rolled_back"
    (check,) = state["decisions"][0]["judgement"]["checks"]
    assert (check["check"], check["verdict"], check["canary"]) == ("error_rate", "fail", 1.0)
    assert check["canary_n"] < 200


@pytest.mark.timeout(60)
async def test_users_who_give_up_on_a_slow_canary_roll_it_back(tmp_path: Path) -> None:
    # The canary answers after 2 s; the users give up after 0.3 s. Their cancelled
    # requests are recorded with the time they gave up, and count in the cancel rate.
    stable = start_backend("m-stable")
    canary = start_backend("m-canary", "--latency", "2")
    gave_up = 0
    stop = asyncio.Event()

    async def impatient_users(url: str) -> None:
        nonlocal gave_up
        timeout = aiohttp.ClientTimeout(total=0.3)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    async with session.post(
                        f"{url}/v1/chat/completions", json=CHAT, headers={"x-user-id": f"u{n}"}
                    ) as response:
                        await response.read()
                except TimeoutError:
                    gave_up += 1
                await asyncio.sleep(0.004)

    try:
        path = tmp_path / "proxy.yaml"
        write_config(path, stable.url, canary.url, checks="cancel_rate: {max_increase: 0.05}")
        async with running_proxy_file(str(path)) as proxy:
            users = [asyncio.create_task(impatient_users(proxy.url)) for _ in range(4)]
            try:
                state = await wait_for_status(proxy, "rolled_back", timeout_s=25)
                windows = (await status(proxy))["routes"][0]["variants"]
            finally:
                stop.set()
                await asyncio.gather(*users)
    finally:
        stable.stop()
        canary.stop()
    assert gave_up > 0
    assert state["status"] == "rolled_back"
    (check,) = state["decisions"][0]["judgement"]["checks"]
    assert (check["check"], check["verdict"]) == ("cancel_rate", "fail")
    assert check["canary"] > 0.5
    assert check["stable"] == 0
    canary_stats = windows["canary"]
    assert canary_stats["cancels"] > 0
    assert canary_stats["errors"] == 0  # giving up is not an error of the canary
    assert 0.25 < canary_stats["latency_s"]["p50"] < 1.0  # when they gave up, not 2 s


@pytest.mark.timeout(60)
async def test_operators_pause_resume_promote_and_roll_back_with_the_token(
    tmp_path: Path,
    pair: tuple[BackendProcess, BackendProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stable, canary = pair
    monkeypatch.setenv("CTL_TEST_TOKEN", "let-me-in")
    path = tmp_path / "proxy.yaml"
    write_config(
        path,
        stable.url,
        canary.url,
        min_requests=100_000,  # judgements stay inconclusive: only operators move it
        admin="{listen: 127.0.0.1:0, token_env: CTL_TEST_TOKEN}",
    )
    async with running_proxy_file(str(path)) as proxy:
        base = "/api/routes/chat"
        assert (await admin_json(proxy, "POST", f"{base}/pause"))[0] == 401
        assert (await admin_json(proxy, "POST", f"{base}/pause", token="wrong"))[0] == 401
        paused = await admin_json(proxy, "POST", f"{base}/pause", token="let-me-in")
        refused = await admin_json(proxy, "POST", f"{base}/pause", token="let-me-in")
        resumed = await admin_json(proxy, "POST", f"{base}/resume", token="let-me-in")
        promoted = await admin_json(proxy, "POST", f"{base}/promote", token="let-me-in")
        served_promoted = rollout(await status(proxy))["weight"]
        rolled = await admin_json(proxy, "POST", f"{base}/rollback", token="let-me-in")
        served_rolled = rollout(await status(proxy))["weight"]
        resumed_again = await admin_json(proxy, "POST", f"{base}/resume", token="let-me-in")
        unknown_route = await admin_json(proxy, "POST", "/api/routes/nope/pause", token="let-me-in")
        unknown_action = await admin_json(proxy, "POST", f"{base}/explode", token="let-me-in")
        readable = await status(proxy)  # GETs stay open
    assert paused["status"] == "paused"
    assert refused[0] == 409
    assert b"cannot pause" in refused[1]
    assert resumed["status"] == "progressing"
    assert (promoted["status"], promoted["weight"], served_promoted) == ("promoted", 100, 100)
    assert (rolled["status"], rolled["weight"], served_rolled) == ("rolled_back", 0, 0)
    assert (resumed_again["status"], resumed_again["weight"]) == ("progressing", 20)
    assert unknown_route[0] == 404
    assert unknown_action[0] == 404
    actions = [d["action"] for d in readable["routes"][0]["rollout"]["decisions"]]
    assert actions == ["resume", "rollback", "promote", "resume", "pause"]


@pytest.mark.timeout(60)
async def test_the_state_survives_a_restart(
    tmp_path: Path, pair: tuple[BackendProcess, BackendProcess]
) -> None:
    stable, canary = pair
    path = tmp_path / "proxy.yaml"
    write_config(path, stable.url, canary.url, min_requests=100_000)
    async with running_proxy_file(str(path)) as proxy:
        await admin_json(proxy, "POST", "/api/routes/chat/promote")
        before = rollout(await status(proxy))
    async with running_proxy_file(str(path)) as proxy:
        after = rollout(await status(proxy))
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{proxy.url}/v1/chat/completions", json=CHAT, headers={"x-user-id": "anyone"}
            ) as response,
        ):
            variant = response.headers["x-canary-variant"]
    assert (after["status"], after["weight"]) == ("promoted", 100)
    assert after["decisions"] == before["decisions"]
    assert variant == "canary"


@pytest.mark.timeout(60)
async def test_an_edited_weight_is_adopted_and_a_new_canary_restarts(
    tmp_path: Path, pair: tuple[BackendProcess, BackendProcess]
) -> None:
    stable, canary = pair
    other = start_backend("m-other")
    try:
        path = tmp_path / "proxy.yaml"
        write_config(path, stable.url, canary.url, min_requests=100_000)
        async with running_proxy_file(str(path), watch=False) as proxy:
            first = rollout(await status(proxy))
            write_config(path, stable.url, canary.url, weight=35, min_requests=100_000)
            await proxy.server.reload("test")
            edited = rollout(await status(proxy))
            write_config(path, stable.url, other.url, weight=35, min_requests=100_000)
            await proxy.server.reload("test")
            renewed = rollout(await status(proxy))
    finally:
        other.stop()
    assert (first["status"], first["weight"], first["step"]) == ("progressing", 20, 0)
    assert (edited["status"], edited["weight"], edited["step"]) == ("progressing", 35, 0)
    assert edited["decisions"][0]["action"] == "adopt"
    assert (renewed["status"], renewed["weight"], renewed["step"]) == ("progressing", 20, 0)
    assert renewed["decisions"][0]["action"] == "restart"


async def test_assign_answers_for_a_key_at_the_weight_in_force(
    tmp_path: Path, pair: tuple[BackendProcess, BackendProcess]
) -> None:
    stable, canary = pair
    path = tmp_path / "proxy.yaml"
    write_config(path, stable.url, canary.url, min_requests=100_000)
    async with running_proxy_file(str(path)) as proxy:
        answer = await admin_json(proxy, "GET", "/api/assign?route=chat&key=alice")
        missing = await admin_json(proxy, "GET", "/api/assign?route=nope&key=alice")
    bucket = mmh3.hash("ctl:alice", 0, signed=False) % 10000
    assert answer["bucket"] == bucket
    assert answer["weight"] == 20
    assert answer["variant"] == ("canary" if bucket < 2000 else "stable")
    assert answer["canary_from_weight"] == (bucket + 1) / 100
    assert missing[0] == 404


@pytest.mark.timeout(60)
async def test_the_status_command_prints_the_rollout_table(
    tmp_path: Path, pair: tuple[BackendProcess, BackendProcess]
) -> None:
    stable, canary = pair
    path = tmp_path / "proxy.yaml"
    write_config(path, stable.url, canary.url, min_requests=100_000)
    async with running_proxy_file(str(path)) as proxy:
        await eventually(
            "a judgement",
            lambda: current_rollout(proxy),
            holds=lambda current: current.get("last_verdict"),
            timeout_s=5,
            interval_s=0.1,
        )
        result = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "proxy",
                "status",
                "--admin",
                f"http://127.0.0.1:{proxy.server.admin_port}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 0, result.stderr
    header, row = [
        line for line in result.stdout.splitlines() if line.startswith(("route", "chat"))
    ]
    assert header.split()[:6] == ["route", "stable", "canary", "weight", "status", "step"]
    assert row.split()[:6] == ["chat", "v1", "v2", "20%", "progressing", "1/3"]
    assert "inconclusive: too little data" in row
    assert "state store sqlite: up" in result.stdout
    assert re.search(
        r"^1 process \(leader [^;]+; shared config [0-9a-f]{12}\)$", result.stdout, re.M
    )


@pytest.mark.timeout(60)
async def test_an_operator_advances_into_a_timed_pause_and_a_rollback_cools_down(
    tmp_path: Path, pair: tuple[BackendProcess, BackendProcess]
) -> None:
    stable, canary = pair
    path = tmp_path / "proxy.yaml"
    write_config(
        path,
        stable.url,
        canary.url,
        steps="[20, {weight: 50, pause: 30m}, 100]",
        min_requests=100_000,
        auto="cooldown: 1h",
    )
    async with running_proxy_file(str(path)) as proxy:
        base = "/api/routes/chat"
        advanced = await admin_json(proxy, "POST", f"{base}/advance")
        pausing = rollout(await status(proxy))
        printed = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "proxy", "status", "--admin", admin_url(proxy)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        await admin_json(proxy, "POST", f"{base}/rollback")
        cooling = rollout(await status(proxy))
        async with (
            aiohttp.ClientSession() as session,
            session.post(admin_url(proxy) + f"{base}/resume") as refused,
        ):
            refusal = await refused.json()
        forced = await admin_json(proxy, "POST", f"{base}/resume?force=true")
        bad_flag = await admin_json(proxy, "POST", f"{base}/resume?force=maybe")
    assert (advanced["status"], advanced["weight"]) == ("progressing", 50)
    assert (
        advanced["decisions"][0]["reason"] == "weight 20% → 50%: advanced one step by an operator"
    )
    assert 1790 < pausing["pause_left_s"] <= 1800
    assert re.search(
        r"chat .* 50% +progressing +2/3 +pausing at this step, (30m|29m \d+s) left(; .*)?$",
        printed.stdout,
        re.M,
    )
    assert 3590 < cooling["cooldown_left_s"] <= 3600
    assert refused.status == 409
    assert 3590 < int(refused.headers["Retry-After"]) <= 3600
    assert 3590 < refusal["retry_after_s"] <= 3600
    assert re.fullmatch(
        r"cannot resume route 'chat' yet: it was rolled back \d+s ago, and its cooldown is 1h: "
        r"(1h|59m \d+s) left, unless forced \(POST /api/routes/chat/resume\?force=true\)",
        refusal["error"],
    )
    assert (forced["status"], forced["weight"]) == ("progressing", 20)
    assert forced["decisions"][0]["action"] == "resume"
    assert bad_flag[0] == 400


def admin_url(proxy: RunningProxy) -> str:
    return f"http://127.0.0.1:{proxy.server.admin_port}"
