"""Live reload (SPEC §9): every way a config changes, under traffic, and nothing dropped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import mmh3
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Backends
from tests.harness import (
    RunningProxy,
    closed_port,
    eventually,
    proxy_yaml,
    running_proxy_file,
    start_backend,
    sticky,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
USERS = [f"user-{i}" for i in range(60)]


def config_text(
    stable: str, canary: str, weight: float, port: int = 0, admin: str = "{listen: 127.0.0.1:0}"
) -> str:
    return proxy_yaml(
        stable,
        canary,
        route=sticky("r") + f"rollout: {{weight: {weight}}}",
        listen=f"127.0.0.1:{port}",
        admin=admin,
    )


def formula(user: str, weight: float) -> str:
    bucket = mmh3.hash(f"r:{user}", 0, signed=False) % 10000
    return "canary" if bucket < round(weight * 100) else "stable"


@dataclass
class Traffic:
    """A steady stream of requests (every third streamed) from USERS, recorded."""

    url: str
    served: list[tuple[float, str, str]] = field(default_factory=list)  # (time, user, variant)
    failures: list[str] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession() as session:
            n = 0
            while not stop.is_set():
                user = USERS[n % len(USERS)]
                stream = n % 3 == 0
                n += 1
                try:
                    async with session.post(
                        f"{self.url}/v1/chat/completions",
                        json={**CHAT, "stream": stream},
                        headers={"x-user-id": user},
                    ) as response:
                        body = await response.read()
                        if response.status != 200 or (stream and b"[DONE]" not in body):
                            self.failures.append(f"{response.status} {body[:200]!r}")
                        self.served.append(
                            (time.monotonic(), user, response.headers["x-canary-variant"])
                        )
                except aiohttp.ClientError as exc:
                    self.failures.append(repr(exc))

    def served_since(self, since: float) -> list[tuple[float, str, str]]:
        return [entry for entry in self.served if entry[0] >= since]


@contextlib.asynccontextmanager
async def traffic(url: str) -> AsyncIterator[Traffic]:
    recorder = Traffic(url)
    stop = asyncio.Event()
    task = asyncio.create_task(recorder.run(stop))
    try:
        yield recorder
    finally:
        stop.set()
        await task


async def first_time_new_weight_served(
    recorder: Traffic, changed_at: float, weight: float, timeout_s: float = 5.0
) -> float:
    """Seconds from `changed_at` until every user in a full round is served at `weight`."""

    def took() -> float | None:
        recent = recorder.served_since(changed_at)
        for index in range(len(recent) - len(USERS) + 1):
            window = recent[index : index + len(USERS)]
            if all(variant == formula(user, weight) for _, user, variant in window):
                return window[0][0] - changed_at
        return None

    seconds = await eventually(
        f"a full round of users served at weight {weight}",
        took,
        holds=lambda seconds: seconds is not None,
        timeout_s=changed_at + timeout_s - time.monotonic(),
    )
    assert seconds is not None
    return seconds


def assert_canary_users_stay(recorder: Traffic) -> None:
    """Raising the weight never moves a user from canary back to stable."""
    seen_canary: set[str] = set()
    for _, user, variant in recorder.served:
        if variant == "canary":
            seen_canary.add(user)
        else:
            assert user not in seen_canary, f"{user} went back to stable"


def rewrite(path: Path, text: str) -> None:
    path.write_text(text)


def rename_over(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def make_configmap(directory: Path, text: str, generation: int) -> Path:
    """A Kubernetes ConfigMap volume: config.yaml -> ..data/config.yaml, ..data -> ..<gen>."""
    versioned = directory / f"..2026_11_29_{generation}"
    versioned.mkdir()
    (versioned / "config.yaml").write_text(text)
    data = directory / "..data"
    new_link = directory / "..data_tmp"
    new_link.symlink_to(versioned.name)
    os.replace(new_link, data)  # the atomic swap kubelet does
    link = directory / "config.yaml"
    if not link.is_symlink():
        link.symlink_to("..data/config.yaml")
    return link


ApplyChange = Callable[[Path, str, RunningProxy], Awaitable[None]]


async def by_rewrite(path: Path, text: str, proxy: RunningProxy) -> None:
    rewrite(path, text)


async def by_rename(path: Path, text: str, proxy: RunningProxy) -> None:
    rename_over(path, text)


async def by_configmap(path: Path, text: str, proxy: RunningProxy) -> None:
    make_configmap(path.parent, text, 2)


async def by_api(path: Path, text: str, proxy: RunningProxy) -> None:
    rewrite(path, text)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{proxy.server.admin_port}/api/reload") as response,
    ):
        assert response.status == 200
        assert (await response.json())["outcome"] in ("applied", "unchanged")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("change", "watch"),
    [(by_rewrite, True), (by_rename, True), (by_configmap, True), (by_api, False)],
    ids=["rewrite", "atomic-rename", "configmap-symlink-swap", "post-api-reload"],
)
async def test_a_weight_edit_is_served_within_two_seconds_and_drops_nothing(
    backends: Backends, tmp_path: Path, change: ApplyChange, watch: bool
) -> None:
    if change is by_configmap:
        path = make_configmap(
            tmp_path, config_text(backends.stable.url, backends.canary.url, 10), 1
        )
    else:
        path = tmp_path / "proxy.yaml"
        path.write_text(config_text(backends.stable.url, backends.canary.url, 10))
    async with running_proxy_file(str(path), watch=watch) as proxy:
        initial_version = proxy.server.config.version
        async with traffic(proxy.url) as recorder:
            await asyncio.sleep(1.0)
            before = len(recorder.served)
            changed_at = time.monotonic()
            await change(path, config_text(backends.stable.url, backends.canary.url, 60), proxy)
            took = await first_time_new_weight_served(recorder, changed_at, 60)
            await asyncio.sleep(0.5)
        version = proxy.server.config.version
    assert before > 20
    assert recorder.failures == []
    assert took < 2.0
    assert_canary_users_stay(recorder)
    for _, user, variant in recorder.served:
        assert variant in (formula(user, 10), formula(user, 60))
    assert version != initial_version


@pytest.mark.timeout(60)
def test_sighup_reloads_the_running_command(backends: Backends, tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    port = closed_port()
    path.write_text(config_text(backends.stable.url, backends.canary.url, 0, port=port))
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "-c", str(path), "--no-watch"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        assert "listening" in process.stderr.readline()

        async def check() -> tuple[list[str], list[str]]:
            async with aiohttp.ClientSession() as session:

                async def variants() -> list[str]:
                    out = []
                    for user in USERS:
                        async with session.post(
                            f"http://127.0.0.1:{port}/v1/chat/completions",
                            json=CHAT,
                            headers={"x-user-id": user},
                        ) as response:
                            out.append(response.headers["x-canary-variant"])
                    return out

                before = await variants()
                path.write_text(
                    config_text(backends.stable.url, backends.canary.url, 100, port=port)
                )
                await asyncio.sleep(1.0)
                unchanged = await variants()  # --no-watch: the file alone changes nothing
                process.send_signal(signal.SIGHUP)
                after = await eventually(
                    "every user on the canary after SIGHUP",
                    variants,
                    holds=lambda after: set(after) == {"canary"},
                    timeout_s=2,
                    interval_s=0.1,
                )
                assert unchanged == before
                return before, after

        before, after = asyncio.run(check())
        assert set(before) == {"stable"}
        assert set(after) == {"canary"}
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=10)
        assert "config reloaded (SIGHUP)" in err
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=5)


async def admin(
    proxy: RunningProxy, path: str, method: str = "GET", headers: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{proxy.server.admin_port}{path}"
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers) as response,
    ):
        return response.status, await response.read()


def reload_failures(metrics_text: bytes) -> float:
    for family in text_string_to_metric_families(metrics_text.decode()):
        for sample in family.samples:
            if sample.name == "canary_config_reloads_total" and sample.labels == {
                "result": "failure"
            }:
                return sample.value
    return 0.0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        ("routes: [\n  - name: chat\n", "invalid YAML"),
        ("UNKNOWN", "unknown key 'bogus'"),
        ("ENV", "environment variable RELOAD_TEST_MISSING_KEY is not set"),
        ("REMOVED", "routes[0].canary: unknown backend 'v2'"),
        ("LISTEN", "listen: changing"),
    ],
    ids=["yaml-syntax", "schema", "missing-env-var", "backend-removed", "listen-changed"],
)
async def test_an_invalid_config_changes_nothing_and_says_why_everywhere(
    backends: Backends, tmp_path: Path, caplog: pytest.LogCaptureFixture, broken: str, expected: str
) -> None:
    good = config_text(backends.stable.url, backends.canary.url, 100)
    path = tmp_path / "proxy.yaml"
    path.write_text(good)
    replacements = {
        "UNKNOWN": good + "bogus: 1\n",
        "ENV": good.replace(
            f"url: {backends.stable.url}\n",
            f"url: {backends.stable.url}\n    api_key_env: RELOAD_TEST_MISSING_KEY\n",
        ),
        "REMOVED": good.replace(f"  v2:\n    url: {backends.canary.url}\n", ""),
        "LISTEN": good.replace("listen: 127.0.0.1:0\n", f"listen: 127.0.0.1:{closed_port()}\n", 1),
    }
    caplog.set_level(logging.ERROR, logger="proxy.server.app")
    async with running_proxy_file(str(path)) as proxy:
        version = proxy.server.config.version
        path.write_text(replacements.get(broken, broken))
        await eventually(
            "a reload error", lambda: proxy.server.last_reload_error is not None, timeout_s=3
        )
        # The old config keeps serving.
        async with aiohttp.ClientSession() as session:
            for user in USERS[:10]:
                async with session.post(
                    f"{proxy.url}/v1/chat/completions", json=CHAT, headers={"x-user-id": user}
                ) as response:
                    assert response.status == 200
                    assert response.headers["x-canary-variant"] == "canary"
        _, status_body = await admin(proxy, "/api/status")
        _, metrics_body = await admin(proxy, "/metrics")
        # A valid file clears the error.
        path.write_text(good.replace("weight: 100", "weight: 0"))
        await eventually(
            "the reload error cleared", lambda: proxy.server.last_reload_error is None, timeout_s=3
        )
        cleared = proxy.server.last_reload_error
        _, cleared_status = await admin(proxy, "/api/status")
    status = json.loads(status_body)
    assert status["config"]["version"] == version
    assert expected in status["config"]["last_reload_error"]
    assert status["config"]["last_reload_at"]
    assert reload_failures(metrics_body) == 1
    assert any(expected in record.getMessage() for record in caplog.records)
    assert cleared is None
    assert json.loads(cleared_status)["config"]["last_reload_error"] is None
    assert json.loads(cleared_status)["routes"][0]["weight"] == 0


async def test_unchanged_backends_keep_their_pools_and_removed_ones_are_closed(
    backends: Backends, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(config_text(backends.stable.url, backends.canary.url, 50))
    async with running_proxy_file(str(path), watch=False) as proxy:
        forwarder = proxy.server._forwarder
        assert forwarder is not None
        stable_pool = forwarder.snapshot.upstreams["v1"]
        canary_pool = forwarder.snapshot.upstreams["v2"]
        other = start_backend("m-other")
        try:
            path.write_text(config_text(backends.stable.url, other.url, 50))
            result = await proxy.server.reload("test")
            assert result.outcome.value == "applied"
            assert forwarder.snapshot.upstreams["v1"] is stable_pool
            assert forwarder.snapshot.upstreams["v2"] is not canary_pool
            assert canary_pool.open_connections == 0
        finally:
            other.stop()


async def test_reload_needs_the_admin_token_when_there_is_one(
    backends: Backends, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELOAD_TEST_ADMIN_TOKEN", "s3cret-token")
    path = tmp_path / "proxy.yaml"
    with_token = "{listen: 127.0.0.1:0, token_env: RELOAD_TEST_ADMIN_TOKEN}"
    path.write_text(config_text(backends.stable.url, backends.canary.url, 0, admin=with_token))
    async with running_proxy_file(str(path), watch=False) as proxy:
        without, _ = await admin(proxy, "/api/reload", "POST")
        wrong, _ = await admin(
            proxy, "/api/reload", "POST", headers={"Authorization": "Bearer nope"}
        )
        right, body = await admin(
            proxy, "/api/reload", "POST", headers={"Authorization": "Bearer s3cret-token"}
        )
        status, _ = await admin(proxy, "/api/status")
    assert (without, wrong, right, status) == (401, 401, 200, 200)
    assert json.loads(body)["outcome"] == "unchanged"


@pytest.mark.timeout(60)
async def test_a_long_stream_survives_a_reload_that_moves_its_route(
    backends: Backends, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(config_text(backends.stable.url, backends.canary.url, 100))
    async with running_proxy_file(str(path)) as proxy, aiohttp.ClientSession() as session:
        # A 10-second stream on the canary, 20 tokens at two a second: most of it is still
        # to come when the reload has retired its backend's pool (nothing in a reload
        # waits on time, so a longer stream would show no more).
        response = await session.post(
            f"{proxy.url}/v1/chat/completions",
            json={**CHAT, "stream": True, "max_tokens": 20},
            headers={"x-user-id": "long", "x-fake-tokens-per-s": "2"},
        )
        assert response.headers["x-canary-variant"] == "canary"
        await response.content.readuntil(b"\n\n")
        # The route moves: its canary is now the stable backend, and the weight drops.
        path.write_text(config_text(backends.stable.url, backends.stable.url, 0))
        await eventually(
            "the reloaded weight 0",
            lambda: proxy.server.config.routes[0].rollout.weight == 0,
            timeout_s=3,
        )
        async with session.post(
            f"{proxy.url}/v1/chat/completions", json=CHAT, headers={"x-user-id": "long"}
        ) as other:
            assert other.headers["x-canary-variant"] == "stable"
        rest = await response.content.read()
        response.close()
    assert rest.rstrip().endswith(b"data: [DONE]")
    assert re.findall(rb'"content":"(tok\d+) "', rest) == [b"tok%d" % i for i in range(20)]
