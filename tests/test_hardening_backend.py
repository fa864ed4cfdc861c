"""Backend faults: each has a defined answer (SPEC §5), counts as an error of its variant,
and leaves no connection, task or file descriptor behind (issue: hardening).

The answers themselves are also tested in `test_proxy_errors` and `test_streaming`;
here each fault is followed to the metrics on the admin port, and to the process's
file descriptors and tasks.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.fake_backend.wire import JSON_GARBAGE_BODY
from tests.conftest import Backends
from tests.harness import RunningProxy, eventually, proxy_yaml, refused_port, running_proxy

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
TIMEOUTS = "timeouts: {connect: 1s, first_byte: 300ms, idle: 300ms}"
ABORTED = -1  # the client connection was cut without the end of the answer


@dataclass(frozen=True)
class Fault:
    headers: dict[str, str]
    stream: bool
    status: int  # what the client sees, or ABORTED
    counted_as: str  # the error.type it is counted under
    code: str | None = None  # the proxy's error code, when the proxy answers
    refused: bool = False  # the canary's port is closed


FAULTS = {
    "connection-refused": Fault({}, False, 502, "connect_error", "upstream_unreachable", True),
    "reset-before-headers": Fault(
        {"x-fake-reset": "before-headers"}, False, 502, "protocol_error", "upstream_protocol_error"
    ),
    "reset-after-headers": Fault(
        {"x-fake-reset": "after-headers"}, True, 502, "protocol_error", "upstream_protocol_error"
    ),
    "not-http": Fault(
        {"x-fake-garbage": "1"}, False, 502, "protocol_error", "upstream_protocol_error"
    ),
    "hang-before-first-byte": Fault(
        {"x-fake-hang": "1"}, False, 504, "timeout", "upstream_timeout"
    ),
    "stream-without-first-token": Fault(
        {"x-fake-ttft": "3"}, True, 504, "timeout", "upstream_timeout"
    ),
    "silence-mid-stream": Fault({"x-fake-tokens-per-s": "1"}, True, ABORTED, "idle_timeout"),
    "stream-cut": Fault({"x-fake-cut-after": "2"}, True, ABORTED, "stream_cut"),
    "body-shorter-than-content-length": Fault(
        {"x-fake-cut-after": "2"}, False, ABORTED, "stream_cut"
    ),
    "stream-without-done": Fault(
        {"x-fake-no-done": "1", "x-fake-tokens-per-s": "50"}, True, ABORTED, "stream_cut"
    ),
    "body-longer-than-content-length": Fault({"x-fake-overrun": "1"}, False, 200, "protocol_error"),
    "json-that-is-not-json": Fault({"x-fake-json-garbage": "1"}, False, 200, "bad_response"),
}


def canary_config(backends: Backends, refused: bool = False) -> str:
    canary = f"http://127.0.0.1:{refused_port()}" if refused else backends.canary.url
    return proxy_yaml(
        backends.stable.url,
        canary,
        route="sticky: {keys: [header:x-user-id], salt: s}\nrollout: {weight: 100}",
        backend=TIMEOUTS,
    )


async def ask(proxy: RunningProxy, fault: Fault) -> tuple[int, bytes]:
    """Send one chat request with the fault's hooks: the status and body, or ABORTED."""
    headers = {"x-user-id": "u", **fault.headers}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{proxy.url}/v1/chat/completions",
            json={**CHAT, "stream": fault.stream},
            headers=headers,
        ) as response:
            try:
                return response.status, await response.read()
            except aiohttp.ClientPayloadError:
                return ABORTED, b""


async def upstream_counts(proxy: RunningProxy) -> dict[tuple[str, str, str], float]:
    """`canary_upstream_requests_total` by (variant, outcome, error_type), from /metrics."""
    url = f"http://127.0.0.1:{proxy.server.admin_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = (await response.read()).decode()
    counts: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "canary_upstream_requests_total":
                labels = sample.labels
                key = (labels["canary_variant"], labels["outcome"], labels.get("error_type", ""))
                counts[key] = counts.get(key, 0) + sample.value
    return counts


def busy_connections(proxy: RunningProxy) -> int:
    forwarder = proxy.server._forwarder
    assert forwarder is not None
    upstreams = forwarder.snapshot.upstreams
    return sum(
        upstreams[name].open_connections - upstreams[name].idle_connections for name in ("v1", "v2")
    )


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
async def test_a_backend_fault_has_its_answer_and_counts_against_its_variant(
    backends: Backends, fault: Fault
) -> None:
    async with running_proxy(canary_config(backends, fault.refused)) as proxy:
        status, body = await ask(proxy, fault)
        counts = await upstream_counts(proxy)
        await eventually(
            "no busy upstream connection",
            lambda: busy_connections(proxy),
            holds=lambda busy: busy == 0,
            timeout_s=2,
        )
    assert status == fault.status, body[:300]
    if fault.code is not None:
        assert json.loads(body)["error"]["code"] == fault.code
    assert counts == {("canary", "error", fault.counted_as): 1}


async def test_bytes_past_the_content_length_are_dropped_with_the_connection(
    backends: Backends,
) -> None:
    fault = FAULTS["body-longer-than-content-length"]
    async with running_proxy(canary_config(backends)) as proxy:
        _, body = await ask(proxy, fault)
        # The extra bytes are not read as the answer to the next request.
        status, after = await ask(proxy, Fault({}, False, 200, ""))
        counts = await upstream_counts(proxy)
    assert body.startswith(b'{"id":"chatcmpl-fake-')
    assert not body.endswith(b"}")  # what the backend declared: half of its answer
    assert status == 200
    assert json.loads(after)["model"] == "m-canary"
    assert counts == {("canary", "error", "protocol_error"): 1, ("canary", "ok", ""): 1}


async def test_a_200_that_is_not_json_passes_untouched(backends: Backends) -> None:
    async with running_proxy(canary_config(backends)) as proxy:
        status, body = await ask(proxy, FAULTS["json-that-is-not-json"])
    assert (status, body) == (200, JSON_GARBAGE_BODY)


@pytest.mark.timeout(40)
async def test_faults_leak_no_file_descriptor_task_or_connection(backends: Backends) -> None:
    config = canary_config(backends)
    faults = [fault for fault in FAULTS.values() if not fault.refused]

    async def every_fault(proxy: RunningProxy) -> None:
        await asyncio.gather(*(ask(proxy, fault) for fault in faults))

    async with running_proxy(config) as proxy:
        await every_fault(proxy)  # warm: pools, lazily made objects
        await eventually(
            "no busy upstream connection",
            lambda: busy_connections(proxy),
            holds=lambda busy: busy == 0,
            timeout_s=2,
        )
        fds = open_fds()
        tasks = len(asyncio.all_tasks())
        for _ in range(3):
            await every_fault(proxy)
        await eventually(
            "no busy upstream connection",
            lambda: busy_connections(proxy),
            holds=lambda busy: busy == 0,
            timeout_s=2,
        )
        await eventually(
            f"at most {fds} open files", open_fds, holds=lambda now: now <= fds, timeout_s=2
        )
        assert len(asyncio.all_tasks()) <= tasks
