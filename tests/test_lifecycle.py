"""The process's life: SIGTERM drains, SIGKILL loses no rollout state (SPEC §9, §6).

`canary-proxy run` runs as a child process, as an operator (or Kubernetes) runs it.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Backends
from tests.harness import auto_rollout, eventually, proxy_yaml, running_proxy, sticky
from tests.raw import read_answer

PUBLIC = re.compile(r"listening on http://127\.0\.0\.1:(\d+), admin on http://127\.0\.0\.1:(\d+)")
STREAM = {"messages": [{"role": "user", "content": "hi"}], "stream": True}


@dataclass
class Child:
    process: asyncio.subprocess.Process
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def admin(self, path: str) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            body = await response.read()
            return response.status, json.loads(body) if body.startswith(b"{") else body


@asynccontextmanager
async def running(config: Path) -> AsyncIterator[Child]:
    """`canary-proxy run -c config` until the block ends (killed if still running)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        "-c",
        str(config),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=config.parent,
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(15):
            while line := (await process.stderr.readline()).decode():
                if found := PUBLIC.search(line):
                    break
            else:
                raise AssertionError("the proxy never said it listens")
        yield Child(process, int(found[1]), int(found[2]))
    finally:
        if process.returncode is None:
            process.kill()
        await process.communicate()


def write_config(path: Path, backends: Backends, *, route: str = "", top: str = "") -> Path:
    path.write_text(
        proxy_yaml(
            backends.stable.url,
            backends.canary.url,
            route=sticky("life") + route,
            top=f"{top}\nstate: {{path: '{path.parent / 'state.db'}'}}",
        )
    )
    return path


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


@pytest.mark.timeout(30)
async def test_sigterm_stops_accepting_turns_unready_and_lets_streams_finish(
    backends: Backends, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "proxy.yaml", backends, top="shutdown_grace: 10s")
    async with running(config) as child, aiohttp.ClientSession() as session:
        assert (await child.admin("/readyz"))[0] == 200
        async with session.post(
            f"{child.url}/v1/chat/completions",
            json={**STREAM, "max_tokens": 8},
            headers={"x-user-id": "u", "x-fake-tokens-per-s": "4"},  # about 2 s
        ) as response:
            first = await response.content.readuntil(b"\n\n")
            child.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await eventually(
                "the port refusing connections",
                lambda: refused(child.port),
                timeout_s=1,
                interval_s=0.025,
            )
            refused_after = time.monotonic() - signalled
            ready_status, _ = await child.admin("/readyz")
            rest = await response.content.read()
            ended = time.monotonic()
        async with asyncio.timeout(10):
            returncode = await child.process.wait()
        exited = time.monotonic()
    assert refused_after < 1.0  # stop accepting
    assert ready_status == 503  # unready while draining
    body = first + rest
    assert body.count(b'"content":"tok') == 8
    assert body.rstrip().endswith(b"data: [DONE]")  # the open stream ran to its end
    assert ended - signalled > 1.0
    assert returncode == 0
    assert exited - ended < 3.0  # and then it exits, without waiting out the grace


@pytest.mark.timeout(30)
async def test_a_stream_longer_than_shutdown_grace_is_cut_and_the_process_exits_0(
    backends: Backends, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "proxy.yaml", backends, top="shutdown_grace: 1s")
    async with running(config) as child, aiohttp.ClientSession() as session:
        async with session.post(
            f"{child.url}/v1/chat/completions",
            json={**STREAM, "max_tokens": 40},
            headers={"x-user-id": "u", "x-fake-tokens-per-s": "2"},  # 20 s
        ) as response:
            await response.content.readuntil(b"\n\n")
            child.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.content.read()
        async with asyncio.timeout(10):
            returncode = await child.process.wait()
    assert returncode == 0
    assert time.monotonic() - signalled < 5.0


def rollout(status: dict[str, Any]) -> tuple[float, int]:
    (route,) = status["routes"]
    return route["weight"], len(route["rollout"]["decisions"])


async def traffic(session: aiohttp.ClientSession, url: str, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        async with session.post(
            f"{url}/v1/chat/completions",
            json={"messages": [], "max_tokens": 1},
            headers={"x-user-id": f"user-{n}"},
        ) as response:
            await response.read()


@pytest.mark.timeout(60)
async def test_sigkill_during_a_rollout_loses_no_state(backends: Backends, tmp_path: Path) -> None:
    auto = auto_rollout(
        steps="[10, 20, 30, 40, 50, 60, 70, 80, 90, 100]",
        min_requests=3,
        checks="error_rate: {max: 0.5}",
    )
    config = write_config(tmp_path / "proxy.yaml", backends, route=auto)
    async with running(config) as child, aiohttp.ClientSession() as session:

        async def reported() -> tuple[float, int]:
            """(weight, decisions) as /api/status says."""
            _, status = await child.admin("/api/status")
            return rollout(status)

        stop = asyncio.Event()
        load = [asyncio.create_task(traffic(session, child.url, stop)) for _ in range(4)]
        try:
            seen = await eventually(
                "the rollout at 20%",
                reported,
                holds=lambda seen: seen[0] >= 20,
                timeout_s=15,
                interval_s=0.1,
            )
            # Killed in the middle of traffic and of the controller's work.
            child.process.kill()
            await child.process.wait()
        finally:
            stop.set()
            await asyncio.gather(*load, return_exceptions=True)
    with sqlite3.connect(tmp_path / "state.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    async with running(config) as child:
        _, status = await child.admin("/api/status")
    # Nothing the proxy reported before the kill is lost.
    assert rollout(status) >= seen, (rollout(status), seen)


async def test_a_request_that_reaches_a_draining_proxy_gets_503_draining(
    backends: Backends,
) -> None:
    config = proxy_yaml(backends.stable.url, backends.canary.url)
    await backends.stable.clear()
    async with running_proxy(config) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: p\r\n\r\n")
        before = await read_answer(reader, quiet_s=0.3)
        # What ProxyServer.stop() sets first, before it closes the port and drains.
        forwarder = proxy.server._forwarder
        assert forwarder is not None
        forwarder.draining = True
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: p\r\n\r\n")
        during = await read_answer(reader, quiet_s=2.0)
        writer.close()
    assert before.statuses == [200]
    assert during.statuses == [503]
    assert during.closed  # the client opens a new connection, to another replica
    assert b"Retry-After: 5" in during.data
    assert json.loads(during.body)["error"]["code"] == "draining"
    assert len(await backends.stable.requests()) == 1
