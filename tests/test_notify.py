"""Webhooks of rollout decisions, end to end: a real proxy, a real local receiver.

The receiver is an HTTP server on 127.0.0.1 that answers as it is told (fail a few
times, then succeed; always fail; never answer), and records what it got and when.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.config.model import Webhook, WebhookFormat
from proxy.rollout.machine import Action, Cause, Decision, Status
from proxy.server.notify import QUEUE_SIZE, Notifier
from tests.harness import (
    RunningProxy,
    eventually,
    proxy_yaml,
    running_proxy,
    running_proxy_file,
)


@dataclass
class Receiver:
    """What each path answers: a list of statuses, one per request (the last repeats),
    or "hang"; and every request it got: (path, status answered, body, monotonic time)."""

    url: str = ""
    plans: dict[str, list[int] | str] = field(default_factory=dict)
    got: list[tuple[str, int, dict[str, Any], float]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def bodies(self, path: str, status: int = 200) -> list[dict[str, Any]]:
        return [body for p, s, body, _ in self.got if p == path and s == status]


@asynccontextmanager
async def receiver(plans: dict[str, list[int] | str]) -> AsyncIterator[Receiver]:
    state = Receiver(plans=plans)
    counts: dict[str, int] = {}

    async def handle(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        assert request.headers["Content-Type"] == "application/json"
        plan = state.plans[request.path]
        if plan == "hang":
            await state.release.wait()
            return web.Response(status=200)
        assert isinstance(plan, list)
        n = counts[request.path] = counts.get(request.path, 0) + 1
        status = plan[min(n, len(plan)) - 1]
        state.got.append((request.path, status, body, time.monotonic()))
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        state.release.set()
        await runner.cleanup()


def delivered(hooks: Receiver, path: str) -> int:
    return len(hooks.bodies(path))


def config(notify: str, state: Path) -> str:
    route = (
        "rollout:\n"
        "  weight: 5\n"
        "  auto: {steps: [5, 50, 100], interval: 1s, min_requests: 100000}\n"
        f"notify:\n{notify}"
    )
    top = f"state: {{path: '{state / 'state.db'}'}}"
    return proxy_yaml("http://127.0.0.1:1", "http://127.0.0.1:2", route=route, top=top)


async def operate(proxy: RunningProxy, action: str) -> int:
    """An operator's action on route chat, or `reload`, through the admin port."""
    path = "/api/reload" if action == "reload" else f"/api/routes/chat/{action}"
    url = f"http://127.0.0.1:{proxy.server.admin_port}{path}"
    async with aiohttp.ClientSession() as session, session.post(url) as response:
        return response.status


async def metric(proxy: RunningProxy, result: str) -> float:
    url = f"http://127.0.0.1:{proxy.server.admin_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "canary_notifications_total" and sample.labels == {
                "canary_route": "chat",
                "result": result,
            }:
                return sample.value
    return 0.0


@pytest.mark.timeout(30)
async def test_a_receiver_that_fails_first_gets_every_decision_after_retries(
    tmp_path: Path,
) -> None:
    async with receiver({"/hook": [500, 503, 200], "/slack": [200]}) as hooks:
        notify = (
            f"  - {{url: '{hooks.url}/hook', retries: 3, backoff: 100ms, timeout: 2s}}\n"
            f"  - {{url: '{hooks.url}/slack', format: slack}}\n"
        )
        async with running_proxy(config(notify, tmp_path), environ={}) as proxy:
            assert await operate(proxy, "pause") == 200
            for path in ("/hook", "/slack"):
                await eventually(
                    f"2 decisions delivered at {path}",
                    functools.partial(delivered, hooks, path),
                    timeout_s=10,
                    holds=lambda n: n == 2,
                )
            assert await metric(proxy, "delivered") == 4
            assert await metric(proxy, "failed") == 0
    sent = [(status, body["action"]) for path, status, body, _ in hooks.got if path == "/hook"]
    # The start's decision, tried three times; then the pause, once, in order.
    assert sent == [(500, "adopt"), (503, "adopt"), (200, "adopt"), (200, "pause")]
    times = [at for path, _, _, at in hooks.got if path == "/hook"]
    assert times[1] - times[0] >= 0.1  # the backoff ...
    assert times[2] - times[1] >= 0.2  # ... doubled
    first, pause = hooks.bodies("/hook")
    assert [b for p, _, b, _ in hooks.got if p == "/hook"][:3] == [first] * 3  # the same body
    assert pause["type"] == "canary.rollout.decision"
    assert (pause["route"], pause["cause"], pause["status"]) == ("chat", "operator", "paused")
    assert (pause["weight_before"], pause["weight_after"]) == (5, 5)
    assert pause["text"] == f"route chat: {pause['reason']}"
    assert pause["config_version"]
    assert pause["at_iso"].endswith("+00:00")
    slack = hooks.bodies("/slack")[1]
    assert slack["text"] == f"canary-proxy route chat: {pause['reason']}"
    assert [block["type"] for block in slack["blocks"]] == ["section", "section", "context"]
    assert "route *chat*: pause (5% → 5%, paused)" in slack["blocks"][0]["text"]["text"]


