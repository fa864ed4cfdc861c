"""`canary-proxy demo`: the whole product on one machine, in under two minutes.

It starts a fake model server on the port of each backend of the config's first
route — a stable one with 1% errors, and a canary with 10% errors and slower answers
(or, with `--healthy-canary`, one as good as stable) — then the proxy itself
(`canary-proxy run`, as a user runs it, its state in a temporary directory), then
traffic from a thousand users, a third of it streamed. While the rollout controller
ramps the canary it shows, every second, the weight with a progress bar, each
variant's requests, error rate, p95 latency and time to first token, and the last
verdict with its reason. It ends with the outcome, the decisions and their reasons,
and a check of the sticky promise: while the weight only rose, no user went from the
canary back to stable. It talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp

from proxy.config import load_config
from proxy.config.model import Config, Route
from proxy.errors import ConfigError

__all__ = ["DemoError", "default_config_path", "run_demo"]

_READY_TIMEOUT_S: Final = 15.0
_CONCURRENCY: Final = 24
_STABLE_FLAGS: Final = ("--error-rate", "0.01", "--ttft", "0.05", "--tokens-per-s", "400")
_FAULTY_FLAGS: Final = (
    "--error-rate", "0.10", "--latency", "0.08", "--ttft", "0.15", "--tokens-per-s", "400",
)  # fmt: skip
_BAR: Final = 24


class DemoError(Exception):
    """The demo cannot run (a port is taken, a process did not start); one line."""


def default_config_path() -> Path:
    """The demo config shipped inside the package (config/demo.yaml in the repository)."""
    return Path(str(resources.files("proxy").joinpath("demo.yaml")))


@dataclass
class Traffic:
    """What the demo's clients saw."""

    served: dict[str, list[tuple[float, str]]] = field(
        default_factory=dict
    )  # user: (time, variant)
    requests: dict[str, int] = field(default_factory=lambda: {"stable": 0, "canary": 0})
    failures: dict[str, int] = field(default_factory=dict)


async def run_demo(
    config_path: Path, *, healthy_canary: bool, users: int, rps: float, timeout_s: float
) -> int:
    """Run the demo; 0 when the rollout ended as expected and every promise held."""
    try:
        config = load_config(config_path)
    except ConfigError as error:
        raise DemoError(f"{config_path}: {error.problems[0]}") from None
    route = next((r for r in config.routes if r.rollout.auto is not None), None)
    if route is None:
        raise DemoError(f"{config_path}: the demo needs a route with rollout.auto")
    canary_kind = "healthy" if healthy_canary else "faulty (10% errors, slower)"
    say(
        f"canary-proxy demo: route {route.name!r}, stable {route.stable} -> canary "
        f"{route.canary}, a {canary_kind} canary, steps "
        + " > ".join(f"{step:g}%" for step in route.rollout.auto.steps)  # type: ignore[union-attr]
    )
    async with _processes(config, config_path, route, healthy_canary) as urls:
        proxy_url, admin_url = urls
        traffic = Traffic()
        stop = asyncio.Event()
        driver = asyncio.create_task(_drive(proxy_url, users, rps, traffic, stop))
        try:
            final = await _watch(admin_url, route.name, timeout_s)
        finally:
            stop.set()
            await driver
    return _report(final, traffic, healthy_canary)


# --- processes ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _processes(
    config: Config, config_path: Path, route: Route, healthy_canary: bool
) -> AsyncIterator[tuple[str, str]]:
    started: list[asyncio.subprocess.Process] = []
    with tempfile.TemporaryDirectory(prefix="canary-demo-") as state_dir:
        try:
            for name, flags in (
                (route.stable, _STABLE_FLAGS),
                (route.canary, _STABLE_FLAGS if healthy_canary else _FAULTY_FLAGS),
            ):
                host, port = _local_address(config.backends[name].url)
                await _ensure_free(host, port)
                argv = ("--host", host, "--port", str(port), "--model", name, *flags)
                argv += ("--log-level", "warning")  # as the proxy's: the screen is the demo's
                started.append(await _spawn(state_dir, "fake-backend", *argv))
                await _wait_listening(host, port, f"fake backend {name}")
            for address in (config.listen, config.admin.listen):
                await _ensure_free(address.host, address.port)
            config_file = config.source  # made absolute by the caller: the proxy runs elsewhere
            started.append(
                await _spawn(state_dir, "run", "-c", config_file, "--log-level", "warning")
            )
            await _wait_listening(config.listen.host, config.listen.port, "the proxy")
            await _wait_listening(
                config.admin.listen.host, config.admin.listen.port, "the admin port"
            )
            yield (
                f"http://{config.listen.host}:{config.listen.port}",
                f"http://{config.admin.listen.host}:{config.admin.listen.port}",
            )
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


