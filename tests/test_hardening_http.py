"""Bad HTTP from clients, and slow or greedy clients, at the public port (issue: hardening).

Each bad input goes over a raw socket, since an HTTP client would refuse to send it,
and each test asserts both the answer and what reached the backend (its journal).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.server.reload import ReloadOutcome
from tests.conftest import Backends
from tests.harness import eventually, proxy_yaml, running_proxy, running_proxy_file
from tests.raw import RawAnswer, read_answer, send_raw

CHAT = b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":2}'
POST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
GET = b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n"

# Each is refused by llhttp (strict) before it reaches the proxy's handler.
BAD_HTTP = {
    # Request smuggling: two ways to frame one body.
    "content-length-and-chunked": POST
    + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunked-and-content-length": POST
    + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    "two-content-lengths": POST + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}x",
    "two-equal-content-lengths": POST + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
    "content-length-list": POST + b"Content-Length: 2, 2\r\n\r\n{}",
    "content-length-negative": POST + b"Content-Length: -1\r\n\r\n{}",
    "content-length-plus-sign": POST + b"Content-Length: +2\r\n\r\n{}",
    "content-length-hex": POST + b"Content-Length: 0x2\r\n\r\n{}",
    "content-length-overflow": POST + b"Content-Length: 99999999999999999999999\r\n\r\n{}",
    "chunked-not-last": POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "unknown-transfer-coding": POST + b"Transfer-Encoding: gzip\r\n\r\n{}",
    "transfer-coding-lookalike": POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "space-before-colon": POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "bad-chunk-size": POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "http10-with-chunked-and-length": b"POST /v1/chat/completions HTTP/1.0\r\nHost: proxy\r\n"
    b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    # Header syntax.
    "obs-fold": GET + b"X-A: a\r\n b\r\n\r\n",
    "bare-lf": b"GET /v1/models HTTP/1.1\nHost: proxy\n\n",
    "bare-cr-in-value": GET + b"X-A: a\rX-B: b\r\n\r\n",
    "nul-in-value": GET + b"X-A: a\x00b\r\n\r\n",
    "bad-header-name": GET + b"X(A): a\r\n\r\n",
    "empty-header-name": GET + b": a\r\n\r\n",
    "no-host": b"GET /v1/models HTTP/1.1\r\n\r\n",
    "two-hosts": b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    # The request line.
    "nul-in-target": b"GET /v1/mo\x00dels HTTP/1.1\r\nHost: proxy\r\n\r\n",
    "control-byte-in-target": b"GET /v1/mo\x01dels HTTP/1.1\r\nHost: proxy\r\n\r\n",
    "del-in-target": b"GET /v1/mo\x7fdels HTTP/1.1\r\nHost: proxy\r\n\r\n",
    "space-in-target": b"GET /v1/mo dels HTTP/1.1\r\nHost: proxy\r\n\r\n",
    "non-ascii-in-target": b"GET /v1/mo\xffdels HTTP/1.1\r\nHost: proxy\r\n\r\n",
    "invalid-method": b"G@T /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n",
    "unknown-method": b"FOO /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n",
    "lower-case-method": b"get /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n",
    "bad-version": b"GET /v1/models HTTP/9.9\r\nHost: proxy\r\n\r\n",
    # Size limits of llhttp as aiohttp sets them: 8190 bytes a line, 128 headers.
    "long-header-line": GET + b"X-A: " + b"a" * 9000 + b"\r\n\r\n",
    "long-target": b"GET /v1/models?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: proxy\r\n\r\n",
    "too-many-headers": GET + b"".join(b"X-%d: a\r\n" % i for i in range(200)) + b"\r\n",
    # Not HTTP/1.1 at all.
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "tls-hello": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40,
}


def config(backends: Backends, top: str = "") -> str:
    return proxy_yaml(backends.stable.url, backends.canary.url, top=top)


async def backend_requests(backends: Backends) -> list[dict[str, Any]]:
    return await backends.stable.requests() + await backends.canary.requests()


async def clear(backends: Backends) -> None:
    await backends.stable.clear()
    await backends.canary.clear()


async def through_proxy(backends: Backends, raw: bytes) -> tuple[RawAnswer, list[dict[str, Any]]]:
    """Send `raw` to a fresh proxy: its answer, and what the backends received."""
    await clear(backends)
    async with running_proxy(config(backends)) as proxy:
        assert proxy.server.port is not None
        answer = await send_raw(proxy.server.port, raw)
    return answer, await backend_requests(backends)


@pytest.mark.parametrize("raw", BAD_HTTP.values(), ids=BAD_HTTP.keys())
async def test_bad_http_is_answered_400_and_closed_and_never_forwarded(
    backends: Backends, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    answer, received = await through_proxy(backends, raw)
    assert answer.statuses == [400], answer.data[:200]
    assert answer.closed
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("proxy_error", "bad_http")
    assert error["message"].startswith("the request is not valid HTTP/1.1")
    assert received == []
    # A hostile client cannot fill the log: one DEBUG line, without its bytes.
    assert [r for r in caplog.records if r.levelno > logging.DEBUG] == []
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "aaaaaaaaaa" not in logged


# Versions llhttp parses and the proxy does not speak (and two it does not parse), each
# with what the answer must name. Parts are sent 0.1 s apart on one connection.
OTHER_VERSIONS = {
    "http09-bare-line": ([b"GET /v1/models\r\n"], "HTTP/0.9 is not supported"),
    "http09-bare-line-lf": ([b"GET /v1/models\n"], "HTTP/0.9 is not supported"),
    "http09-line-and-headers": (
        [b"GET /v1/models\r\nHost: proxy\r\n\r\n"],
        "HTTP/0.9 is not supported",
    ),
    "http09-line-in-pieces": ([b"GE", b"T /v1/models\r\n", b"\r\n"], "HTTP/0.9 is not supported"),
    "http09-named": ([b"GET /v1/models HTTP/0.9\r\nHost: proxy\r\n\r\n"], "HTTP/0.9 is not"),
    "http20": ([b"GET /v1/models HTTP/2.0\r\nHost: proxy\r\n\r\n"], "HTTP/2.0 is not supported"),
    "http20-with-body": (
        [
            b"POST /v1/chat/completions HTTP/2.0\r\nHost: proxy\r\nContent-Length: %d\r\n\r\n%s"
            % (len(CHAT), CHAT)
        ],
        "HTTP/2.0 is not supported",
    ),
    "http20-after-a-good-request": (
        [GET + b"\r\n", b"GET /v1/models HTTP/2.0\r\nHost: proxy\r\n\r\n"],
        "HTTP/2.0 is not supported",
    ),
    "http09-after-a-good-request": (
        [GET + b"\r\n", b"GET /v1/models\r\nHost: proxy\r\n\r\n"],
        "HTTP/0.9 is not supported",
    ),
    "http37": ([b"GET /v1/models HTTP/3.7\r\nHost: proxy\r\n\r\n"], "version is not supported"),
    "http12": ([b"GET /v1/models HTTP/1.2\r\nHost: proxy\r\n\r\n"], "version is not supported"),
}


@pytest.mark.parametrize(("parts", "named"), OTHER_VERSIONS.values(), ids=OTHER_VERSIONS.keys())
async def test_a_version_other_than_http_1_0_and_1_1_is_400_closed_and_never_forwarded(
    backends: Backends, parts: list[bytes], named: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await clear(backends)
    async with running_proxy(config(backends)) as proxy:
        assert proxy.server.port is not None
        answer = await send_raw(proxy.server.port, *parts, pause_s=0.1)
    received = await backend_requests(backends)
    good_first = parts[0] == GET + b"\r\n"
    # Every status line is HTTP/1.x; a second answer follows the first's body on its line.
    statuses = [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer.data)]
    assert statuses == ([200, 400] if good_first else [400]), answer.data
    assert re.search(rb"HTTP/(0\.9|2\.0) \d{3} ", answer.data) is None
    assert answer.closed
    error = json.loads(answer.data.rpartition(b"\r\n\r\n")[2])["error"]  # the last answer's
    assert (error["type"], error["code"]) == ("proxy_error", "bad_http")
    assert error["message"].startswith("the request is not valid HTTP/1.1: ")
    assert named in error["message"]
    assert "send HTTP/1.1 or HTTP/1.0" in error["message"]
    assert [r["path"] for r in received] == (["/v1/models"] if good_first else [])
    assert [r for r in caplog.records if r.levelno > logging.DEBUG] == []


async def test_a_smuggled_request_never_reaches_the_backend(backends: Backends) -> None:
    smuggled = b"GET /v1/models?smuggled=1 HTTP/1.1\r\nHost: proxy\r\n\r\n"
    chunked_end = b"0\r\n\r\n"
    framing = b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(
        chunked_end + smuggled
    )
    raw = POST + framing + chunked_end + smuggled
    await clear(backends)
    async with running_proxy(config(backends)) as proxy, aiohttp.ClientSession() as session:
        assert proxy.server.port is not None
        answer = await send_raw(proxy.server.port, raw)
        # The backend connections are in step: the next request gets its own answer.
        async with session.post(
            f"{proxy.url}/v1/chat/completions", data=CHAT, headers={"x-request-id": "next-1"}
        ) as response:
            body = await response.read()
            assert response.headers["x-request-id"] == "next-1"
    assert answer.statuses == [400]
    assert answer.closed
    assert json.loads(body)["model"] == "m-stable"
    received = await backend_requests(backends)
    assert [(r["method"], r["path"]) for r in received] == [("POST", "/v1/chat/completions")]


async def test_an_absolute_form_target_reaches_the_backend_in_origin_form(
    backends: Backends,
) -> None:
    raw = (
        b"GET http://other.example/v1/models?x=1 HTTP/1.1\r\n"
        b"Host: proxy\r\nConnection: close\r\n\r\n"
    )
    answer, (received,) = await through_proxy(backends, raw)
    assert answer.statuses == [200]
    assert received["path"] == "/v1/models?x=1"
    headers = dict(received["headers"])
    assert headers["Host"] == f"127.0.0.1:{backends.stable.port}"
    assert "other.example" not in json.dumps(received)


async def test_a_head_over_64_kib_is_431_and_never_forwarded(backends: Backends) -> None:
    # Each line and the count are within llhttp's limits; their sum is not.
    headers = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 8000) for i in range(10))
    raw = GET + headers + b"Connection: close\r\n\r\n"
    answer, received = await through_proxy(backends, raw)
    assert answer.statuses == [431]
    assert answer.json()["error"]["code"] == "headers_too_large"
    assert received == []


@pytest.mark.parametrize(
    ("upgrade", "asked"), [(b"websocket", "websocket"), (b"h2c", None), (b"anything", None)]
)
async def test_an_upgrade_request_is_answered_plainly_then_the_connection_closes(
    backends: Backends, upgrade: bytes, asked: str | None
) -> None:
    raw = (
        GET
        + b"Connection: Upgrade\r\nUpgrade: %s\r\n\r\n" % upgrade
        + b"GET /v1/models?after=1 HTTP/1.1\r\nHost: proxy\r\n\r\n"
    )
    answer, received = await through_proxy(backends, raw)
    # The upgrade is not made (a WebSocket one is asked of the backend, which declines
    # it on this path), and the pipelined request is not left hanging: the client sees
    # the connection close and may send it again.
    assert answer.statuses == [200]
    assert answer.closed
    assert [(r["path"], dict(r["headers"]).get("Upgrade")) for r in received] == [
        ("/v1/models", asked)
    ]


async def test_a_chunked_body_broken_after_its_head_closes_the_connection(
    backends: Backends,
) -> None:
    head = POST + b"Transfer-Encoding: chunked\r\n\r\n"
    await clear(backends)
    async with running_proxy(config(backends)) as proxy:
        assert proxy.server.port is not None
        started = time.monotonic()
        answer = await send_raw(proxy.server.port, head, b"2\r\n{}\r\nzz\r\n", pause_s=0.2)
        forwarder = proxy.server._forwarder
        assert forwarder is not None
        await asyncio.sleep(0.1)
        in_flight = forwarder.in_flight
    assert answer.closed
    assert time.monotonic() - started < 2
    assert in_flight == 0, "the handler must not wait for the rest of a broken body"
    assert await backend_requests(backends) == []


# --- slow and greedy clients --------------------------------------------------------------

HEADER_TIMEOUT = "limits: {header_timeout: 300ms}"


async def test_a_client_that_sends_nothing_is_closed_after_header_timeout(
    backends: Backends,
) -> None:
    async with running_proxy(config(backends, HEADER_TIMEOUT)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
        started = time.monotonic()
        answer = await read_answer(reader, quiet_s=3.0)
        waited = time.monotonic() - started
        writer.close()
    assert answer.closed
    assert answer.data == b""
    assert 0.25 < waited < 1.5


async def test_a_head_sent_byte_by_byte_is_cut_at_header_timeout(backends: Backends) -> None:
    raw = GET + b"X-Slow: yes\r\n\r\n"
    await clear(backends)
    async with running_proxy(config(backends, HEADER_TIMEOUT)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
        started = time.monotonic()
        sent = 0
        try:
            for byte in raw:
                writer.write(bytes([byte]))
                await writer.drain()
                sent += 1
                await asyncio.sleep(0.05)
        except ConnectionError:
            pass
        answer = await read_answer(reader, quiet_s=1.0)
        writer.close()
    assert answer.closed
    assert answer.statuses == []
    assert sent < len(raw), "the head should not have been taken whole"
    assert time.monotonic() - started < 3
    assert await backend_requests(backends) == []


async def test_a_head_within_header_timeout_is_served_even_in_pieces(
    backends: Backends,
) -> None:
    raw = GET + b"Connection: close\r\n\r\n"
    async with running_proxy(config(backends, HEADER_TIMEOUT)) as proxy:
        assert proxy.server.port is not None
        answer = await send_raw(proxy.server.port, raw[:10], raw[10:20], raw[20:], pause_s=0.08)
    assert answer.statuses == [200]


async def test_an_idle_kept_alive_connection_is_not_a_late_head(backends: Backends) -> None:
    async with running_proxy(config(backends, HEADER_TIMEOUT)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
        writer.write(GET + b"\r\n")
        first = await read_answer(reader, quiet_s=0.3)
        await asyncio.sleep(0.6)  # twice the header timeout, with no head begun
        writer.write(GET + b"\r\n")
        second = await read_answer(reader, quiet_s=0.3)
        # A head begun and left unfinished on the same connection is cut.
        writer.write(b"GET /v1/mod")
        third = await read_answer(reader, quiet_s=2.0)
        writer.close()
    assert (first.statuses, first.closed) == ([200], False)
    assert (second.statuses, second.closed) == ([200], False)
    assert (third.data, third.closed) == (b"", True)


async def kept_alive(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, RawAnswer]:
    """A new connection that has been answered one request and is kept open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(GET + b"\r\n")
    return reader, writer, await read_answer(reader, quiet_s=0.2)


