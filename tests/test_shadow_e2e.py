"""Shadow traffic end to end: real fake backends, real traffic through the HTTP port.

A canary in its shadow phase serves no user: a share of stable's requests is sent
again to it in the background, marked `x-canary-shadow: 1`, and the judge rolls it
back or takes it to the first step on those pairs alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
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
from tests.otlp_receiver import attributes, otlp_receiver

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
STREAM = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}


def write_config(
    path: Path,
    stable: str,
    canary: str,
    shadow: str,
    *,
    min_requests: int = 20,
) -> None:
    checks = "error_rate: {max: 0.2, max_increase: 0.05}"
    rollout = auto_rollout(0, steps="[20, 50, 100]", min_requests=min_requests, checks=checks)
    rollout += f"    shadow: {{{shadow}}}\n"
    path.write_text(
        proxy_yaml(
            stable,
            canary,
            route=sticky("shadow") + rollout,
            top=f"state: {{path: '{path.parent / 'state.db'}'}}",
        )
    )


@contextlib.asynccontextmanager
async def steady_traffic(
    url: str,
    pace_s: float = 0.004,
    body: dict[str, Any] = CHAT,
    headers: dict[str, str] | None = None,
) -> AsyncIterator[list[tuple[float, str]]]:
    """Requests from many users until the block ends; yields (when, variant) served."""
    served: list[tuple[float, str]] = []
    stop = asyncio.Event()

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            n = 0
            while not stop.is_set() and n < 5000:
                n += 1
                async with session.post(
                    f"{url}/v1/chat/completions",
                    json=body,
                    headers={"x-user-id": f"user-{n}"} | (headers or {}),
                ) as response:
                    await response.read()
                    served.append((time.time(), response.headers.get("x-canary-variant", "?")))
                await asyncio.sleep(pace_s)

    task = asyncio.create_task(run())
    try:
        yield served
    finally:
        stop.set()
        await task


async def admin_json(proxy: RunningProxy, method: str, path: str) -> Any:
    url = f"http://127.0.0.1:{proxy.server.admin_port}{path}"
    async with aiohttp.ClientSession() as session, session.request(method, url) as response:
        return json.loads(await response.read())


async def route_status(proxy: RunningProxy) -> dict[str, Any]:
    (route,) = (await admin_json(proxy, "GET", "/api/status"))["routes"]
    return route  # type: ignore[no-any-return]


async def wait_for_status(proxy: RunningProxy, wanted: str, timeout_s: float) -> dict[str, Any]:
    return await eventually(
        f"the rollout {wanted}",
        lambda: route_status(proxy),
        holds=lambda route: route["rollout"]["status"] == wanted,
        timeout_s=timeout_s,
        interval_s=0.2,
    )


def shadow_marked(request: dict[str, Any]) -> bool:
    return ["x-canary-shadow", "1"] in [[n.lower(), v] for n, v in request["headers"]]


async def shadow_counts(proxy: RunningProxy) -> dict[str, float]:
    url = f"http://127.0.0.1:{proxy.server.admin_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "canary_shadow_requests_total"
    }


@pytest.mark.timeout(60)
async def test_a_broken_canary_is_rolled_back_in_shadow_and_never_serves_a_user(
    tmp_path: Path,
) -> None:
    stable = start_backend("m-stable")
    canary = start_backend("m-canary", "--error-rate", "0.5", "--seed", "3")
    try:
        path = tmp_path / "proxy.yaml"
        write_config(path, stable.url, canary.url, "share: 0.5, duration: 30s")
        async with running_proxy_file(str(path)) as proxy:
            started = await route_status(proxy)
            async with steady_traffic(proxy.url) as served:
                route = await wait_for_status(proxy, "rolled_back", timeout_s=20)
            counts = await shadow_counts(proxy)
        received = await canary.requests()
        stable_stats = await stable.stats()
    finally:
        stable.stop()
        canary.stop()
    assert started["rollout"]["status"] == "shadow"
    assert started["weight"] == 0
    assert started["shadow"]["active"] is True
    assert {variant for _, variant in served} == {"stable"}
    # The canary saw shadow requests only: no user was ever served by it.
    assert received
    assert all(shadow_marked(request) for request in received)
    assert stable_stats["requests"] == len(served)
    decision = route["rollout"]["decisions"][0]
    assert decision["action"] == "rollback"
    assert decision["weight_before"] == 0
    assert decision["reason"].startswith("rolled back in shadow after 1 failing judgement")
    (check,) = decision["judgement"]["checks"]
    assert check["check"] == "error_rate"
    assert check["verdict"] == "fail"
    assert check["canary"] > 0.2
    assert route["weight"] == 0
    assert route["shadow"]["active"] is False
    assert counts["dispatched"] >= check["canary_n"]
    assert counts["failed"] > 0
    assert counts["completed"] > 0


@pytest.mark.timeout(60)
async def test_a_healthy_canary_moves_from_shadow_to_the_first_step(
    tmp_path: Path, pair: tuple[BackendProcess, BackendProcess]
) -> None:
    stable, canary = pair
    path = tmp_path / "proxy.yaml"
    write_config(path, stable.url, canary.url, "share: 0.5, duration: 2s")
    async with running_proxy_file(str(path)) as proxy, steady_traffic(proxy.url) as served:
        in_shadow = await route_status(proxy)
        route = await wait_for_status(proxy, "progressing", timeout_s=25)
        await eventually(
            "the canary serves users", lambda: "canary" in {v for _, v in served}, timeout_s=10
        )
    assert in_shadow["rollout"]["status"] == "shadow"
    assert route["weight"] == 20
    restart, advance = reversed(route["rollout"]["decisions"][:2])
    assert restart["action"] == "restart"
    assert restart["reason"] == "weight 0%: a new canary starts in shadow"
    assert advance["action"] == "advance"
    assert advance["weight_before"] == 0
    assert advance["weight_after"] == 20
    assert "passed in shadow" in advance["reason"]
    # No user got the canary before it left shadow.
    left_shadow = datetime.datetime.fromisoformat(advance["at"]).timestamp()
    assert min(at for at, variant in served if variant == "canary") >= left_shadow
    assert any(at < left_shadow for at, _ in served)
    (check,) = advance["judgement"]["checks"]
    assert check["verdict"] == "pass"
    assert check["canary_n"] >= 20


def _shadow_yaml(stable: str, canary: str, shadow: str, tmp_path: Path) -> Path:
    path = tmp_path / "proxy.yaml"
    write_config(path, stable, canary, shadow)
    return path


@pytest.mark.timeout(60)
async def test_a_full_shadow_queue_drops_and_counts_and_users_do_not_wait(
    tmp_path: Path, pair: tuple[BackendProcess, BackendProcess]
) -> None:
    stable, canary = pair
    # Every user shadowed; the canary takes 2 s per shadow request, one at a time, one waiting.
    path = _shadow_yaml(
        stable.url, canary.url, "share: 1, duration: 1h, max_concurrency: 1, queue: 1", tmp_path
    )
    slow_canary = {"x-fake-only": "m-canary", "x-fake-latency": "2"}
    async with (
        running_proxy_file(str(path)) as proxy,
        openai.AsyncOpenAI(
            base_url=f"{proxy.url}/v1", api_key="x", max_retries=0, default_headers=slow_canary
        ) as client,
    ):
        took = []
        for n in range(10):
            began = time.monotonic()
            answer = await client.chat.completions.with_raw_response.create(
                model="m",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=2,
                extra_headers={"x-user-id": f"u{n}"},
            )
            took.append(time.monotonic() - began)
            assert answer.headers["x-canary-variant"] == "stable"
            assert answer.parse().model == "m-stable"
        counts = await shadow_counts(proxy)
        shown = (await route_status(proxy))["shadow"]
        received = await canary.requests()
        admin = f"http://127.0.0.1:{proxy.server.admin_port}"
        printed = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "proxy", "status", "--admin", admin],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert counts == {"dispatched": 1, "dropped": 8}
    (row,) = [line for line in printed.stdout.splitlines() if line.startswith("chat ")]
    assert row.split()[4:6] == ["shadow", "shadow"]  # status, and where in the steps
    assert "in shadow, 59m" in row
    # The one sent may have ended by then: it takes the canary 2 s.
    assert re.search(r"shadow requests [01] completed, 0 failed, 8 dropped", row), row
    assert shown["requests"] == {"dispatched": 1, "dropped": 8, "completed": 0, "failed": 0}
    assert max(took) < 1.0  # the 2-second canary never held a user
    assert len(received) == 1
    assert shadow_marked(received[0])


@pytest.mark.timeout(60)
async def test_only_idempotent_unmarked_llm_calls_are_shadowed(
    tmp_path: Path, pair: tuple[BackendProcess, BackendProcess]
) -> None:
    stable, canary = pair
    path = _shadow_yaml(
        stable.url, canary.url, "share: 1, duration: 1h, never_tools: [send_email]", tmp_path
    )
    tool = {"type": "function", "function": {"name": "send_email", "parameters": {}}}
    harmless = {"type": "function", "function": {"name": "lookup", "parameters": {}}}
    async with running_proxy_file(str(path)) as proxy, aiohttp.ClientSession() as session:

        async def send(
            path: str, body: object, headers: dict[str, str] | None = None, method: str = "POST"
        ) -> None:
            async with session.request(
                method,
                f"{proxy.url}{path}",
                data=body if isinstance(body, bytes) else json.dumps(body).encode(),
                headers={"x-user-id": "someone", "content-type": "application/json"}
                | (headers or {}),
            ) as response:
                await response.read()
                assert response.headers["x-canary-variant"] == "stable"

        await send("/v1/chat/completions", {**CHAT, "tools": [tool]})  # side effects
        await send("/v1/chat/completions", CHAT, {"x-canary-no-shadow": "1"})  # opted out
        await send("/v1/models", b"", method="GET")  # not an LLM call
        await send("/v1/chat/completions", b"{not json")  # stable answers; nothing to shadow
        await send("/v1/chat/completions", CHAT, {"x-canary-shadow": "1"})  # forged: stripped
        await send("/v1/chat/completions", {**CHAT, "tools": [harmless]})
        await send("/v1/embeddings", {"model": "m", "input": "hi"})
        await eventually(
            "three shadow requests",
            canary.requests,
            holds=lambda r: len(r) >= 3,
            timeout_s=5,
        )
        await asyncio.sleep(0.3)
        received = await canary.requests()
        seen_by_stable = await stable.requests()
    assert [(r["method"], r["path"]) for r in received] == [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/embeddings"),
    ]
    assert all(shadow_marked(r) for r in received)
    assert "lookup" in received[1]["body"]
    assert json.loads(received[0]["body"]) == CHAT
    assert len(seen_by_stable) == 7
    assert not any(shadow_marked(r) for r in seen_by_stable)


async def post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> bytes:
    async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as answer:
        assert answer.headers["x-canary-variant"] == "stable"
        return await answer.read()


@pytest.mark.timeout(60)
async def test_a_saturated_canary_is_given_a_rest_and_the_queue_waits_for_it(
    tmp_path: Path, pair: tuple[BackendProcess, BackendProcess]
) -> None:
    stable, canary = pair
    path = _shadow_yaml(
        stable.url, canary.url, "share: 1, duration: 1h, max_concurrency: 1, queue: 2", tmp_path
    )
    user = {"x-user-id": "u"}
    async with running_proxy_file(str(path)) as proxy, aiohttp.ClientSession() as session:
        await post(
            session, proxy.url, CHAT, user | {"x-fake-only": "m-canary", "x-fake-status": "429"}
        )
        await eventually(
            "the 429", lambda: shadow_counts(proxy), holds=lambda c: "failed" in c, timeout_s=5
        )
        saturated_at = time.monotonic()
        await asyncio.gather(*(post(session, proxy.url, CHAT, user) for _ in range(3)))
        waiting = await canary.requests()
        waited_s = time.monotonic() - saturated_at
        sent = await eventually(
            "the queue sent after the rest",
            canary.requests,
            holds=lambda r: len(r) == 3,
            timeout_s=5,
        )
        counts = await shadow_counts(proxy)
    assert waited_s < 0.9  # the three came while the canary rested
    assert len(waiting) == 1  # nothing more while it rests
    rest_s = sent[1]["received_at"] - sent[0]["received_at"]
    assert rest_s >= 1.0  # a second's rest after the 429, no Retry-After given
    assert all(shadow_marked(r) for r in sent)
    assert counts == {"dispatched": 3, "dropped": 1, "failed": 1, "completed": 2}


@pytest.mark.timeout(60)
async def test_streams_rewrites_and_failed_shadow_requests_make_pairs(
    tmp_path: Path, pair: tuple[BackendProcess, BackendProcess]
) -> None:
    stable, canary = pair
    path = tmp_path / "proxy.yaml"
    rollout = auto_rollout(0, steps="[20, 100]", min_requests=1000)
    rollout += "    shadow: {share: 1, duration: 1h}\n"
    path.write_text(
        proxy_yaml(
            stable.url,
            canary.url,
            route=sticky("shadow") + "model_rewrite: {canary: m-two}\n" + rollout,
            top=f"state: {{path: '{tmp_path / 'state.db'}'}}",
            backend="timeouts: {first_byte: 500ms}",
        )
    )
    user = {"x-user-id": "u"}
    slow_canary = user | {"x-fake-only": "m-canary", "x-fake-latency": "2"}
    async with running_proxy_file(str(path)) as proxy, aiohttp.ClientSession() as session:
        # Tokens 50 a second: stable's answer reaches the relay in several chunks.
        streamed = await post(session, proxy.url, STREAM, user | {"x-fake-tokens-per-s": "50"})
        await eventually(
            "a pair", lambda: shadow_counts(proxy), holds=lambda c: "completed" in c, timeout_s=5
        )
        no_end = user | {"x-fake-only": "m-canary", "x-fake-no-done": "1"}
        await post(session, proxy.url, STREAM, no_end)  # the canary's stream has no end
        await post(session, proxy.url, CHAT, slow_canary)  # the canary times out
        await eventually(
            "a timeout",
            lambda: shadow_counts(proxy),
            holds=lambda c: c.get("failed") == 2,
            timeout_s=5,
        )
        received = await canary.requests()
        canary.stop()
        await post(session, proxy.url, CHAT, user)  # the canary is down
        counts = await eventually(
            "a refused connection",
            lambda: shadow_counts(proxy),
            holds=lambda c: c.get("failed") == 3,
            timeout_s=5,
        )
        pairs = (await route_status(proxy))["shadow"]["pairs"]
    assert b"data: [DONE]" in streamed
    assert streamed.count(b'"content":"tok') == 2
    assert json.loads(received[0]["body"]) == {**STREAM, "model": "m-two"}
    assert counts == {"dispatched": 4, "completed": 1, "failed": 3}
    assert pairs["stable"]["requests"] == pairs["canary"]["requests"] == 4
    assert pairs["stable"]["error_rate"] == 0
    assert pairs["canary"]["error_rate"] == 0.75
    assert pairs["canary"]["errors_by_type"] == {"stream_cut": 1, "timeout": 1, "connect_error": 1}
    assert pairs["canary"]["ttft_s"]["p50"] is not None
    assert (
        pairs["canary"]["output_tokens_per_request"] == pairs["stable"]["output_tokens_per_request"]
    )


@pytest.mark.timeout(60)
async def test_a_canary_that_answers_otherwise_is_rolled_back_on_its_pairs(
    tmp_path: Path, pair: tuple[BackendProcess, BackendProcess]
) -> None:
    stable, canary = pair
    checks = "checks: {agreement: {min: 0.8}, output_length: {max_ratio: 2}}"
    path = _shadow_yaml(stable.url, canary.url, f"share: 0.5, duration: 30s, {checks}", tmp_path)
    # The same question at temperature 0; the canary answers 2 tokens where stable gives 16.
    asked = {**CHAT, "max_tokens": 16, "temperature": 0}
    shorter = {"x-fake-only": "m-canary", "x-fake-tokens": "2"}
    async with (
        running_proxy_file(str(path)) as proxy,
        steady_traffic(proxy.url, body=asked, headers=shorter) as served,
    ):
        route = await wait_for_status(proxy, "rolled_back", timeout_s=20)
    assert {variant for _, variant in served} == {"stable"}
    decision = route["rollout"]["decisions"][0]
    assert decision["reason"].startswith("rolled back in shadow after 1 failing judgement")
    checks_seen = {c["check"]: c for c in decision["judgement"]["checks"]}
    assert checks_seen["error_rate"]["verdict"] != "fail"  # it answered, just otherwise
    failed = [c for c in checks_seen.values() if c["verdict"] == "fail"]
    assert {c["check"] for c in failed} <= {"agreement", "output_length"}
    assert failed
    for check in failed:
        assert check["canary"] == 1.0  # every pair compared disagreed, or was far shorter
        assert check["reason"].startswith(("answer disagreement 100.00%", "output length mismatch"))
    pairs = route["shadow"]["pairs"]["canary"]
    assert pairs["disagreement_rate"] == 1.0
    assert pairs["length_mismatch_rate"] == 1.0


@pytest.mark.timeout(60)
async def test_a_traced_request_shows_its_shadow_as_a_span_of_its_own(
    tmp_path: Path, pair: tuple[BackendProcess, BackendProcess]
) -> None:
    stable, canary = pair
    async with otlp_receiver() as receiver:
        path = tmp_path / "proxy.yaml"
        rollout = auto_rollout(0, steps="[20, 100]") + "    shadow: {share: 1, duration: 1h}\n"
        path.write_text(
            proxy_yaml(
                stable.url,
                canary.url,
                route=sticky("shadow") + rollout,
                top=f"state: {{path: '{tmp_path / 'state.db'}'}}\n"
                f"telemetry: {{otlp_endpoint: '{receiver.endpoint}', trace_sample_ratio: 1}}",
            )
        )
        async with running_proxy_file(str(path)) as proxy, aiohttp.ClientSession() as session:
            await post(session, proxy.url, CHAT, {"x-user-id": "u"})
            spans = await receiver.wait_for_spans(3)
    server = next(span for span in spans if span.kind == Span.SPAN_KIND_SERVER)
    shadow, served = sorted(
        (span for span in spans if span.kind == Span.SPAN_KIND_CLIENT),
        key=lambda span: "canary.shadow" not in attributes(span),
    )
    assert shadow.name == "shadow chat"
    assert shadow.parent_span_id == served.parent_span_id == server.span_id
    assert shadow.trace_id == server.trace_id
    assert shadow.start_time_unix_nano >= served.end_time_unix_nano
    shown = attributes(shadow)
    assert shown["canary.shadow"] is True
    assert shown["canary.variant"] == "canary"
    assert shown["canary.backend"] == "v2"
    assert shown["http.response.status_code"] == 200
    assert shown["gen_ai.usage.output_tokens"] == 2
    assert "feature_flag.result.variant" not in shown
    assert attributes(served)["canary.variant"] == "stable"
    assert attributes(server)["canary.variant"] == "stable"
