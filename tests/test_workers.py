"""`canary-proxy run --workers 2` (SPEC §10): two processes on one port, one admin port.

Each test starts the command as a user would, sends requests on new connections (so
the kernel spreads them over both workers) and reads the supervisor's admin port.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Backends
from tests.harness import auto_rollout, eventually, proxy_yaml, sticky
from tests.proxy_process import ProxyProcess, proxy_processes, send

pytestmark = pytest.mark.timeout(60)


def write_config(
    path: Path,
    backends: Backends,
    *,
    rollout: str = "rollout: {weight: 50}",
    admin: str = "{listen: 127.0.0.1:0}",
) -> Path:
    path.write_text(
        proxy_yaml(
            backends.stable.url,
            backends.canary.url,
            route=sticky("workers") + rollout,
            top=f"state: {{path: '{path.parent / 'state.db'}'}}",
            admin=admin,
        )
    )
    return path


@pytest.fixture
def two_workers(tmp_path: Path, backends: Backends) -> Iterator[ProxyProcess]:
    # An automatic rollout that judges every second but cannot advance before 80
    # canary requests: more than either worker alone gets in these tests.
    rollout = auto_rollout(
        50, steps="[50, 100]", min_requests=80, pass_intervals=1000, checks="error_rate: {max: 0.5}"
    )
    config = write_config(tmp_path / "proxy.yaml", backends, rollout=rollout)
    with proxy_processes(config, workers=2) as (proxy,):
        yield proxy


async def per_worker(proxy: ProxyProcess, name: str, **labels: str) -> dict[str, float]:
    """A metric's value per worker (summed over its other labels)."""
    totals: dict[str, float] = {}
    for sample_labels, value in await proxy.samples(name):
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            worker = sample_labels["worker"]
            totals[worker] = totals.get(worker, 0.0) + value
    return totals


async def test_both_workers_serve_and_are_judged_together(two_workers: ProxyProcess) -> None:
    proxy = two_workers
    await asyncio.sleep(1.1)  # the rollout's evidence starts with the first whole second
    async with aiohttp.ClientSession() as session:
        answers = [await send(session, proxy.url, f"user-{n}") for n in range(240)]
    assert {code for code, _ in answers} == {200}
    canary_sent = sum(variant == "canary" for _, variant in answers)

    served = await per_worker(proxy, "canary_upstream_requests_total")
    assert set(served) == {"0", "1"}, "both workers serve"
    assert all(count > 0 for count in served.values())
    assert sum(served.values()) == 240
    canary_by_worker = await per_worker(
        proxy, "canary_upstream_requests_total", canary_variant="canary"
    )

    # The status page, and the judge, count every worker's requests.
    def counted_and_judged(document: dict[str, Any]) -> bool:
        variants = document["routes"][0]["variants"]
        verdict = document["routes"][0]["rollout"]["last_verdict"]
        total = variants["stable"]["requests"] + variants["canary"]["requests"]
        return total == 240 and verdict is not None and verdict["canary_n"] == canary_sent

    document = await eventually(
        f"240 requests counted and {canary_sent} canary requests judged",
        proxy.status,
        holds=counted_and_judged,
        timeout_s=6,
        interval_s=0.2,
    )
    assert document["routes"][0]["variants"]["canary"]["requests"] == canary_sent
    judged = document["routes"][0]["rollout"]["last_verdict"]["canary_n"]
    assert judged > max(canary_by_worker.values()), "the judge saw more than one worker's share"
    assert sorted(w["worker"] for w in document["workers"]) == [0, 1]
    assert len(document["processes"]) == 2
    assert len({p["config_version"] for p in document["processes"]}) == 1
    assert sum(p["leader"] for p in document["processes"]) <= 1


async def test_an_operator_decision_reaches_both_workers_within_2s(
    two_workers: ProxyProcess,
) -> None:
    proxy = two_workers
    code, answer = await proxy.admin("POST", "/api/routes/chat/rollback")
    assert code == 200, answer
    decided = time.monotonic()
    await eventually(
        "weight 0 on both workers",
        lambda: per_worker(proxy, "canary_weight_ratio"),
        holds=lambda weights: weights == {"0": 0.0, "1": 0.0},
        timeout_s=5,
    )
    elapsed = time.monotonic() - decided
    assert elapsed <= 2.0, f"both workers served the rollback after {elapsed:.2f}s"
    async with aiohttp.ClientSession() as session:
        answers = [await send(session, proxy.url, f"user-{n}") for n in range(60)]
    assert {variant for _, variant in answers} == {"stable"}