@pytest.mark.timeout(30)
async def test_an_undeliverable_decision_is_one_dead_letter_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="proxy.server.notify")
    async with receiver({"/down": [503], "/refuses": [400]}) as hooks:
        notify = (
            f"  - {{url: '{hooks.url}/down', retries: 2, backoff: 10ms}}\n"
            f"  - {{url: '{hooks.url}/refuses', retries: 2, backoff: 10ms}}\n"
        )
        async with running_proxy(config(notify, tmp_path), environ={}) as proxy:
            await eventually(
                "2 dead letters", lambda: len(caplog.records), timeout_s=10, holds=lambda n: n == 2
            )
            assert await metric(proxy, "failed") == 2
    down, refused = sorted(caplog.records, key=lambda r: "refuses" in r.getMessage())
    assert down.getMessage().startswith(
        f"route chat: webhook {hooks.url}/down not delivered after 3 attempts (HTTP 503); "
        "dead letter: {"
    )
    letter = json.loads(down.getMessage().split("dead letter: ", 1)[1])
    assert (letter["route"], letter["action"]) == ("chat", "adopt")
    # A 400 is the receiver refusing the message itself: it is not sent again.
    assert "not delivered after 1 attempt (HTTP 400)" in refused.getMessage()
    assert [p for p, *_ in hooks.got].count("/refuses") == 1


@pytest.mark.timeout(30)
async def test_a_hanging_receiver_never_holds_up_an_operator(tmp_path: Path) -> None:
    async with receiver({"/hang": "hang"}) as hooks:
        notify = f"  - {{url: '{hooks.url}/hang', timeout: 20s}}\n"
        async with running_proxy(config(notify, tmp_path), environ={}) as proxy:
            started = time.monotonic()
            for action in ("pause", "resume") * 3:
                assert await operate(proxy, action) == 200
            assert time.monotonic() - started < 2.0
            hooks.release.set()


def decision(n: int) -> Decision:
    return Decision(
        at=1_800_000_000.0 + n,
        cause=Cause.OPERATOR,
        action=Action.PAUSE,
        weight_before=5,
        weight_after=5,
        status=Status.PAUSED,
        reason=f"decision {n}",
    )


@pytest.mark.timeout(30)
async def test_a_full_queue_drops_and_counts_instead_of_waiting() -> None:
    outcomes: list[tuple[str, str]] = []
    async with receiver({"/hang": "hang"}) as hooks:
        hook = Webhook(url=f"{hooks.url}/hang", format=WebhookFormat.GENERIC, timeout_s=20)
        notifier = Notifier(lambda route, result: outcomes.append((route, result)))
        await notifier.start()
        started = time.monotonic()
        for n in range(QUEUE_SIZE + 20):
            notifier.notify("chat", (hook,), decision(n), "v", "here")
            await asyncio.sleep(0)  # the sender takes the first one off the queue
        assert time.monotonic() - started < 1.0
        # One in flight, QUEUE_SIZE waiting, the rest dropped.
        assert notifier.counts["dropped"] == 20 - 1
        await notifier.stop(drain_s=0.1)
    assert notifier.counts["dropped"] == 20 - 1 + QUEUE_SIZE
    assert outcomes.count(("chat", "dropped")) == notifier.counts["dropped"]


@pytest.mark.timeout(30)
async def test_a_reload_moves_the_messages_to_the_new_webhooks(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    async with receiver({"/a": [200], "/b": [200]}) as hooks:
        path.write_text(config(f"  - {{url: '{hooks.url}/a'}}\n", tmp_path))
        async with running_proxy_file(str(path), watch=False) as proxy:
            assert await operate(proxy, "pause") == 200
            await eventually(
                "adopt and pause at /a",
                functools.partial(delivered, hooks, "/a"),
                timeout_s=10,
                holds=lambda n: n == 2,
            )
            assert proxy.server.notifier.senders == 1
            path.write_text(config(f"  - {{url: '{hooks.url}/b', format: slack}}\n", tmp_path))
            assert await operate(proxy, "reload") == 200
            await eventually(  # /a's sender ends with the reload, once it has sent its last
                "no sender for /a",
                lambda: proxy.server.notifier.senders,
                timeout_s=5,
                holds=lambda n: n == 0,
            )
            assert await operate(proxy, "resume") == 200
            await eventually(
                "the resume at /b",
                functools.partial(delivered, hooks, "/b"),
                timeout_s=10,
                holds=lambda n: n == 1,
            )
            assert proxy.server.notifier.senders == 1
    assert [body["action"] for body in hooks.bodies("/a")] == ["adopt", "pause"]
    assert "resume" in hooks.bodies("/b")[0]["text"]