async def test_an_idle_connection_is_closed_after_keepalive_timeout(backends: Backends) -> None:
    async with running_proxy(config(backends, "limits: {keepalive_timeout: 500ms}")) as proxy:
        assert proxy.server.port is not None
        reader, writer, first = await kept_alive(proxy.server.port)
        answered = time.monotonic() - 0.2  # read_answer waited 0.2 s of quiet
        idle = await read_answer(reader, quiet_s=3.0)
        closed_after = time.monotonic() - answered
        writer.close()
    assert (first.statuses, first.closed) == ([200], False)
    assert (idle.data, idle.closed) == (b"", True)
    assert 0.4 < closed_after < 1.5, closed_after


async def test_a_connection_used_within_keepalive_timeout_stays_open(backends: Backends) -> None:
    async with running_proxy(config(backends, "limits: {keepalive_timeout: 600ms}")) as proxy:
        assert proxy.server.port is not None
        reader, writer, first = await kept_alive(proxy.server.port)
        answers = [first]
        for _ in range(4):  # 4 x (0.2 + 0.2) s: past the timeout in all, never idle that long
            await asyncio.sleep(0.2)
            writer.write(GET + b"\r\n")
            answers.append(await read_answer(reader, quiet_s=0.2))
        writer.close()
    assert [(a.statuses, a.closed) for a in answers] == [([200], False)] * 5


