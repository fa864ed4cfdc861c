"""Traces and metrics as a collector receives them, and the admin port (SPEC §7, §8).

A real OTLP/HTTP receiver decodes what the proxy exports with opentelemetry-proto;
requests go through the public port with the official openai client or aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import time
from typing import Any

import aiohttp
import mmh3
import openai
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Backends
from tests.harness import RunningProxy, eventually, proxy_yaml, refused_port, running_proxy
from tests.otlp_receiver import attributes, grpc_receiver, otlp_receiver

CHAT = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
SECRET_USER = "secret-user-4711"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def telemetry_yaml(endpoint: str, ratio: float = 1.0, protocol: str = "http/protobuf") -> str:
    return (
        f"telemetry: {{otlp_endpoint: '{endpoint}', trace_sample_ratio: {ratio}, "
        f"otlp_protocol: {protocol}}}"
    )


def by_kind(spans: list[Span], kind: int) -> list[Span]:
    return [span for span in spans if span.kind == kind]


async def post(url: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.post(url, **kwargs) as response:
        return (
            response.status,
            {k.lower(): v for k, v in response.headers.items()},
            await response.read(),
        )


async def admin_get(proxy: RunningProxy, path: str) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{proxy.server.admin_port}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.read()


async def test_a_request_is_a_server_span_with_a_client_span_per_attempt(
    backends: Backends,
) -> None:
    async with otlp_receiver() as receiver:
        config = proxy_yaml(
            backends.stable.url,
            backends.canary.url,
            route=(
                "match: {path_prefix: /v1/}\n"
                "sticky: {keys: [header:x-user-id], salt: s1}\n"
                "rollout: {weight: 100}"
            ),
            top=telemetry_yaml(receiver.endpoint),
        )
        async with running_proxy(config) as proxy:
            status, _, _ = await post(
                f"{proxy.url}/v1/chat/completions", json=CHAT, headers={"x-user-id": SECRET_USER}
            )
            spans = await receiver.wait_for_spans(2)
        version = proxy.server.config.version
    assert status == 200
    (server,) = by_kind(spans, Span.SPAN_KIND_SERVER)
    (client,) = by_kind(spans, Span.SPAN_KIND_CLIENT)
    assert client.trace_id == server.trace_id
    assert client.parent_span_id == server.span_id
    assert server.parent_span_id == b""
    assert server.name == "POST /v1/"
    assert client.name == "chat llama-3-8b"
    bucket = mmh3.hash(f"s1:{SECRET_USER}", 0, signed=False) % 10000
    server_attributes = attributes(server)
    assert server_attributes["http.request.method"] == "POST"
    assert server_attributes["http.response.status_code"] == 200
    assert server_attributes["http.route"] == "/v1/"
    assert server_attributes["canary.variant"] == "canary"
    client_attributes = attributes(client)
    expected = {
        "canary.route": "chat",
        "canary.variant": "canary",
        "canary.backend": "v2",
        "canary.bucket": bucket,
        "canary.key_source": "header:x-user-id",
        "canary.fallback": False,
        "canary.config_version": version,
        "feature_flag.key": "chat",
        "feature_flag.result.variant": "canary",
        "http.response.status_code": 200,
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "llama-3-8b",
        "gen_ai.request.stream": False,
        "gen_ai.response.model": "m-canary",
        "gen_ai.response.finish_reasons": ["length"],
        "gen_ai.usage.input_tokens": 1,
        "gen_ai.usage.output_tokens": 3,
        "server.address": "127.0.0.1",
        "server.port": backends.canary.port,
    }
    assert {key: client_attributes.get(key) for key in expected} == expected
    assert "error.type" not in client_attributes
    assert client.end_time_unix_nano >= client.start_time_unix_nano
    assert server.start_time_unix_nano <= client.start_time_unix_nano
    assert server.end_time_unix_nano >= client.end_time_unix_nano
    (resource_spans,) = receiver.trace_requests[0].resource_spans
    resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
    assert resource["service.name"] == "canary-proxy"
    assert resource["service.instance.id"] == f"{socket.gethostname()}:{os.getpid()}"
    assert receiver.content_types == {"application/x-protobuf"}


async def test_a_stream_has_a_first_token_event_and_its_usage(backends: Backends) -> None:
    async with otlp_receiver() as receiver:
        config = proxy_yaml(
            backends.stable.url, backends.canary.url, top=telemetry_yaml(receiver.endpoint)
        )
        async with running_proxy(config) as proxy:
            client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
            stream = await client.chat.completions.create(
                model="llama-3-8b",
                messages=[{"role": "user", "content": "one two three"}],
                stream=True,
                max_tokens=4,
                stream_options={"include_usage": True},
                extra_headers={"x-fake-ttft": "0.2"},
            )
            async for _ in stream:
                pass
            await client.close()
            spans = await receiver.wait_for_spans(2)
    (client_span,) = by_kind(spans, Span.SPAN_KIND_CLIENT)
    values = attributes(client_span)
    assert values["gen_ai.request.stream"] is True
    assert values["gen_ai.usage.input_tokens"] == 3
    assert values["gen_ai.usage.output_tokens"] == 4
    assert values["gen_ai.response.finish_reasons"] == ["length"]
    (event,) = client_span.events
    assert event.name == "first_token"
    ttft = {kv.key: kv.value.double_value for kv in event.attributes}[
        "gen_ai.response.time_to_first_chunk"
    ]
    assert 0.2 <= ttft < 2.0
    assert values["gen_ai.response.time_to_first_chunk"] == ttft
    assert client_span.start_time_unix_nano < event.time_unix_nano <= client_span.end_time_unix_nano


async def test_a_backend_error_marks_the_spans(backends: Backends) -> None:
    async with otlp_receiver() as receiver:
        config = proxy_yaml(
            backends.stable.url, backends.canary.url, top=telemetry_yaml(receiver.endpoint)
        )
        async with running_proxy(config) as proxy:
            status, _, _ = await post(
                f"{proxy.url}/v1/chat/completions", json=CHAT, headers={"x-fake-status": "503"}
            )
            spans = await receiver.wait_for_spans(2)
    assert status == 503
    (server,) = by_kind(spans, Span.SPAN_KIND_SERVER)
    (client,) = by_kind(spans, Span.SPAN_KIND_CLIENT)
    assert attributes(client)["error.type"] == "503"
    assert client.status.code == Status.STATUS_CODE_ERROR
    assert attributes(server)["error.type"] == "503"
    assert server.status.code == Status.STATUS_CODE_ERROR


async def test_a_fallback_is_two_client_spans_and_the_canary_failure_shows(
    backends: Backends,
) -> None:
    async with otlp_receiver() as receiver:
        config = proxy_yaml(
            backends.stable.url,
            backends.canary.url,
            route="fallback_to_stable: true\nrollout: {weight: 100}",
            top=telemetry_yaml(receiver.endpoint),
        )
        async with running_proxy(config) as proxy:
            status, headers, _ = await post(
                f"{proxy.url}/v1/chat/completions",
                json=CHAT,
                headers={"x-user-id": "u", "x-fake-only": "m-canary", "x-fake-status": "500"},
            )
            spans = await receiver.wait_for_spans(3)
            code, body = await admin_get(proxy, "/api/status")
    assert status == 200
    assert headers["x-canary-variant"] == "stable"
    # The status page and the rollout judge count the failed attempt against the canary.
    assert code == 200
    variants = json.loads(body)["routes"][0]["variants"]
    assert variants["canary"]["requests"] == 1
    assert variants["canary"]["errors_by_type"] == {"500": 1}
    assert variants["stable"]["requests"] == 1
    assert variants["stable"]["errors"] == 0
    (server,) = by_kind(spans, Span.SPAN_KIND_SERVER)
    clients = sorted(by_kind(spans, Span.SPAN_KIND_CLIENT), key=lambda s: s.start_time_unix_nano)
    assert [attributes(s)["canary.variant"] for s in clients] == ["canary", "stable"]
    canary, stable = (attributes(s) for s in clients)
    assert canary["error.type"] == "500"
    assert canary["canary.fallback"] is False
    assert stable["canary.fallback"] is True
    assert "error.type" not in stable
    assert all(s.parent_span_id == server.span_id for s in clients)
    assert attributes(server)["canary.variant"] == "stable"
    assert attributes(server)["canary.fallback"] is True


async def test_an_incoming_traceparent_is_continued_and_passed_on(backends: Backends) -> None:
    async with otlp_receiver() as receiver:
        config = proxy_yaml(
            backends.stable.url,
            backends.canary.url,
            top=telemetry_yaml(receiver.endpoint, ratio=0.0),
        )
        async with running_proxy(config) as proxy:
            await backends.stable.clear()
            status, _, _ = await post(
                f"{proxy.url}/v1/chat/completions", json=CHAT, headers={"traceparent": TRACEPARENT}
            )
            spans = await receiver.wait_for_spans(2)
            (recorded,) = await backends.stable.requests()
    assert status == 200
    (server,) = by_kind(spans, Span.SPAN_KIND_SERVER)
    (client,) = by_kind(spans, Span.SPAN_KIND_CLIENT)
    assert server.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
    assert server.parent_span_id.hex() == "b7ad6b7169203331"
    sent = [value for name, value in recorded["headers"] if name.lower() == "traceparent"]
    assert sent == [f"00-{client.trace_id.hex()}-{client.span_id.hex()}-01"]


async def test_an_unsampled_parent_records_nothing(backends: Backends) -> None:
    async with otlp_receiver() as receiver:
        config = proxy_yaml(
            backends.stable.url, backends.canary.url, top=telemetry_yaml(receiver.endpoint)
        )
        async with running_proxy(config) as proxy:
            for _ in range(5):
                await post(
                    f"{proxy.url}/v1/chat/completions",
                    json=CHAT,
                    headers={"traceparent": TRACEPARENT[:-2] + "00"},
                )
            await asyncio.sleep(1.5)
        assert receiver.spans() == []


async def test_the_raw_user_key_appears_in_no_attribute(backends: Backends) -> None:
    client_address = "203.0.113.77"  # the key when the source is `ip`
    async with otlp_receiver() as receiver:
        config = proxy_yaml(
            backends.stable.url,
            backends.canary.url,
            route="sticky: {keys: [header:x-user-id, body:user, cookie:uid, query:u, auth, ip]}",
            top="trusted_proxies: [127.0.0.1]\n" + telemetry_yaml(receiver.endpoint),
        )
        async with running_proxy(config) as proxy:
            url = f"{proxy.url}/v1/chat/completions"
            await post(url, json=CHAT, headers={"x-user-id": SECRET_USER})
            await post(url, json={**CHAT, "user": SECRET_USER})
            await post(url, json=CHAT, headers={"Cookie": f"uid={SECRET_USER}"})
            await post(url, json=CHAT, params={"u": SECRET_USER})
            await post(url, json=CHAT, headers={"Authorization": f"Bearer {SECRET_USER}"})
            await post(url, json=CHAT, headers={"X-Forwarded-For": client_address})
            spans = await receiver.wait_for_spans(12)
            _, metrics_text = await admin_get(proxy, "/metrics")
    assert len(spans) == 12
    exported = b"".join(request.SerializeToString() for request in receiver.trace_requests)
    assert SECRET_USER.encode() not in exported
    assert client_address.encode() not in exported
    assert SECRET_USER not in metrics_text.decode()
    assert client_address not in metrics_text.decode()
    # The key sources are named, never their values.
    clients = by_kind(spans, Span.SPAN_KIND_CLIENT)
    sources = {attributes(s).get("canary.key_source") for s in clients}
    assert sources == {"header:x-user-id", "body:user", "cookie:uid", "query:u", "auth", "ip"}


async def test_metrics_count_the_traffic_per_route_and_variant(backends: Backends) -> None:
    config = proxy_yaml(
        backends.stable.url,
        backends.canary.url,
        route="sticky: {keys: [header:x-user-id], salt: m}\nrollout: {weight: 50}",
    )
    users = [f"user-{i}" for i in range(40)]
    expected = {"stable": 0, "canary": 0}
    for user in users:
        bucket = mmh3.hash(f"m:{user}", 0, signed=False) % 10000
        expected["canary" if bucket < 5000 else "stable"] += 1
    async with running_proxy(config) as proxy:
        async with aiohttp.ClientSession() as session:
            for user in users:
                stream = user.endswith("7")
                async with session.post(
                    f"{proxy.url}/v1/chat/completions",
                    json={**CHAT, "stream": stream},
                    headers={"x-user-id": user},
                ) as response:
                    await response.read()
            async with session.post(
                f"{proxy.url}/v1/chat/completions",
                json=CHAT,
                headers={"x-user-id": users[0], "x-fake-status": "500"},
            ) as response:
                await response.read()
        status, body = await admin_get(proxy, "/metrics")
    assert status == 200
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    first_variant = (
        "canary" if mmh3.hash(f"m:{users[0]}", 0, signed=False) % 10000 < 5000 else "stable"
    )
    for variant, count in expected.items():
        backend = "v2" if variant == "canary" else "v1"
        labels = (
            ("canary_backend", backend),
            ("canary_route", "chat"),
            ("canary_variant", variant),
            ("outcome", "ok"),
        )
        assert samples[("canary_upstream_requests_total", labels)] == count
        duration = (
            ("canary_backend", backend),
            ("canary_route", "chat"),
            ("canary_variant", variant),
        )
        errors = 1 if variant == first_variant else 0
        assert samples[("canary_upstream_duration_seconds_count", duration)] == count + errors
    error_labels = tuple(
        sorted(
            {
                "canary_backend": "v2" if first_variant == "canary" else "v1",
                "canary_route": "chat",
                "canary_variant": first_variant,
                "outcome": "error",
                "error_type": "500",
            }.items()
        )
    )
    assert samples[("canary_upstream_requests_total", error_labels)] == 1
    assert samples[("canary_weight_ratio", (("canary_route", "chat"),))] == 0.5
    streamed = sum(1 for u in users if u.endswith("7"))
    ttft_count = sum(
        value
        for (name, _), value in samples.items()
        if name == "canary_upstream_ttft_seconds_count"
    )
    assert ttft_count == streamed
    server = (
        ("http_request_method", "POST"),
        ("http_response_status_code", "200"),
        ("http_route", "/"),
    )
    assert samples[("http_server_request_duration_seconds_count", server)] == len(users)


async def test_metrics_reach_the_collector_over_otlp(backends: Backends) -> None:
    async with otlp_receiver() as receiver:
        config = proxy_yaml(
            backends.stable.url, backends.canary.url, top=telemetry_yaml(receiver.endpoint)
        )
        async with running_proxy(config) as proxy:
            for _ in range(3):
                await post(f"{proxy.url}/v1/chat/completions", json=CHAT)
            version = proxy.server.config.version
        # Stopping flushes the metrics.
        requests = receiver.metric("canary.upstream.requests")
        info = receiver.metric("canary.config.info")
        duration = receiver.metric("http.server.request.duration")
    assert requests is not None
    assert sum(point.as_int for point in requests.sum.data_points) == 3
    assert info.gauge.data_points[0].attributes[0].value.string_value == version
    assert duration.histogram.data_points[0].explicit_bounds[-1] >= 300


async def test_status_shows_each_variant_over_the_recent_window(backends: Backends) -> None:
    config = proxy_yaml(
        backends.stable.url,
        backends.canary.url,
        route="override_header: x-canary\nrollout: {weight: 10}",
    )
    async with running_proxy(config) as proxy:
        url = f"{proxy.url}/v1/chat/completions"
        for _ in range(4):
            await post(url, json=CHAT, headers={"x-canary": "never"})
        for _ in range(3):
            await post(url, json={**CHAT, "stream": True}, headers={"x-canary": "always"})
        await post(url, json=CHAT, headers={"x-canary": "always", "x-fake-status": "502"})
        status, body = await admin_get(proxy, "/api/status")
        bad_window, _ = await admin_get(proxy, "/api/status?window=soon")
    assert status == 200
    assert bad_window == 400
    document = json.loads(body)
    assert document["config"]["version"] == proxy.server.config.version
    assert document["config"]["loaded_at"]
    (route,) = document["routes"]
    assert (route["name"], route["stable"], route["canary"], route["weight"]) == (
        "chat",
        "v1",
        "v2",
        10,
    )
    stable, canary = route["variants"]["stable"], route["variants"]["canary"]
    assert (stable["requests"], stable["errors"], stable["error_rate"]) == (4, 0, 0)
    assert (canary["requests"], canary["errors"]) == (4, 1)
    assert canary["error_rate"] == 0.25
    assert canary["errors_by_type"] == {"502": 1}
    assert canary["ttft_s"]["p50"] is not None
    assert stable["ttft_s"]["p50"] is None
    for quantile in ("p50", "p95", "p99"):
        assert 0 < stable["latency_s"][quantile] < 5


async def test_health_and_readiness(backends: Backends) -> None:
    async with running_proxy(proxy_yaml(backends.stable.url, backends.canary.url)) as proxy:
        assert await admin_get(proxy, "/healthz") == (200, b'{"status": "ok"}')
        status, body = await admin_get(proxy, "/readyz")
        assert (status, json.loads(body)) == (200, {"ready": True})


async def test_the_public_port_never_serves_admin_paths(backends: Backends) -> None:
    config = proxy_yaml(
        backends.stable.url, backends.canary.url, route="match: {path_prefix: /v1/}"
    )
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as session:
        for path in ("/api/status", "/metrics", "/healthz", "/readyz"):
            async with session.get(f"{proxy.url}{path}") as response:
                assert response.status == 404
                assert (await response.json())["error"]["code"] == "no_route"


async def test_metrics_can_be_turned_off(backends: Backends) -> None:
    config = proxy_yaml(
        backends.stable.url, backends.canary.url, top="telemetry: {prometheus: false}"
    )
    async with running_proxy(config) as proxy:
        status, _ = await admin_get(proxy, "/metrics")
    assert status == 404


async def latencies(url: str, count: int) -> list[float]:
    out = []
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            started = time.perf_counter()
            async with session.post(url, json=CHAT) as response:
                assert response.status == 200
                await response.read()
            out.append(time.perf_counter() - started)
    return out


async def wait_for_export_failure(proxy: RunningProxy) -> dict[str, Any]:
    async def telemetry() -> dict[str, Any]:
        _, body = await admin_get(proxy, "/api/status")
        return json.loads(body)["telemetry"]  # type: ignore[no-any-return]

    return await eventually(
        "an export failure",
        telemetry,
        holds=lambda telemetry: telemetry["export_failures"],
        timeout_s=15,
        interval_s=0.2,
    )


@pytest.mark.timeout(90)
@pytest.mark.parametrize("collector", ["down", "slow"])
async def test_a_collector_down_or_slow_costs_requests_nothing(
    backends: Backends, collector: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The slow collector answers after 10 s: past the exporter's timeout (the SDK's
    # default is 10 s; 2 s here, in seconds as the Python SDK reads it).
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
    async with otlp_receiver(delay_s=10.0) as slow:
        endpoint = slow.endpoint if collector == "slow" else f"http://127.0.0.1:{refused_port()}"
        reference = proxy_yaml(backends.stable.url, backends.canary.url)
        troubled = proxy_yaml(
            backends.stable.url, backends.canary.url, top=telemetry_yaml(endpoint)
        )
        async with running_proxy(reference) as plain, running_proxy(troubled) as proxy:
            url, plain_url = f"{proxy.url}/v1/chat/completions", f"{plain.url}/v1/chat/completions"
            await latencies(url, 20)  # warm both up
            await latencies(plain_url, 20)
            # Interleave the two, so the machine's noise falls on both alike.
            with_trouble: list[float] = []
            without: list[float] = []
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline or len(with_trouble) < 300:
                with_trouble += await latencies(url, 25)
                without += await latencies(plain_url, 25)
                if len(with_trouble) >= 600:
                    break
            telemetry = await wait_for_export_failure(proxy)
    # Every request succeeded (latencies() asserts 200) and none waited on telemetry.
    assert statistics.median(with_trouble) < 1.5 * statistics.median(without) + 0.001
    assert max(with_trouble) < 1.0
    assert telemetry["export_failures"] >= 1
    assert telemetry["last_export_error"]
    if collector == "down":
        assert telemetry["spans_dropped"] > 0


async def test_an_endpoint_that_takes_only_traces_is_not_an_export_failure(
    backends: Backends,
) -> None:
    # Jaeger's OTLP receiver answers 404 on /v1/metrics.
    async with otlp_receiver() as receiver:
        receiver.refuse_metrics = True
        config = proxy_yaml(
            backends.stable.url, backends.canary.url, top=telemetry_yaml(receiver.endpoint)
        )
        async with running_proxy(config) as proxy:
            await post(f"{proxy.url}/v1/chat/completions", json=CHAT)
            spans = await receiver.wait_for_spans(2)
            _, body = await admin_get(proxy, "/api/status")
        # Stopping flushes the metrics: one POST, answered 404.
    assert len(spans) == 2
    assert receiver.metric_posts == 1
    telemetry = json.loads(body)["telemetry"]
    assert telemetry["export_failures"] == 0
    assert telemetry["spans_dropped"] == 0


async def test_traces_and_metrics_over_grpc(backends: Backends) -> None:
    with grpc_receiver() as receiver:
        config = proxy_yaml(
            backends.stable.url,
            backends.canary.url,
            top=telemetry_yaml(receiver.endpoint, protocol="grpc"),
        )
        async with running_proxy(config) as proxy:
            status, _, _ = await post(f"{proxy.url}/v1/chat/completions", json=CHAT)
            spans = await receiver.wait_for_spans(2)
        requests = receiver.metric("canary.upstream.requests")
    assert status == 200
    (server,) = by_kind(spans, Span.SPAN_KIND_SERVER)
    (client,) = by_kind(spans, Span.SPAN_KIND_CLIENT)
    assert client.parent_span_id == server.span_id
    assert attributes(client)["gen_ai.usage.output_tokens"] == 3
    assert sum(point.as_int for point in requests.sum.data_points) == 1


async def test_a_grpc_endpoint_that_takes_only_traces_is_not_an_export_failure(
    backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Jaeger's OTLP/gRPC receiver answers UNIMPLEMENTED to the metrics service.
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "100")
    with grpc_receiver() as receiver:
        receiver.refuse_metrics = True
        config = proxy_yaml(
            backends.stable.url,
            backends.canary.url,
            top=telemetry_yaml(receiver.endpoint, protocol="grpc"),
        )
        async with running_proxy(config) as proxy:
            await post(f"{proxy.url}/v1/chat/completions", json=CHAT)
            spans = await receiver.wait_for_spans(2)
            await eventually(
                "the metrics refused",
                lambda: proxy.server.telemetry_status()["metrics_taken"] is False,
                timeout_s=5.0,
            )
            await asyncio.sleep(0.5)  # two intervals more: none sent
            telemetry = proxy.server.telemetry_status()
            posts = receiver.metric_posts
    assert len(spans) == 2
    assert posts == 1
    assert telemetry["export_failures"] == 0, telemetry["last_export_error"]
    assert telemetry["metrics_taken"] is False


async def test_metrics_in_openmetrics_have_exemplars_naming_the_trace(backends: Backends) -> None:
    async with otlp_receiver() as receiver:
        config = proxy_yaml(
            backends.stable.url, backends.canary.url, top=telemetry_yaml(receiver.endpoint)
        )
        async with running_proxy(config) as proxy:
            await post(f"{proxy.url}/v1/chat/completions", json=CHAT)
            url = f"http://127.0.0.1:{proxy.server.admin_port}/metrics"
            accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
            async with aiohttp.ClientSession() as session, session.get(url, headers=accept) as r:
                content_type = r.headers["Content-Type"]
                text = await r.text()
            spans = await receiver.wait_for_spans(2)
    assert content_type.startswith("application/openmetrics-text")
    (server,) = by_kind(spans, Span.SPAN_KIND_SERVER)
    (client,) = by_kind(spans, Span.SPAN_KIND_CLIENT)
    exemplars = {
        family.name: sample.exemplar.labels
        for family in openmetrics_families(text)  # type: ignore[no-untyped-call]
        for sample in family.samples
        if sample.exemplar is not None
    }
    assert exemplars["http_server_request_duration_seconds"] == {
        "trace_id": server.trace_id.hex(),
        "span_id": server.span_id.hex(),
    }
    assert exemplars["canary_upstream_duration_seconds"] == {
        "trace_id": client.trace_id.hex(),
        "span_id": client.span_id.hex(),
    }


async def test_paths_outside_the_genai_operations_are_plain_http_client_spans(
    backends: Backends,
) -> None:
    async with otlp_receiver() as receiver:
        config = proxy_yaml(
            backends.stable.url, backends.canary.url, top=telemetry_yaml(receiver.endpoint)
        )
        async with running_proxy(config) as proxy:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{proxy.url}/v1/models") as response:
                    await response.read()
                async with session.post(
                    f"{proxy.url}/v1/responses", json={"model": "m", "input": "hi"}
                ) as response:
                    await response.read()
            spans = await receiver.wait_for_spans(4)
            _, body = await admin_get(proxy, "/metrics")
    clients = by_kind(spans, Span.SPAN_KIND_CLIENT)
    assert sorted(span.name for span in clients) == ["GET", "POST"]
    for span in clients:
        assert not any(key.startswith("gen_ai.") for key in attributes(span))
    assert "gen_ai_client_operation_duration_seconds_count" not in body.decode()


async def test_a_rollout_decision_is_a_span_of_its_own(backends: Backends, tmp_path: Any) -> None:
    async with otlp_receiver() as receiver:
        config = proxy_yaml(
            backends.stable.url,
            backends.canary.url,
            route=(
                "rollout:\n"
                "  weight: 10\n"
                "  auto: {steps: [10, 50, 100], interval: 1h, min_requests: 10}"
            ),
            top=telemetry_yaml(receiver.endpoint) + f"\nstate: {{path: '{tmp_path / 'state.db'}'}}",
        )
        async with running_proxy(config) as proxy:
            url = f"http://127.0.0.1:{proxy.server.admin_port}/api/routes/chat/pause"
            async with aiohttp.ClientSession() as session, session.post(url) as response:
                assert response.status == 200, await response.text()
            spans = await receiver.wait_for_spans(1)
    decisions = [s for s in spans if s.name == "canary.rollout chat"]
    assert decisions, [s.name for s in spans]
    decision = decisions[-1]
    assert decision.kind == Span.SPAN_KIND_INTERNAL
    values = attributes(decision)
    assert values["canary.route"] == "chat"
    assert values["canary.rollout.action"] == "pause"
    (event,) = decision.events
    assert event.name == "decision"
    assert attributes(event)["canary.rollout.reason"]