async def _spawn(cwd: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=None,
        cwd=cwd,  # the proxy's rollout state goes to a fresh directory: a new rollout
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


# --- traffic -----------------------------------------------------------------------------


async def _drive(
    proxy_url: str, users: int, rps: float, traffic: Traffic, stop: asyncio.Event
) -> None:
    """Requests from `users` users at about `rps` a second, a third streamed, until `stop`."""
    rng = random.Random(7)
    gate = asyncio.Semaphore(_CONCURRENCY)
    connector = aiohttp.TCPConnector(limit=_CONCURRENCY)
    pending: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        sent = 0
        while not stop.is_set():
            due = started + sent / rps
            delay = due - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                continue
            await gate.acquire()
            user = f"user-{rng.randrange(users):04d}"
            task = asyncio.create_task(_request(session, proxy_url, user, sent % 3 == 2, traffic))
            task.add_done_callback(lambda _: gate.release())
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        await asyncio.gather(*pending, return_exceptions=True)


async def _request(
    session: aiohttp.ClientSession, proxy_url: str, user: str, stream: bool, traffic: Traffic
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
            variant = response.headers.get("x-canary-variant", "?")
    except aiohttp.ClientError as exc:
        name = exc.__class__.__name__
        traffic.failures[name] = traffic.failures.get(name, 0) + 1
        return
    if variant in traffic.requests:
        traffic.requests[variant] += 1
        traffic.served.setdefault(user, []).append((time.time(), variant))


# --- watching ----------------------------------------------------------------------------


async def _watch(admin_url: str, route: str, timeout_s: float) -> dict[str, Any]:
    """Show the rollout every second until it ends; its last status."""
    deadline = time.monotonic() + timeout_s
    live = sys.stdout.isatty()
    last_line = ""
    document: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{admin_url}/api/status?window=10") as response:
                document = json.loads(await response.read())
            state = next(r for r in document["routes"] if r["name"] == route)
            line = _progress(state)
            if live:
                print(f"\r\033[2K{line}", end="", flush=True)
            elif line != last_line:
                say(line)
            last_line = line
            if state["rollout"].get("status") in ("promoted", "rolled_back"):
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
    if live:
        print()
    result: dict[str, Any] = state
    return result


def _progress(state: dict[str, Any]) -> str:
    rollout = state["rollout"]
    weight = float(state["weight"])
    filled = round(_BAR * weight / 100)
    bar = "#" * filled + "." * (_BAR - filled)
    variants = state["variants"]
    parts = [f"[{bar}] {weight:5.1f}% {rollout.get('status', '-'):<11}"]
    for name in ("stable", "canary"):
        v = variants[name]
        parts.append(
            f"{name} {v['requests']:>4} req {_pct(v['error_rate']):>6} err "
            f"p95 {_ms(v['latency_s']['p95'])} ttft {_ms(v['ttft_s']['p95'])}"
        )
    verdict = rollout.get("last_verdict")
    if verdict:
        parts.append(f"last: {verdict['verdict']}")
    return " | ".join(parts)


def _report(state: dict[str, Any], traffic: Traffic, healthy_canary: bool) -> int:
    rollout = state["rollout"]
    status = rollout.get("status")
    say("")
    say(
        f"outcome: the canary was {status.replace('_', ' ') if status else 'not judged'} "
        f"(weight {state['weight']:g}%)"
    )
    say("decisions, oldest first:")
    for decision in reversed(rollout.get("decisions", [])):
        say(f"  {decision['at'][11:19]}  {decision['reason']}")
    total = sum(traffic.requests.values())
    say(
        f"requests: {total} ({traffic.requests['stable']} stable, "
        f"{traffic.requests['canary']} canary) from {len(traffic.served)} users"
    )
    rollbacks = [
        datetime.datetime.fromisoformat(d["at"]).timestamp()
        for d in rollout.get("decisions", [])
        if d["action"] == "rollback"
    ]
    # Decisions are stamped to the second: leave a second for requests already sent.
    moved_back = _moved_back(traffic.served, until=min(rollbacks, default=math.inf) - 1.0)
    say(f"users moved from the canary back to stable while the weight rose: {moved_back}")
    if traffic.failures:
        say("client errors: " + ", ".join(f"{n} {why}" for why, n in traffic.failures.items()))
    expected = "promoted" if healthy_canary else "rolled_back"
    ok = status == expected and moved_back == 0 and not traffic.failures
    say(
        f"as expected: a {'healthy' if healthy_canary else 'faulty'} canary was "
        f"{expected.replace('_', ' ')}, and every user stayed sticky."
        if ok
        else f"not as expected: the canary should have been {expected.replace('_', ' ')}."
    )
    return 0 if ok else 1


def _moved_back(served: dict[str, list[tuple[float, str]]], *, until: float) -> int:
    """Users served by the canary and later by stable, before `until` (a rollback)."""
    moved = 0
    for requests in served.values():
        seen_canary = False
        for at, variant in sorted(requests):
            if at >= until:
                break
            if variant == "canary":
                seen_canary = True
            elif seen_canary:
                moved += 1
                break
    return moved


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ms(value: float | None) -> str:
    return "   -  " if value is None else f"{1000 * value:4.0f}ms"


def say(line: str) -> None:
    print(line, flush=True)