async def test_a_head_begun_before_keepalive_timeout_is_not_cut_by_it(backends: Backends) -> None:
    # Idle ends at a request's first byte; from there its head has header_timeout.
    top = "limits: {keepalive_timeout: 400ms, header_timeout: 3s}"
    async with running_proxy(config(backends, top)) as proxy:
        assert proxy.server.port is not None
        reader, writer, first = await kept_alive(proxy.server.port)
        writer.write(GET[:12])
        await asyncio.sleep(0.6)  # the idle deadline passes while the head is under way
        writer.write(GET[12:] + b"\r\n")
        second = await read_answer(reader, quiet_s=0.3)
        writer.close()
    assert (first.statuses, first.closed) == ([200], False)
    assert (second.statuses, second.closed) == ([200], False)


async def test_a_reload_gives_new_connections_the_new_keepalive_timeout(
    backends: Backends, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(config(backends, "limits: {keepalive_timeout: 300ms}"))
    async with running_proxy_file(str(path), watch=False) as proxy:
        assert proxy.server.port is not None
        old_reader, old_writer, _ = await kept_alive(proxy.server.port)
        path.write_text(config(backends, "limits: {keepalive_timeout: 30s}"))
        assert (await proxy.server.reload("test")).outcome is ReloadOutcome.APPLIED
        new_reader, new_writer, _ = await kept_alive(proxy.server.port)
        old, new = await asyncio.gather(
            read_answer(old_reader, quiet_s=1.0), read_answer(new_reader, quiet_s=1.0)
        )
        old_writer.close()
        new_writer.close()
    assert old.closed, "a connection keeps the timeout it opened with"
    assert not new.closed


async def test_overload_refusals_never_reach_the_backend(backends: Backends) -> None:
    top = "limits: {max_concurrency: 1}"
    await clear(backends)
    async with running_proxy(config(backends, top)) as proxy, aiohttp.ClientSession() as session:
        url = f"{proxy.url}/v1/chat/completions"
        hanging = asyncio.create_task(session.post(url, data=CHAT, headers={"x-fake-hang": "1"}))
        await eventually(
            "the hanging request at the backend",
            lambda: backend_requests(backends),
            holds=lambda requests: len(requests) == 1,
            timeout_s=2.5,
        )
        statuses = []
        for _ in range(5):
            async with session.post(url, data=CHAT) as response:
                statuses.append(response.status)
                assert response.headers["Retry-After"] == "1"
        hanging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hanging
    assert statuses == [503] * 5
    assert len(await backend_requests(backends)) == 1  # the hanging one alone


@pytest.mark.timeout(30)
async def test_a_reader_that_stops_stops_the_backend_instead_of_filling_memory(
    backends: Backends,
) -> None:
    """Backpressure: with the client not reading, the backend's writes stall."""
    traffic = f"{backends.stable.url}/fake/traffic"

    async def sent(session: aiohttp.ClientSession) -> int:
        async with session.get(traffic) as response:
            return int(json.loads(await response.read())["stream_bytes_sent"])

    body = {"messages": [], "stream": True, "max_tokens": 10**6}
    async with running_proxy(config(backends)) as proxy, aiohttp.ClientSession() as session:
        before = await sent(session)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
        payload = json.dumps(body).encode()
        writer.write(
            POST + b"x-fake-tokens: 1000000\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
        )
        await reader.readuntil(b"\r\n\r\n")  # the head; then this client reads nothing
        samples = []
        for _ in range(5):
            await asyncio.sleep(0.3)
            samples.append(await sent(session) - before)
        writer.close()
    # About 150 MB at full speed; the backend stopped after a few socket buffers (four
    # loopback sockets, each of which the kernel may grow to several MB: 18 MB seen).
    assert samples[-1] == samples[-2] == samples[-3], samples
    assert samples[-1] < 32 * 1024 * 1024, samples


@pytest.mark.parametrize("request_id", [b"\x80\xff", b"id with\ttab", b"r" * 300])
async def test_a_request_id_that_cannot_be_sent_on_is_replaced(
    backends: Backends, request_id: bytes
) -> None:
    raw = GET + b"x-request-id: " + request_id + b"\r\nConnection: close\r\n\r\n"
    answer, (received,) = await through_proxy(backends, raw)
    assert answer.statuses == [200]
    sent_on = dict(received["headers"])["x-request-id"]
    assert sent_on.encode() != request_id
    assert b"x-request-id: " + sent_on.encode() in answer.data


SLOW_LIMITS = "limits: {header_timeout: 300ms}"
SHORT_FIRST_BYTE = "timeouts: {first_byte: 200ms}"


def chat_head(length: int) -> bytes:
    return POST + b"x-user-id: u\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % length


@pytest.mark.parametrize("length", [100, 100_000], ids=["read-whole", "streamed-on"])
async def test_a_client_silent_mid_body_gets_408_and_no_backend_is_blamed(
    backends: Backends, length: int
) -> None:
    config_text = proxy_yaml(
        backends.stable.url, backends.canary.url, top=SLOW_LIMITS, backend=SHORT_FIRST_BYTE
    )
    await clear(backends)
    async with running_proxy(config_text) as proxy:
        assert proxy.server.port is not None
        started = time.monotonic()
        # Nearly all of the body (past the 64 KiB the proxy streams on), then silence.
        answer = await send_raw(proxy.server.port, chat_head(length) + b"{" * (length * 7 // 10))
        waited = time.monotonic() - started
        counts = proxy.server.telemetry.metrics.upstream_requests
        forwarder = proxy.server._forwarder
        assert forwarder is not None
        in_flight = forwarder.in_flight
    assert answer.statuses == [408], answer.data[:300]
    assert answer.json()["error"]["code"] == "request_timeout"
    assert waited < 2.0
    assert in_flight == 0
    assert await backend_requests(backends) == []  # nothing whole reached a backend
    assert all(key[3] != "error" for key in counts), counts  # no variant blamed


async def test_a_slow_steady_upload_longer_than_first_byte_is_served(backends: Backends) -> None:
    config_text = proxy_yaml(
        backends.stable.url, backends.canary.url, top=SLOW_LIMITS, backend=SHORT_FIRST_BYTE
    )
    payload = json.dumps({"messages": [], "max_tokens": 1, "pad": "x" * 100_000}).encode()
    pieces = [payload[start : start + 20_000] for start in range(0, len(payload), 20_000)]
    async with running_proxy(config_text) as proxy:
        assert proxy.server.port is not None
        # 6 pieces 120 ms apart: 0.6 s of upload, three times first_byte, never 300 ms silent.
        answer = await send_raw(
            proxy.server.port, chat_head(len(payload)), *pieces, pause_s=0.12, quiet_s=1.0
        )
    assert answer.statuses == [200], answer.data[:300]
