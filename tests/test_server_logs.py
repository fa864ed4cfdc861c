"""The admin port and the fake backend log each expected network error in one line.

A client that sends bad HTTP, or leaves (closes or resets its connection) while its
request is under way, is no fault of the server's: the admin ports
(`proxy.http.serverlog`) and the fake backend (its own copy of those rules) make each
one line, without traceback. The admin port and the fake backend are run as a user runs
them (`canary-proxy run`, `canary-proxy fake-backend`), their stderr read as they go.
A bug in a handler still logs its traceback at ERROR: that is tried on real aiohttp
servers wired the same way, since neither process has a bug to show on demand.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.http.serverlog import NetworkErrorLog, one_line_network_errors
from tests.conftest import Backends
from tests.harness import eventually, proxy_yaml
from tests.proxy_process import ProxyProcess

pytestmark = pytest.mark.timeout(60)

CHAT = json.dumps({"messages": [], "stream": True, "max_tokens": 100_000}).encode()
INVALID_HEADER = b"GET /healthz HTTP/1.1\r\nHost: x\r\nA\x00: b\r\n\r\n"
TLS_HELLO = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40
SMUGGLING = (
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
)
LONG_LINE = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n"
LINE_WAIT_S = 5.0


class LogReader:
    """A child's stderr, read line by line as it comes."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        self._process = process
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._process.stderr is not None
        for raw in self._process.stderr:
            self.lines.append(raw.decode(errors="replace"))

    def join(self) -> None:
        self._thread.join(timeout=5)

    @property
    def text(self) -> str:
        return "".join(self.lines)


def matching(lines: list[str], pattern: str) -> list[str]:
    return [line for line in lines if re.search(pattern, line)]


async def until_count(lines: list[str], pattern: str, count: int) -> list[str]:
    """Wait until `count` lines match; the matching lines (more if more came)."""
    # Lines come from a reader thread: polling is simplest.
    await eventually(
        f"{count} log lines matching {pattern!r}",
        lambda: matching(lines, pattern),
        holds=lambda found: len(found) >= count,
        timeout_s=LINE_WAIT_S,
        interval_s=0.02,
    )
    await asyncio.sleep(0.1)  # a second line for the same event would come now
    return matching(lines, pattern)


async def send_and_close(port: int, data: bytes, *, reset: bool = False, read: int = 0) -> None:
    """Send `data`, read `read` bytes of the answer if asked, then close (or reset)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    if read:
        await asyncio.wait_for(reader.readexactly(read), 5)
    else:
        with suppress(TimeoutError):
            await asyncio.wait_for(reader.read(65536), 0.3)
    if reset:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def stall_then_reset(port: int, request: bytes) -> None:
    """Pipeline `request` until the server blocks writing answers nobody reads, then reset.

    The server is blocked when what waits unread in this socket stops growing.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        sending = loop.create_task(loop.sock_sendall(sock, request * 20_000))
        unread, steady_since, deadline = -1, time.monotonic(), time.monotonic() + 10
        while time.monotonic() - steady_since < 0.3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            now = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
            if now != unread:
                unread, steady_since = now, time.monotonic()
        sending.cancel()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


# --- the fake backend ----------------------------------------------------------------------


@pytest.fixture
def fake_backend() -> Iterator[tuple[int, subprocess.Popen[bytes], LogReader]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "fake-backend", "--port", "0", "--log-level", "debug"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    match = re.search(rb":(\d+) model=", process.stdout.readline())
    log = LogReader(process)
    try:
        assert match is not None, log.text
        yield int(match.group(1)), process, log
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=5)
        log.join()
        process.stdout.close()
        assert process.stderr is not None
        process.stderr.close()


def chat(*headers: bytes) -> bytes:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(CHAT)
    return head + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + CHAT


