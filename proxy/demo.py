"""`canary-proxy demo`: the product on one machine, in a few seconds, with nothing to set up.

It starts a fake model server on the port of each backend of the config's first
route, then the proxy itself (`canary-proxy run`, as a user runs it), then sends
traffic from a thousand users, a third of it streamed, through the proxy. At the
end it prints, per variant, the share of users and of requests, and checks the two
promises of sticky assignment: every user stayed on one side, and every user's side
is the one the formula gives. It talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import aiohttp

from proxy.config import load_config
from proxy.config.model import Config, Route
from proxy.errors import ConfigError
from proxy.routing import bucket_of, canary_threshold, choose_variant

__all__ = ["DemoError", "default_config_path", "run_demo"]

_READY_TIMEOUT_S: Final = 15.0
_CONCURRENCY: Final = 32


class DemoError(Exception):
    """The demo cannot run (a port is taken, a process did not start); one line."""


def default_config_path() -> Path:
    """The demo config shipped inside the package (config/demo.yaml in the repository)."""
    return Path(str(resources.files("proxy").joinpath("demo.yaml")))


@dataclass
class Tally:
    """What the demo's clients saw."""

    variant_of_user: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    requests: Counter[str] = field(default_factory=Counter)
    streamed: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)


async def run_demo(config_path: Path, users: int, requests_per_user: int) -> int:
    """Run the demo; 0 when every promise held, 1 otherwise."""
    try:
        config = load_config(config_path)
    except ConfigError as error:
        raise DemoError(f"{config_path}: {error.problems[0]}") from None
    route = config.routes[0]
    say(
        f"canary-proxy demo: route {route.name!r}, stable {route.stable} -> canary "
        f"{route.canary} at {route.rollout.weight:g}% ({config_path}, version {config.version})"
    )
    async with _processes(config, config_path, route) as proxy_url:
        tally = await _drive(proxy_url, route, users, requests_per_user)
    return _report(route, tally)


@contextlib.asynccontextmanager
async def _processes(config: Config, config_path: Path, route: Route) -> AsyncIterator[str]:
    started: list[asyncio.subprocess.Process] = []
    try:
        for name in dict.fromkeys((route.stable, route.canary)):
            backend = config.backends[name]
            host, port = _local_address(backend.url)
            await _ensure_free(host, port)
            flags = ("--host", host, "--port", str(port), "--model", backend.name)
            started.append(await _spawn("fake-backend", *flags))
            await _wait_listening(host, port, f"fake backend {backend.name}")
            say(f"  fake model server {backend.name!r} on http://{host}:{port}")
        host, port = config.listen.host, config.listen.port
        await _ensure_free(host, port)
        started.append(await _spawn("run", "-c", str(config_path), "--log-level", "warning"))
        await _wait_listening(host, port, "the proxy")
        say(f"  proxy on http://{host}:{port}")
        yield f"http://{host}:{port}"
    finally:
        for process in reversed(started):
            await _stop(process)


def _local_address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.hostname not in {"127.0.0.1", "localhost"} or parts.port is None:
        raise DemoError(f"the demo runs backends on 127.0.0.1 only; {url} is not local")
    return parts.hostname, parts.port


async def _ensure_free(host: str, port: int) -> None:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return
    writer.close()
    raise DemoError(f"port {port} on {host} is already in use; stop what listens there and retry")


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=None,
    )


async def _wait_listening(host: str, port: int, what: str) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise DemoError(f"{what} did not start listening on {host}:{port} within {_READY_TIMEOUT_S:g}s")


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=5)
        except TimeoutError:
            process.kill()
            await process.wait()


async def _drive(proxy_url: str, route: Route, users: int, per_user: int) -> Tally:
    tally = Tally()
    plan = [(f"user-{n:04d}", i % 3 == 2) for n in range(users) for i in range(per_user)]
    random.Random(7).shuffle(plan)
    total = len(plan)
    say(f"sending {total} requests from {users} users, one in three streamed ...")
    gate = asyncio.Semaphore(_CONCURRENCY)
    done = 0
    connector = aiohttp.TCPConnector(limit=_CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(user: str, stream: bool) -> None:
            nonlocal done
            async with gate:
                await _request(session, proxy_url, user, stream, tally)
            done += 1
            if done % max(1, total // 4) == 0:
                say(f"  {done}/{total}")

        await asyncio.gather(*(one(user, stream) for user, stream in plan))
    return tally


async def _request(
    session: aiohttp.ClientSession, proxy_url: str, user: str, stream: bool, tally: Tally
) -> None:
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
        "stream": stream,
    }
    try:
        async with session.post(
            f"{proxy_url}/v1/chat/completions", json=body, headers={"x-user-id": user}
        ) as response:
            await response.read()
            variant = response.headers.get("x-canary-variant", "none")
            if response.status != 200:
                tally.failures[f"status {response.status}"] += 1
                return
    except aiohttp.ClientError as exc:
        tally.failures[exc.__class__.__name__] += 1
        return
    tally.variant_of_user[user].add(variant)
    tally.requests[variant] += 1
    if stream:
        tally.streamed[variant] += 1


def _report(route: Route, tally: Tally) -> int:
    users_by_variant: Counter[str] = Counter()
    for variants in tally.variant_of_user.values():
        if len(variants) == 1:
            users_by_variant[next(iter(variants))] += 1
    users = len(tally.variant_of_user)
    requests = sum(tally.requests.values())
    say("")
    say(f"{'variant':<8} {'users':>6} {'share':>7} {'requests':>9} {'share':>7} {'streamed':>9}")
    for variant in ("stable", "canary"):
        user_count, request_count = users_by_variant[variant], tally.requests[variant]
        say(
            f"{variant:<8} {user_count:>6} {_share(user_count, users):>7}"
            f" {request_count:>9} {_share(request_count, requests):>7}"
            f" {tally.streamed[variant]:>9}"
        )
    say(f"(the canary weight is {route.rollout.weight:g}% of users; a sample of {users} varies)")
    say("")
    both = [user for user, variants in tally.variant_of_user.items() if len(variants) > 1]
    threshold = canary_threshold(route.rollout.weight)
    wrong = [
        user
        for user, variants in tally.variant_of_user.items()
        if variants != {choose_variant(bucket_of(route.sticky.salt, user), threshold).value}
    ]
    say(f"users seen on both sides: {len(both)} of {users}")
    say(f"users whose side differs from the formula: {len(wrong)} of {users}")
    if tally.failures:
        say("failed requests: " + ", ".join(f"{n} {why}" for why, n in tally.failures.items()))
    ok = not both and not wrong and not tally.failures and users > 0
    say(
        "every user stayed on one side, exactly where the formula puts them."
        if ok
        else "the demo found a broken promise; see above."
    )
    return 0 if ok else 1


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def say(line: str) -> None:
    print(line, flush=True)
