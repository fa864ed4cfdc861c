"""Odd user keys: huge, empty, not UTF-8, full of separators (issue: hardening).

Each is hashed to one bucket, the same every time, without an error; no key appears
in a log line or a span.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.model import KeyKind, KeySource
from proxy.routing.assignment import BUCKETS, bucket_of
from proxy.routing.keys import FoundKey, find_key
from tests.conftest import Backends
from tests.harness import proxy_yaml, running_proxy
from tests.otlp_receiver import otlp_receiver
from tests.parts import Parts
from tests.raw import send_raw

# Any text, lone surrogates included: aiohttp decodes header bytes that are not UTF-8
# with surrogateescape, and a JSON body may hold "\udcff".
ANY_TEXT = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=40)
UTF8_TEXT = st.text(max_size=40)
SOURCES = (
    KeySource(KeyKind.HEADER, "x-user-id"),
    KeySource(KeyKind.COOKIE, "uid"),
    KeySource(KeyKind.QUERY, "u"),
    KeySource(KeyKind.BODY, "user"),
    KeySource(KeyKind.AUTH),
)


@settings(max_examples=300, deadline=None)
@given(salt=UTF8_TEXT, key=st.one_of(ANY_TEXT, st.just("k" * 10240), st.just("")))
def test_every_key_has_one_bucket(salt: str, key: str) -> None:
    bucket = bucket_of(salt, key)
    assert 0 <= bucket < BUCKETS
    assert bucket_of(salt, key) == bucket


@settings(max_examples=300, deadline=None)
@given(salt=UTF8_TEXT, key=UTF8_TEXT)
def test_a_utf8_key_follows_the_spec_formula(salt: str, key: str) -> None:
    assert bucket_of(salt, key) == mmh3.hash(f"{salt}:{key}", 0, signed=False) % 10000


def test_a_key_that_is_not_utf8_is_hashed_as_the_bytes_that_were_sent() -> None:
    # aiohttp hands the header bytes ff fe as "\udcff\udcfe" (surrogateescape).
    assert bucket_of("s", "\udcff\udcfe") == mmh3.hash(b"s:\xff\xfe", 0, signed=False) % 10000
    assert 0 <= bucket_of("s", "\ud800") < BUCKETS  # a lone surrogate from a JSON escape


@settings(max_examples=200, deadline=None)
@given(value=ANY_TEXT, index=st.integers(0, len(SOURCES) - 1))
def test_any_value_of_any_source_is_read_as_it_is(value: str, index: int) -> None:
    source = SOURCES[index]
    parts = Parts(
        header_items={
            "x-user-id": value,
            "authorization": f"Bearer {value}",
        },
        cookie_items={"uid": value},
        query_items={"u": value},
    )
    found = find_key((source,), parts, {"user": value})
    expected = value.strip() if source.kind is KeyKind.AUTH else value
    if expected:
        assert found == FoundKey(source, expected)
    else:
        assert found is None


SECRET = "k3y-n0t-in-l0gs"
# (request head lines, JSON body): each carries an odd key, and SECRET where it can.
ODD_REQUESTS = {
    "header-not-utf8": (b"x-user-id: " + SECRET.encode() + b"\xff\xfe\x80\r\n", {}),
    "header-empty": (b"x-user-id: \r\n", {}),
    "header-separators": (b"x-user-id: " + SECRET.encode() + b':;,= "\\\t/\r\n', {}),
    "header-8-kib": (b"x-user-id: " + SECRET.encode() * 500 + b"\r\n", {}),
    "cookie-separators": (b"Cookie: uid=" + SECRET.encode() + b"%3B%3D; other=1\r\n", {}),
    "body-10-kib": (b"", {"user": SECRET * 700}),
    "body-lone-surrogate": (b"", {"user": SECRET + "\udcff\ud800"}),
    "body-empty": (b"", {"user": ""}),
}


def odd_request(head_lines: bytes, body: Mapping[str, object]) -> bytes:
    payload = json.dumps({"messages": [], "max_tokens": 1, **body}).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
        + head_lines
        + b"Content-Length: %d\r\n\r\n" % len(payload)
        + payload
    )


@pytest.mark.timeout(30)
async def test_odd_keys_are_served_sticky_and_never_logged_nor_traced(
    backends: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    variants: dict[str, list[str]] = {}
    async with otlp_receiver() as receiver:
        config = proxy_yaml(
            backends.stable.url,
            backends.canary.url,
            route="sticky: {keys: [header:x-user-id, cookie:uid, body:user], salt: odd}\n"
            "rollout: {weight: 50}",
            top=f"telemetry: {{otlp_endpoint: '{receiver.endpoint}'}}",
        )
        async with running_proxy(config) as proxy:
            assert proxy.server.port is not None
            for name, (head_lines, body) in ODD_REQUESTS.items():
                for _ in range(2):
                    # Each asks `Connection: close`: its answer ends when the proxy closes,
                    # so the wait for silence may be long without costing anything.
                    raw = odd_request(head_lines, body)
                    answer = await send_raw(proxy.server.port, raw, quiet_s=5.0)
                    assert answer.statuses == [200], (name, answer.data[:300])
                    found = re.search(rb"x-canary-variant: (\w+)", answer.data, re.IGNORECASE)
                    assert found is not None
                    variants.setdefault(name, []).append(found.group(1).decode())
            spans = await receiver.wait_for_spans(4 * len(ODD_REQUESTS))
    # Keyed requests stay on one variant; the two without a key are drawn at random.
    for name, seen in variants.items():
        if not name.endswith("empty"):
            assert len(set(seen)) == 1, (name, seen)
    exported = b"".join(request.SerializeToString() for request in receiver.trace_requests)
    assert len(spans) == 4 * len(ODD_REQUESTS)
    assert SECRET.encode() not in exported
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert SECRET not in logged
