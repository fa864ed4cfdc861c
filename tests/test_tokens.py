"""Resource use per variant, through the public and admin ports: output tokens per
answer and tokens per second in an answer, in /api/status and /metrics."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest

from tests.conftest import Backends
from tests.harness import proxy_yaml, running_proxy


def series(metrics: str, name: str, **labels: str) -> float:
    """The value of the one series of `name` with these labels (among others)."""
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith(name + "{")
        and all(f'{key}="{value}"' in line for key, value in labels.items())
    ]
    assert len(values) == 1, (name, labels, values)
    return values[0]


async def test_output_tokens_per_answer_and_per_second(backends: Backends) -> None:
    yaml = proxy_yaml(backends.stable.url, backends.canary.url, "rollout: {weight: 100}")
    async with running_proxy(yaml) as proxy, aiohttp.ClientSession() as session:
        admin = f"http://127.0.0.1:{proxy.server.admin_port}"
        for tokens in (2, 4, 6):
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens}
            async with session.post(f"{proxy.url}/v1/chat/completions", json=body) as response:
                assert response.status == 200
                await response.read()
        # A stream without include_usage and a model list report no tokens: they do not
        # dilute the mean.
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with session.post(f"{proxy.url}/v1/chat/completions", json=body) as response:
            await response.read()
        async with session.get(f"{proxy.url}/v1/models") as response:
            assert response.status == 200
        async with session.get(f"{admin}/api/status") as response:
            status: dict[str, Any] = await response.json()
        async with session.get(f"{admin}/metrics") as response:
            metrics = await response.text()
    canary = status["routes"][0]["variants"]["canary"]
    assert canary["requests"] == 5
    assert canary["output_tokens"] == 12
    assert canary["output_tokens_per_request"] == 4.0
    assert canary["output_tokens_per_s"] > 0
    assert status["routes"][0]["variants"]["stable"]["output_tokens_per_request"] is None

    labels = {"canary_variant": "canary", "gen_ai_operation_name": "chat"}
    output = dict(labels, gen_ai_token_type="output")
    assert series(metrics, "gen_ai_client_token_usage_sum", **output) == 12
    assert series(metrics, "gen_ai_client_token_usage_count", **output) == 3
    seconds = series(metrics, "canary_upstream_token_time_seconds_total", **labels)
    assert 0 < seconds < 30
    # The status page's figure and the metrics' agree: tokens over the time they took.
    assert canary["output_tokens_per_s"] == pytest.approx(12 / seconds)
    assert re.search(r"# TYPE canary_upstream_token_time_seconds_total counter", metrics)