LEFT = r"INFO proxy.fake_backend: POST /v1/chat/completions from 127\.0\.0\.1: the client left"
FAKE_BACKEND_EVENTS: list[tuple[str, Callable[[int], Awaitable[None]], str]] = [
    # (what the client does, the one line it must make)
    (
        "invalid-header",
        lambda port: send_and_close(port, INVALID_HEADER),
        r"INFO proxy.fake_backend: .*127\.0\.0\.1: not valid HTTP: Invalid header token$",
    ),
    (
        "tls-hello",  # aiohttp's own judgement: noise, DEBUG
        lambda port: send_and_close(port, TLS_HELLO),
        r"DEBUG proxy.fake_backend: .*not valid HTTP: Received HTTPS traffic on an HTTP port$",
    ),
    (
        "line-too-long",
        lambda port: send_and_close(port, LONG_LINE),
        r"INFO proxy.fake_backend: .*not valid HTTP: a request line or header is too long$",
    ),
    (
        "closed-mid-request",
        lambda port: send_and_close(port, chat()[: -len(CHAT) // 2]),
        LEFT + r" before its answer was whole",
    ),
    (
        "closed-mid-response",
        lambda port: send_and_close(port, chat(b"x-fake-tokens-per-s: 20"), read=200),
        LEFT + r" before its answer was whole",
    ),
    (
        "reset-mid-response",
        lambda port: send_and_close(port, chat(b"x-fake-tokens-per-s: 20"), read=200, reset=True),
        LEFT + r" before its answer was whole",
    ),
    (
        "closed-while-it-hangs",
        lambda port: send_and_close(port, chat(b"x-fake-hang: 1")),
        LEFT + r" before its answer was whole",
    ),
]


async def test_the_fake_backend_logs_one_line_per_network_error_and_no_traceback(
    fake_backend: tuple[int, subprocess.Popen[bytes], LogReader],
) -> None:
    port, process, log = fake_backend
    for index, (name, act, line) in enumerate(FAKE_BACKEND_EVENTS, start=1):
        await act(port)
        events = await until_count(log.lines, r"proxy.fake_backend: ", index)
        assert len(events) == index, (name, events)
        assert re.search(line, events[-1].rstrip("\n")), (name, events[-1])
    # It still serves, and says nothing of a request that went well.
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/v1/models") as response,
    ):
        assert response.status == 200
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    log.join()
    assert "Traceback" not in log.text, log.text
    assert len(matching(log.lines, r"proxy.fake_backend: ")) == len(FAKE_BACKEND_EVENTS) + 1
    assert log.lines[-1].rstrip().endswith("Fake backend stopping on a signal."), log.text


# --- the admin port ------------------------------------------------------------------------


def admin_config(path: Path, backends: Backends) -> Path:
    path.write_text(
        proxy_yaml(
            backends.stable.url,
            backends.canary.url,
            top=f"state: {{path: '{path.parent / 'state.db'}'}}",
        )
    )
    return path


# The events' lines, and none other of the process's (it logs its life at DEBUG too).
ADMIN = r"(INFO|DEBUG) proxy\.server\.(admin|supervisor): .*(not valid HTTP|the client left)"
ADMIN_EVENTS = [
    ("invalid-header", INVALID_HEADER, r"INFO .*: not valid HTTP: Invalid header token$"),
    ("tls-hello", TLS_HELLO, r"DEBUG .*: not valid HTTP: Received HTTPS traffic on an HTTP port$"),
    ("smuggling", SMUGGLING, r"INFO .*: not valid HTTP: "),
    ("line-too-long", LONG_LINE, r"INFO .*: a request line or header is too long$"),
]


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "supervisor"])
async def test_the_admin_port_logs_one_line_per_network_error_and_no_traceback(
    backends: Backends, tmp_path: Path, workers: int
) -> None:
    proxy = ProxyProcess(
        admin_config(tmp_path / "proxy.yaml", backends), "--log-level", "debug", workers=workers
    )
    try:
        for index, (name, data, line) in enumerate(ADMIN_EVENTS, start=1):
            await send_and_close(proxy.admin_port, data)
            events = await until_count(proxy.lines, ADMIN, index)
            assert len(events) == index, (name, events)
            assert re.search(line, events[-1].rstrip("\n")), (name, events[-1])
        # A client that stops reading answers, then resets: the answer under way is the
        # one line (the answers before it were written whole).
        await stall_then_reset(proxy.admin_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        events = await until_count(proxy.lines, ADMIN, len(ADMIN_EVENTS) + 1)
        assert len(events) == len(ADMIN_EVENTS) + 1, events
        assert re.search(r"INFO .*GET /healthz from .*: the client left mid-response", events[-1])
        code, _ = await proxy.admin("GET", "/healthz")
        assert code == 200
        assert proxy.stop() == 0
    finally:
        proxy.kill()
    assert "Traceback" not in proxy.log, proxy.log
    assert len(matching(proxy.lines, ADMIN)) == len(ADMIN_EVENTS) + 1, proxy.log


# --- a bug is still loud -------------------------------------------------------------------


class OutboundFailure(ConnectionResetError):
    """A connection of the handler's own failing: not the client's doing."""


@asynccontextmanager
async def serving(runner: web.BaseRunner) -> AsyncIterator[str]:
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site.port}"
    finally:
        await runner.cleanup()


async def bug(_: web.BaseRequest) -> web.StreamResponse:
    raise RuntimeError("a bug in a handler")


async def outbound(_: web.BaseRequest) -> web.StreamResponse:
    raise OutboundFailure("a call the handler made was reset")


@pytest.mark.parametrize("path", ["/bug", "/outbound"])
async def test_a_bug_in_an_application_handler_still_logs_its_traceback_at_error(
    caplog: pytest.LogCaptureFixture, path: str
) -> None:
    log = logging.getLogger("tests.serverlog.app")
    app = web.Application(
        middlewares=[one_line_network_errors(log)], handler_args={"logger": NetworkErrorLog(log)}
    )
    app.router.add_get("/bug", bug)
    app.router.add_get("/outbound", outbound)
    caplog.set_level(logging.DEBUG, logger=log.name)
    async with (
        serving(web.AppRunner(app, access_log=None)) as url,
        aiohttp.ClientSession() as session,
        session.get(url + path) as response,
    ):
        assert response.status == 500
    errors = [r for r in caplog.records if r.name == log.name and r.levelno == logging.ERROR]
    assert len(errors) == 1, caplog.text
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], RuntimeError | OutboundFailure)
    assert "Traceback (most recent call last)" in caplog.text


async def test_a_bug_behind_the_low_level_server_still_logs_its_traceback_at_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("tests.serverlog.server")
    caplog.set_level(logging.DEBUG, logger=log.name)
    server = web.Server(bug, access_log=None, logger=NetworkErrorLog(log))
    async with (
        serving(web.ServerRunner(server)) as url,
        aiohttp.ClientSession() as session,
        session.get(url + "/") as response,
    ):
        assert response.status == 500
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [type(r.exc_info[1]) for r in errors if r.exc_info] == [RuntimeError], caplog.text
    assert "Traceback (most recent call last)" in caplog.text