async def test_a_killed_worker_is_started_again(two_workers: ProxyProcess) -> None:
    proxy = two_workers
    before = {w["worker"]: w["pid"] for w in (await proxy.status())["workers"]}
    os.kill(before[1], signal.SIGKILL)

    async def worker_1_and_readiness() -> tuple[dict[str, Any], int]:
        document = await proxy.status()
        code, _ = await proxy.admin("GET", "/readyz")
        return next(w for w in document["workers"] if w["worker"] == 1), code

    await eventually(
        "worker 1 replaced and the supervisor ready",
        worker_1_and_readiness,
        holds=lambda seen: seen[0]["pid"] != before[1] and seen[0]["alive"] and seen[1] == 200,
        timeout_s=15,
        interval_s=0.1,
    )
    workers = {w["worker"]: w for w in (await proxy.status())["workers"]}
    assert workers[1]["restarts"] == 1
    assert workers[0]["pid"] == before[0], "the other worker was left alone"
    assert "worker 1 (pid" in proxy.log
    assert "exited with SIGKILL" in proxy.log
    async with aiohttp.ClientSession() as session:
        answers = [await send(session, proxy.url, f"user-{n}") for n in range(60)]
    assert {code for code, _ in answers} == {200}
    assert set(await per_worker(proxy, "canary_upstream_requests_total")) == {"0", "1"}


async def test_sighup_reloads_every_worker_and_sigterm_stops_them_all(
    tmp_path: Path, backends: Backends
) -> None:
    config = write_config(tmp_path / "proxy.yaml", backends, rollout="rollout: {weight: 0}")
    proxy = ProxyProcess(config, "--no-watch", workers=2)
    try:
        pids = [w["pid"] for w in (await proxy.status())["workers"]]
        write_config(config, backends, rollout="rollout: {weight: 100}")
        await asyncio.sleep(1.5)
        assert await per_worker(proxy, "canary_weight_ratio") == {"0": 0.0, "1": 0.0}
        proxy.signal(signal.SIGHUP)
        await eventually(
            "weight 100% on both workers after SIGHUP",
            lambda: per_worker(proxy, "canary_weight_ratio"),
            holds=lambda weights: weights == {"0": 1.0, "1": 1.0},
            timeout_s=5,
            interval_s=0.1,
        )
        versions = {
            labels["canary_config_version"]
            for labels, _ in await proxy.samples("canary_config_info")
        }
        assert len(versions) == 1
        code, answer = await proxy.admin("POST", "/api/reload")
        assert code == 200
        assert [w["outcome"] for w in answer["workers"]] == ["unchanged", "unchanged"]
    finally:
        code = proxy.stop()
    assert code == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert proxy.log.count("config reloaded (SIGHUP)") == 2


def test_workers_that_cannot_start_fail_the_command_with_their_reason(
    tmp_path: Path, backends: Backends
) -> None:
    config = write_config(tmp_path / "proxy.yaml", backends)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    text = config.read_text().replace(str(tmp_path / "state.db"), str(blocker / "state.db"))
    config.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "run", "-c", str(config), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "cannot open the state store at" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("canary-proxy: error: worker "), (
        result.stderr
    )
    assert "before it was ready" in result.stderr
    assert "Traceback" not in result.stderr


async def test_the_supervisors_admin_port_asks_for_the_workers_token(
    tmp_path: Path, backends: Backends
) -> None:
    rollout = auto_rollout(50, steps="[50, 100]", interval="1h")
    admin = "{listen: 127.0.0.1:0, token_env: WORKERS_TEST_TOKEN}"
    config = write_config(tmp_path / "proxy.yaml", backends, rollout=rollout, admin=admin)
    proxy = ProxyProcess(config, workers=2, env={"WORKERS_TEST_TOKEN": "s3cret"})
    try:
        refused = [
            await proxy.admin("POST", "/api/reload"),
            await proxy.admin("POST", "/api/reload", token="wrong"),
            await proxy.admin("POST", "/api/routes/chat/pause"),
        ]
        reload_code, reloaded = await proxy.admin("POST", "/api/reload", token="s3cret")
        pause_code, paused = await proxy.admin("POST", "/api/routes/chat/pause", token="s3cret")
        status_code, _ = await proxy.admin("GET", "/api/status")
    finally:
        proxy.stop()
    assert [code for code, _ in refused] == [401, 401, 401]
    assert reload_code == 200
    assert [w["outcome"] for w in reloaded["workers"]] == ["unchanged", "unchanged"]
    assert pause_code == 200
    assert paused["status"] == "paused"
    assert status_code == 200, "GETs stay open"
