"""A bounded fuzz run against the public port: no 500 of the proxy's own, no crash.

Hypothesis builds requests from parts, valid and not (methods, targets, versions,
framing headers, key headers with any bytes, bodies that are JSON or not), and sends
each over a raw socket to a proxy in front of the fake backends. The proxy runs in a
thread of its own, so that each example is a plain blocking exchange.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import parse_config
from proxy.server.app import ProxyServer
from tests.conftest import Backends
from tests.harness import proxy_yaml

ROUTES = (
    "match: {path_prefix: /v1/}\n"
    "sticky: {keys: [header:x-user-id, body:user, cookie:uid, query:u, auth], salt: f}\n"
    "override_header: x-canary\n"
    "model_rewrite: {canary: m-rewritten}\n"
    "fallback_to_stable: true\n"
    "rollout: {weight: 50}"
)


class ErrorLog(logging.Handler):
    """Keeps every record at ERROR or above."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class ProxyThread:
    """A proxy serving in a thread's own event loop."""

    def __init__(self, yaml_text: str) -> None:
        self._yaml = yaml_text
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.server: ProxyServer | None = None
        self.port = 0

    def __enter__(self) -> ProxyThread:
        self._thread.start()
        assert self._ready.wait(15), "the proxy did not start"
        return self

    def __exit__(self, *_: object) -> None:
        assert self.server is not None
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(15)
        self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self.server = ProxyServer(parse_config(self._yaml, environ={}))
        self.port = self._loop.run_until_complete(self.server.start())
        self._ready.set()
        self._loop.run_forever()


@pytest.fixture(scope="module")
def fuzzed(backends: Backends) -> Iterator[tuple[ProxyThread, ErrorLog]]:
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    try:
        with ProxyThread(proxy_yaml(backends.stable.url, backends.canary.url, ROUTES)) as proxy:
            yield proxy, errors
    finally:
        logging.getLogger().removeHandler(errors)


ANY_BYTES = st.binary(max_size=24)
METHODS = st.sampled_from([b"GET", b"POST", b"POST", b"POST", b"HEAD", b"PUT", b"DELETE"])
ODD_METHODS = st.one_of(st.sampled_from([b"get", b"G\x00T", b"", b"CONNECT", b"PRI"]), ANY_BYTES)
TARGETS = st.sampled_from(
    [
        b"/v1/chat/completions",
        b"/v1/chat/completions",
        b"/v1/completions",
        b"/v1/models",
        b"/v1/chat/completions?u=alice&x=%ff",
        b"/other",
        b"http://elsewhere.example/v1/models",
    ]
)
ODD_TARGETS = st.one_of(
    st.sampled_from([b"*", b"example.com:443", b"", b"/v1/\x00"]),
    ANY_BYTES.map(lambda raw: b"/v1/" + raw),
)
ODD_VERSIONS = st.sampled_from([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.x", b"", b"HTTP/0.9"])
NAMES = st.sampled_from(
    [
        b"x-user-id",
        b"Cookie",
        b"Authorization",
        b"x-canary",
        b"Content-Type",
        b"Content-Encoding",
        b"Expect",
        b"Connection",
        b"Upgrade",
        b"X-Forwarded-For",
        b"traceparent",
        b"x-request-id",
        b"Accept-Encoding",
    ]
)
VALUES = st.sampled_from(
    [
        b"alice",
        b"uid=bob; other=1",
        b"Bearer sk-tenant",
        b"bearer ",
        b"always",
        b"never",
        b"application/json",
        b"gzip",
        b"identity",
        b"100-continue",
        b"keep-alive",
        b"Upgrade",
        b"websocket",
        b"10.0.0.1, 192.0.2.1, garbage",
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        b"00-zz",
        b"\xff\xfe\x80",
        b"k" * 3000,
    ]
)
JSON_BODIES = st.fixed_dictionaries(
    {"messages": st.just([{"role": "user", "content": "hi"}]), "max_tokens": st.just(2)},
    optional={
        "model": st.one_of(st.text(max_size=10), st.integers(), st.none()),
        "user": st.one_of(st.text(max_size=20), st.integers(), st.lists(st.integers())),
        "stream": st.booleans(),
    },
).map(lambda body: json.dumps(body).encode())
BODIES = st.one_of(JSON_BODIES, st.just(b""), ANY_BYTES, st.just(b"[1, 2]"), st.just(b"{"))


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """One request: well formed, then (one time in two) one part made odd.

    Most requests get past the parser, so routing, key reading, body reading and the
    backend exchange are fuzzed too; the odd ones exercise the refusals.
    """
    method, target, version = draw(METHODS), draw(TARGETS), b"HTTP/1.1"
    headers = [(b"Host", b"proxy"), (b"Connection", b"close")]
    headers += draw(st.lists(st.tuples(NAMES, VALUES), max_size=5))
    body = draw(BODIES)
    length = b"%d" % len(body)
    newline = b"\r\n"
    odd = draw(st.integers(0, 13))
    if odd == 1:
        method = draw(ODD_METHODS)
    elif odd == 2:
        target = draw(ODD_TARGETS)
    elif odd == 3:
        version = draw(ODD_VERSIONS)
    elif odd == 4:
        headers.append((draw(ANY_BYTES), draw(ANY_BYTES)))
    elif odd == 5:
        headers.append((draw(NAMES), draw(ANY_BYTES)))
    elif odd == 6:
        length = draw(st.sampled_from([b"-1", b"+1", b"1, 1", b"99999999999999999999", b"x"]))
    elif odd == 7:
        headers.append((b"Transfer-Encoding", b"chunked"))  # beside a Content-Length
    elif odd == 8:
        newline = b"\n"
    elif odd == 9:
        length = b"%d" % max(len(body) - 1, 0)  # the rest is a pipelined request's start
    lines = [b" ".join((method, target, version))]
    lines += [name + b": " + value for name, value in headers]
    lines.append(b"Content-Length: " + length)
    return newline.join(lines) + newline + newline + body


def exchange(port: int, request: bytes) -> bytes:
    """Send one request; everything until the proxy closes, or 0.5 s of silence."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        sock.settimeout(0.5)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return received
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


def proxy_made_500(answer: bytes) -> bool:
    """A 500 that the proxy made (a backend's own carries x-canary-variant)."""
    head = answer.partition(b"\r\n\r\n")[0].lower()
    return head.startswith((b"http/1.1 500", b"http/1.0 500")) and b"x-canary-variant" not in head


@pytest.mark.timeout(60)
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests())
def test_no_request_makes_the_proxy_fail(
    fuzzed: tuple[ProxyThread, ErrorLog], request: bytes
) -> None:
    proxy, errors = fuzzed
    answer = exchange(proxy.port, request)
    assert not proxy_made_500(answer), (request, answer[:400])
    assert errors.records == [], [record.getMessage() for record in errors.records]


def test_the_proxy_still_serves_after_the_fuzzing(fuzzed: tuple[ProxyThread, ErrorLog]) -> None:
    proxy, _ = fuzzed
    answer = exchange(
        proxy.port, b"GET /v1/models HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200 OK")
