"""The status page on the admin port, in a real headless Chromium (Debian's, via Playwright).

A proxy with a rollout in progress and some traffic behind it; the page must show the
route (weight, step, pause, variants, decisions, the chart), refuse an action without
the admin token, pause the rollout with it, and load nothing from anywhere else. The
screenshot it takes is the one README.md shows (docs/status-page.png): `make
screenshot` runs it with UPDATE_SCREENSHOT=1, which copies it there; a plain test run
leaves the tree as it was.

Chromium comes from the system (`.ci/run` installs Debian's package): without it the
test is skipped on a laptop, and fails in CI, where it must run.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.harness import (
    BackendProcess,
    RunningProxy,
    auto_rollout,
    proxy_yaml,
    running_proxy,
    start_backend,
    sticky,
)

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "status-page.png"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "status-page-token-0d1e"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}

pytestmark = pytest.mark.timeout(90)
# The page polls every 2 s; a machine busy with other tests may take a few polls more.
expect.set_options(timeout=15_000)


def need_chromium() -> None:
    if Path(CHROMIUM).exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium package")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); CI runs this test")


@pytest.fixture
def backends() -> Iterator[tuple[BackendProcess, BackendProcess]]:
    stable = start_backend("m-stable", "--ttft", "0.02", "--tokens-per-s", "400")
    canary = start_backend(
        "m-canary", "--ttft", "0.04", "--tokens-per-s", "300", "--error-rate", "0.05"
    )
    yield stable, canary
    stable.stop()
    canary.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    need_chromium()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            await launched.close()


async def traffic(proxy: RunningProxy, count: int) -> None:
    """`count` requests from as many users, half of them streamed, a few at a time."""
    async with aiohttp.ClientSession() as session:

        async def one(n: int) -> None:
            body = {**CHAT, "stream": n % 2 == 0}
            headers = {"x-user-id": f"user-{n}"}
            url = f"{proxy.url}/v1/chat/completions"
            async with session.post(url, json=body, headers=headers) as response:
                await response.read()

        for first in range(0, count, 10):
            await asyncio.gather(*(one(n) for n in range(first, min(first + 10, count))))


async def admin(proxy: RunningProxy, method: str, path: str) -> Any:
    url = f"http://127.0.0.1:{proxy.server.admin_port}{path}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers) as response,
    ):
        assert response.status == 200, await response.text()
        return await response.json()


def chart_y(weight: float) -> str:
    """Where status.js draws a weight in its chart (top 10, plot height 146)."""
    return f"{10 + (1 - weight / 100) * 146:.1f}"


def chat_card(page: Page) -> Any:
    return page.locator('section.route[data-route="chat"]')


async def test_the_status_page_shows_a_rollout_and_pauses_it(
    tmp_path: Path, backends: tuple[BackendProcess, BackendProcess], browser: Browser
) -> None:
    stable, canary = backends
    rollout = auto_rollout(20, steps="[20, {weight: 50, pause: 10m}, 100]", min_requests=100_000)
    text = proxy_yaml(
        stable.url,
        canary.url,
        route=sticky("page") + rollout,
        top=f"state: {{path: '{tmp_path / 'state.db'}'}}",
        admin="{listen: 127.0.0.1:0, token_env: STATUS_TOKEN}",
    )
    async with running_proxy(text, environ={"STATUS_TOKEN": TOKEN}) as proxy:
        await traffic(proxy, 120)
        await admin(proxy, "POST", "/api/routes/chat/advance")  # 20% -> 50%, pausing there
        await traffic(proxy, 80)

        page = await browser.new_page(viewport={"width": 1280, "height": 820})
        origin = f"http://127.0.0.1:{proxy.server.admin_port}"
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on(
            "console",
            lambda message: problems.append(message.text) if message.type == "error" else None,
        )
        await page.goto(origin + "/")

        card = chat_card(page)
        await expect(card.locator(".status")).to_have_text("progressing")
        await expect(card.locator(".weight")).to_have_text("50%")
        await expect(card.locator(".step")).to_contain_text("step 2/3")
        pausing = re.compile(r"pausing at this step, (10m|9m \d+s) left")
        await expect(card.locator(".waits")).to_contain_text(pausing)
        await expect(card.locator(".decisions li").first).to_contain_text(
            "advance weight 20% → 50%: advanced one step by an operator"
        )
        rows = card.locator(".variants-table tbody tr")
        await expect(rows).to_have_count(2)
        await expect(rows.nth(1).locator("td").first).to_have_text("canary")
        stable_requests = int(await rows.nth(0).locator("td").nth(1).inner_text())
        canary_requests = int(await rows.nth(1).locator("td").nth(1).inner_text())
        assert stable_requests + canary_requests == 200
        assert canary_requests > 0
        # Half the answers report usage (the unstreamed ones): each has max_tokens.
        await expect(rows.nth(0).locator("td").nth(6)).to_have_text("8.0")
        await expect(rows.nth(0).locator("td").nth(8)).to_have_text("–")  # no feedback yet
        # The chart: a step line at 20%, then up to 50%.
        step_up = re.compile(rf" {chart_y(20)}\b.* V {chart_y(50)}\b")
        await expect(card.locator(".weight-chart path.line")).to_have_attribute("d", step_up)
        await expect(card.locator("button[data-action=pause]:not(.force)")).to_be_enabled()
        await expect(card.locator("button[data-action=resume]:not(.force)")).to_be_disabled()

        # Without the token the proxy refuses, and the page says why.
        await card.locator("button[data-action=pause]:not(.force)").click()
        await expect(card.locator(".outcome")).to_contain_text("admin token is missing or wrong")
        await expect(card.locator(".status")).to_have_text("progressing")

        await page.locator("#token").fill(TOKEN)
        await card.locator("button[data-action=pause]:not(.force)").click()
        await expect(card.locator(".status")).to_have_text("paused")
        await expect(card.locator(".outcome")).to_have_text("pause: done, paused at 50%")
        await expect(card.locator("button[data-action=resume]:not(.force)")).to_be_enabled()
        await expect(card.locator("button[data-action=pause]:not(.force)")).to_be_disabled()
        await expect(card.locator(".decisions li").first).to_contain_text(
            "pause paused by an operator at 50%"
        )
        status = await admin(proxy, "GET", "/api/status")
        assert status["routes"][0]["rollout"]["status"] == "paused"

        SCREENSHOT.parent.mkdir(exist_ok=True)
        shot = tmp_path / "status-page.png"
        await page.screenshot(path=str(shot), full_page=True)
        await page.close()

    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a page with its content, not a blank one
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, SCREENSHOT)
    # The one refusal asked for (no token), and nothing else went wrong.
    assert problems == [
        "Failed to load resource: the server responded with a status of 401 (Unauthorized)"
    ]
    assert requested
    assert all(url.startswith(origin + "/") for url in requested), requested


@pytest.mark.timeout(30)
async def test_the_page_is_three_files_of_the_proxy_under_a_strict_policy(tmp_path: Path) -> None:
    text = proxy_yaml(route=auto_rollout(20), top=f"state: {{path: '{tmp_path / 's.db'}'}}")
    async with running_proxy(text, environ={}) as proxy, aiohttp.ClientSession() as session:
        origin = f"http://127.0.0.1:{proxy.server.admin_port}"
        served = {}
        for path in ("/", "/static/status.js", "/static/status.css", "/static/nothing.js"):
            async with session.get(origin + path) as response:
                served[path] = (response.status, response.content_type, response.headers)
        async with session.get(origin + "/api/status?decisions=20") as response:
            assert response.status == 200
        for bad in ("0", "21", "x"):
            async with session.get(f"{origin}/api/status?decisions={bad}") as response:
                assert response.status == 400
    assert [(status, kind) for status, kind, _ in served.values()] == [
        (200, "text/html"),
        (200, "text/javascript"),
        (200, "text/css"),
        (404, "text/plain"),
    ]
    policy = served["/"][2]["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self'" in policy
    assert "connect-src 'self'" in policy
