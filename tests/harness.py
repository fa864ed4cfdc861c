"""Real parts for the end-to-end tests: fake-backend processes and proxies on 127.0.0.1.

Backends run as `canary-proxy fake-backend` processes, as a user would run them; a
proxy runs in the test's event loop through `ProxyServer`, the same code the `run`
command serves with, so a test can start one per config cheaply.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import aiohttp

from proxy.config import load_config, parse_config
from proxy.server.app import ProxyServer

T = TypeVar("T")

_LISTENING = re.compile(rb"listening on http://([\d.]+):(\d+)")


@dataclass
class BackendProcess:
    """A running `canary-proxy fake-backend`."""

    process: subprocess.Popen[bytes]
    port: int
    model: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stats(self) -> dict[str, int]:
        return await _get_json(f"{self.url}/fake/stats")  # type: ignore[no-any-return]

    async def requests(self) -> list[dict[str, Any]]:
        return await _get_json(f"{self.url}/fake/requests")  # type: ignore[no-any-return]

    async def clear(self) -> None:
        async with aiohttp.ClientSession() as session, session.delete(f"{self.url}/fake/requests"):
            pass

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_backend(model: str, *flags: str) -> BackendProcess:
    """Start a fake backend on a free port and wait until it listens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "fake-backend", "--port", "0", "--model", model, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = _LISTENING.search(line)
    if match is None:
        process.kill()
        process.wait(timeout=5)
        process.stdout.close()
        raise RuntimeError(f"fake backend did not start: {line!r}")
    return BackendProcess(process, int(match.group(2)), model)


async def run_cli(*argv: str, timeout_s: float = 30.0) -> tuple[int, str, str]:
    """`canary-proxy ARGV...` as a child process, without blocking the test's event loop
    (where a proxy it talks to may run): its exit status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    async with asyncio.timeout(timeout_s):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (a server may bind it next)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def refused_port() -> int:
    """A port on 127.0.0.1 that refuses connections for the rest of the test process:
    bound, with no listener. A port merely closed again (`closed_port`) can be taken
    meanwhile by a server another test starts, which then answers in its place."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _REFUSING.append(sock)
    return int(sock.getsockname()[1])


_REFUSING: list[socket.socket] = []


@contextmanager
def unanswered_port() -> Iterator[int]:
    """A port on 127.0.0.1 whose listener accepts nothing and whose backlog is full: a
    connection to it is neither made nor refused, as with a backend host that is down."""
    with ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(3):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        yield port


def proxy_yaml(
    stable: str = "http://127.0.0.1:1",
    canary: str = "http://127.0.0.1:2",
    route: str = "",
    top: str = "",
    backend: str = "",
    *,
    listen: str = "127.0.0.1:0",
    admin: str = "{listen: 127.0.0.1:0}",
) -> str:
    """The tests' one builder of config files: backends v1 (stable) and v2 (canary), one
    route `chat`, the proxy and the admin port on 127.0.0.1 (free ports unless told).

    `route` lines are added to the route, `top` lines at the top level and `backend`
    lines to both backends; each is YAML indented as at its place.
    """
    return (
        f"listen: {listen}\n"
        f"admin: {admin}\n"
        f"{_lines(top, '')}"
        "backends:\n"
        f"  v1:\n    url: {stable}\n{_lines(backend, '    ')}"
        f"  v2:\n    url: {canary}\n{_lines(backend, '    ')}"
        "routes:\n"
        "  - name: chat\n"
        "    stable: v1\n"
        "    canary: v2\n"
        f"{_lines(route, '    ')}"
    )


def auto_rollout(
    weight: float = 0,
    *,
    steps: str = "[20, 50, 100]",
    interval: str = "1s",
    min_requests: int = 30,
    pass_intervals: int = 1,
    failure_limit: int = 1,
    checks: str = "error_rate: {max: 0.2, max_increase: 0.05}",
) -> str:
    """A route's automatic rollout from `weight`, as `proxy_yaml`'s `route` lines."""
    return (
        "rollout:\n"
        f"  weight: {weight}\n"
        "  auto:\n"
        f"    steps: {steps}\n"
        f"    interval: {interval}\n"
        f"    min_requests: {min_requests}\n"
        f"    pass_intervals: {pass_intervals}\n"
        f"    failure_limit: {failure_limit}\n"
        f"    checks: {{{checks}}}\n"
    )


def sticky(salt: str) -> str:
    """Users keyed by their `x-user-id` header, as `proxy_yaml`'s `route` lines."""
    return f"sticky: {{keys: [header:x-user-id], salt: {salt}}}\n"


def _lines(text: str, indent: str) -> str:
    return "".join(f"{indent}{line}\n" for line in text.splitlines() if line)


@dataclass
class RunningProxy:
    server: ProxyServer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


@asynccontextmanager
async def running_proxy_file(path: str, *, watch: bool = True) -> AsyncIterator[RunningProxy]:
    """A proxy serving the config file at `path`, watching it for changes."""
    server = ProxyServer(load_config(path), watch=watch)
    await server.start()
    try:
        yield RunningProxy(server)
    finally:
        await server.stop()


@asynccontextmanager
async def running_proxy(
    yaml_text: str, environ: dict[str, str] | None = None
) -> AsyncIterator[RunningProxy]:
    config = parse_config(yaml_text, environ=environ if environ is not None else dict(os.environ))
    server = ProxyServer(config)
    await server.start()
    try:
        yield RunningProxy(server)
    finally:
        await server.stop()


async def _get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return json.loads(await response.read())


@overload
async def eventually(
    what: str,
    probe: Callable[[], Awaitable[T]],
    *,
    timeout_s: float,
    holds: Callable[[T], object] = ...,
    interval_s: float = ...,
) -> T: ...


@overload
async def eventually(
    what: str,
    probe: Callable[[], T],
    *,
    timeout_s: float,
    holds: Callable[[T], object] = ...,
    interval_s: float = ...,
) -> T: ...


async def eventually(
    what: str,
    probe: Callable[[], Any],
    *,
    timeout_s: float,
    holds: Callable[[Any], object] = bool,
    interval_s: float = 0.05,
) -> Any:
    """Probe (a function, or a coroutine function) until `holds` its value; that value.

    Fails the test naming `what` was awaited and the last value seen once `timeout_s`
    passes; the last probe is the first one after the deadline.
    """
    waiting = _Waiting(what, timeout_s, holds)
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if waiting.over(value):
            return value
        await asyncio.sleep(interval_s)


def eventually_sync(
    what: str,
    probe: Callable[[], T],
    *,
    timeout_s: float,
    holds: Callable[[T], object] = bool,
    interval_s: float = 0.05,
) -> T:
    """`eventually` for code without an event loop: blocks while it waits."""
    waiting = _Waiting(what, timeout_s, holds)
    while not waiting.over(value := probe()):
        time.sleep(interval_s)
    return value


class _Waiting:
    """The deadline of one wait, and its failure."""

    def __init__(self, what: str, timeout_s: float, holds: Callable[[Any], object]) -> None:
        self.what = what
        self.timeout_s = timeout_s
        self.holds = holds
        self.deadline = time.monotonic() + timeout_s

    def over(self, value: object) -> bool:
        """Whether `value` ends the wait; fails the test past the deadline."""
        if self.holds(value):
            return True
        if time.monotonic() > self.deadline:
            seen = repr(value)
            if len(seen) > 2000:
                seen = seen[:2000] + "..."
            raise AssertionError(f"{self.what}: not within {self.timeout_s:g}s; last seen: {seen}")
        return False
