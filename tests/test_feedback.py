"""User feedback through the public port: POST /v1/feedback rates an answered request for
the variant that served it, and /api/status and /metrics show the counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import Backends
from tests.harness import proxy_yaml, running_proxy, running_proxy_file, sticky

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


async def chat(session: aiohttp.ClientSession, url: str, user: str) -> tuple[str, str]:
    """One answered chat request: its x-request-id and the variant that served it."""
    async with session.post(
        f"{url}/v1/chat/completions", json=CHAT, headers={"x-user-id": user}
    ) as response:
        assert response.status == 200
        await response.read()
        return response.headers["x-request-id"], response.headers["x-canary-variant"]


async def rate(
    session: aiohttp.ClientSession, url: str, body: object
) -> tuple[int, dict[str, Any]]:
    async with session.post(f"{url}/v1/feedback", data=json.dumps(body).encode()) as response:
        return response.status, json.loads(await response.read())


async def status_of(session: aiohttp.ClientSession, admin: str) -> dict[str, Any]:
    async with session.get(f"{admin}/api/status") as response:
        document: dict[str, Any] = await response.json()
        return document


async def test_feedback_counts_for_the_variant_that_answered(backends: Backends) -> None:
    yaml = proxy_yaml(
        backends.stable.url, backends.canary.url, "rollout: {weight: 50}\n" + sticky("f")
    )
    async with running_proxy(yaml) as proxy, aiohttp.ClientSession() as session:
        admin = f"http://127.0.0.1:{proxy.server.admin_port}"
        served = [await chat(session, proxy.url, f"user-{n}") for n in range(16)]
        by_variant = {
            v: [rid for rid, served_by in served if served_by == v] for v in ("stable", "canary")
        }
        assert by_variant["stable"]
        assert by_variant["canary"]
        # Canary answers get thumbs down, stable ones thumbs up; one stable answer a 0.
        for request_id in by_variant["canary"]:
            status, answer = await rate(session, proxy.url, {"request_id": request_id, "score": -1})
            assert status == 200, answer
            assert answer == {
                "request_id": request_id,
                "route": "chat",
                "variant": "canary",
                "score": "negative",
            }
        neutral, *liked = by_variant["stable"]
        assert (await rate(session, proxy.url, {"request_id": neutral, "score": 0}))[1][
            "score"
        ] == "neutral"
        for request_id in liked:
            assert (await rate(session, proxy.url, {"request_id": request_id, "score": 4.5}))[
                0
            ] == 200

        # A request id takes one rating.
        status, answer = await rate(
            session, proxy.url, {"request_id": by_variant["canary"][0], "score": 1}
        )
        assert status == 404
        assert answer["error"]["code"] == "unknown_request_id"

        variants = (await status_of(session, admin))["routes"][0]["variants"]
        canary, stable = variants["canary"], variants["stable"]
        assert canary["feedback"] == canary["feedback_negative"] == len(by_variant["canary"])
        assert canary["feedback_negative_rate"] == 1.0
        assert stable["feedback"] == len(by_variant["stable"])
        assert stable["feedback_negative"] == 0
        assert stable["feedback_negative_rate"] == 0.0

        async with session.get(f"{admin}/metrics") as response:
            metrics = await response.text()
    lines = {line for line in metrics.splitlines() if line.startswith("canary_feedback_total{")}
    series = 'canary_feedback_total{canary_route="chat",canary_variant="%s",score="%s"} %s'
    assert lines == {
        series % ("canary", "negative", f"{len(by_variant['canary'])}.0"),
        series % ("stable", "neutral", "1.0"),
        series % ("stable", "positive", f"{len(liked)}.0"),
    }


async def test_feedback_that_cannot_be_counted_says_why(backends: Backends) -> None:
    yaml = proxy_yaml(backends.stable.url, backends.canary.url, top="limits: {feedback_ids: 2}")
    async with running_proxy(yaml) as proxy, aiohttp.ClientSession() as session:
        oldest, _ = await chat(session, proxy.url, "a")
        second, _ = await chat(session, proxy.url, "b")
        newest, _ = await chat(session, proxy.url, "c")
        # Only the last two answered ids are remembered: the oldest is forgotten.
        status, answer = await rate(session, proxy.url, {"request_id": oldest, "score": -1})
        assert status == 404
        assert answer["error"]["code"] == "unknown_request_id"
        assert "among the last 2" in answer["error"]["message"]
        assert (await rate(session, proxy.url, {"request_id": second, "score": -1}))[0] == 200
        for body in (
            {"score": -1},
            {"request_id": 7, "score": -1},
            {"request_id": newest},
            {"request_id": newest, "score": True},
            {"request_id": newest, "score": "bad"},
        ):
            status, answer = await rate(session, proxy.url, body)
            assert (status, answer["error"]["code"]) == (400, "bad_feedback"), body
        # Python's JSON reader takes NaN; a score must still be a finite number.
        nan = b'{"request_id": "%s", "score": NaN}' % newest.encode()
        async with session.post(f"{proxy.url}/v1/feedback", data=nan) as response:
            assert response.status == 400
        async with session.post(f"{proxy.url}/v1/feedback", data=b"{not json") as response:
            assert response.status == 400
        async with session.post(
            f"{proxy.url}/v1/feedback", data=b"x" * 5000, headers={"content-type": "text/plain"}
        ) as response:
            assert response.status == 413
        # None of that used up the newest id.
        assert (await rate(session, proxy.url, {"request_id": newest, "score": 1}))[0] == 200


async def test_feedback_off_forwards_the_path(backends: Backends) -> None:
    yaml = proxy_yaml(backends.stable.url, backends.canary.url, top="limits: {feedback_ids: 0}")
    async with running_proxy(yaml) as proxy, aiohttp.ClientSession() as session:
        await backends.stable.clear()
        async with session.post(
            f"{proxy.url}/v1/feedback", json={"request_id": "x", "score": -1}
        ) as response:
            await response.read()
            assert response.headers["x-canary-variant"] == "stable"
        paths = [recorded["path"] for recorded in await backends.stable.requests()]
    assert paths == ["/v1/feedback"]


async def test_a_reload_that_remembers_fewer_ids_forgets_the_oldest(
    backends: Backends, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        proxy_yaml(backends.stable.url, backends.canary.url, top="limits: {feedback_ids: 3}")
    )
    async with (
        running_proxy_file(str(path), watch=False) as proxy,
        aiohttp.ClientSession() as session,
    ):
        ids = [(await chat(session, proxy.url, f"user-{n}"))[0] for n in range(3)]
        path.write_text(
            proxy_yaml(backends.stable.url, backends.canary.url, top="limits: {feedback_ids: 1}")
        )
        async with session.post(
            f"http://127.0.0.1:{proxy.server.admin_port}/api/reload"
        ) as response:
            assert (await response.json())["outcome"] == "applied"
        statuses = [(await rate(session, proxy.url, {"request_id": i, "score": 1}))[0] for i in ids]
    assert statuses == [404, 404, 200]
