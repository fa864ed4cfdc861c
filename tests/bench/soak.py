"""Soak: mixed traffic with injected backend faults and live reloads, for a long while.

`canary-proxy run` serves a stable and a canary `fake-backend` (the canary also fails
1% of its completions on its own, `--error-rate`). For `--duration` seconds (600 by
default) `--clients` loops send chat completions, half of them streamed; one request
in eight carries a fault hook (`x-fake-*`) for the backend that gets it. At a third
and at two thirds of the run the config's weight is edited (the proxy reloads it).

Every answer is judged against the fault it was sent with: an error that no injected
fault explains is *unexplained*, and the run fails with any. At the start (after a
warm-up) and at the end (after the load stops) the proxy's RSS and open file
descriptors are read from /proc; the run fails if either grew past its bound.

    .venv/bin/python tests/bench/soak.py [--duration 600] [--clients 16] [--out FILE]

Run on demand, not in the test suite: it takes as long as it is told to.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp
from system import Children, free_port, process_tree, rss_kib, wait_for_port

PROXY_CORE: Final = 0
LOAD_CORE: Final = 1
WARM_UP_S: Final = 5.0
SETTLE_S: Final = 3.0
RSS_GROWTH_BOUND_KIB: Final = 32 * 1024  # allocator arenas and caches settle under this
FD_GROWTH_BOUND: Final = 8  # kept-alive backend connections come and go
FAULT_SHARE: Final = 1 / 8
WEIGHTS: Final = (50, 30, 60)  # the weight at the start, after the first and second reload


@dataclass(frozen=True)
class Fault:
    """A fault hook, the requests it fits, and the answer it must get."""

    name: str
    headers: dict[str, str]
    stream: bool | None  # None: streamed or not
    expected: str  # the outcome that it explains (see `judge`)


FAULTS: Final = (
    Fault("backend 500", {"x-fake-status": "500"}, None, "status 500"),
    Fault("backend 429", {"x-fake-status": "429"}, None, "status 429"),
    Fault("reset before headers", {"x-fake-reset": "before-headers"}, None, "502"),
    Fault("reset after headers", {"x-fake-reset": "after-headers"}, None, "502"),
    Fault("not HTTP", {"x-fake-garbage": "1"}, None, "502"),
    Fault("no answer (first_byte)", {"x-fake-hang": "1"}, None, "504"),
    Fault("no first token (first_byte)", {"x-fake-ttft": "3"}, True, "504"),
    Fault("silence mid-stream (idle)", {"x-fake-tokens-per-s": "0.5"}, True, "aborted"),
    Fault("stream cut", {"x-fake-cut-after": "2"}, True, "aborted"),
    Fault("body shorter than its length", {"x-fake-cut-after": "2"}, False, "aborted"),
    Fault("stream without [DONE]", {"x-fake-no-done": "1"}, True, "aborted"),
    Fault("body longer than its length", {"x-fake-overrun": "1"}, False, "not JSON"),
    Fault("200 that is not JSON", {"x-fake-json-garbage": "1"}, False, "not JSON"),
)


@dataclass
class Tally:
    served: int = 0
    ok: int = 0
    by_cause: Counter[str] = field(default_factory=Counter)
    unexplained: Counter[str] = field(default_factory=Counter)


def write_config(path: Path, stable: str, canary: str, admin_port: int, weight: float) -> None:
    path.write_text(
        "listen: 127.0.0.1:0\n"
        f"admin: {{listen: 127.0.0.1:{admin_port}}}\n"
        "shutdown_grace: 5s\n"
        "backends:\n"
        f"  stable: {{url: '{stable}', timeouts: {{first_byte: 1s, idle: 1s}}}}\n"
        f"  canary: {{url: '{canary}', timeouts: {{first_byte: 1s, idle: 1s}}}}\n"
        "routes:\n"
        "  - name: chat\n"
        "    stable: stable\n"
        "    canary: canary\n"
        "    sticky: {keys: [header:x-user-id], salt: soak}\n"
        f"    rollout: {{weight: {weight}}}\n"
        f"state: {{path: '{path.parent / 'state.db'}'}}\n"
    )


def judge(status: int, body: bytes, aborted: bool, stream: bool) -> str:
    """What the client saw, in a few words (the `expected` of a `Fault`, or "ok")."""
    if aborted:
        return "aborted"
    if status in (500, 429) and b'"code":"injected_error"' in body:
        return "injected 500 (error rate)"
    if status != 200:
        code = json.loads(body).get("error", {}).get("code", "?") if body[:1] == b"{" else "?"
        return str(status) if code.startswith(("upstream", "?")) else f"status {status}"
    if stream:
        return "ok" if body.rstrip().endswith(b"data: [DONE]") else "stream without [DONE]"
    try:
        json.loads(body)
    except ValueError:
        return "not JSON"
    return "ok"


async def one_request(
    session: aiohttp.ClientSession, url: str, rng: random.Random, serial: int
) -> tuple[Fault | None, str]:
    fault = rng.choice(FAULTS) if rng.random() < FAULT_SHARE else None
    stream = fault.stream if fault is not None and fault.stream is not None else rng.random() < 0.5
    headers = {"x-user-id": f"user-{serial % 5000}", **(fault.headers if fault else {})}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": stream}
    try:
        async with session.post(url, json=body, headers=headers) as response:
            try:
                data = await response.read()
            except aiohttp.ClientPayloadError:
                return fault, "aborted"
            return fault, judge(response.status, data, False, stream)
    except (aiohttp.ClientConnectionError, TimeoutError) as exc:
        return fault, f"connection error ({type(exc).__name__})"


async def client(url: str, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        serial = seed * 1_000_000
        while time.monotonic() < deadline:
            serial += 1
            fault, outcome = await one_request(session, url, rng, serial)
            tally.served += 1
            if fault is None and outcome == "ok":
                tally.ok += 1
            elif outcome == "injected 500 (error rate)":
                tally.by_cause[outcome] += 1
            elif fault is not None and outcome == fault.expected:
                tally.by_cause[fault.name] += 1
            else:
                cause = fault.name if fault else "no fault"
                tally.unexplained[f"{cause}: {outcome}"] += 1


def proxy_readings(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open file descriptors) of the proxy process."""
    return rss_kib(process_tree(pid)), len(os.listdir(f"/proc/{pid}/fd"))


async def metrics_text(admin_port: int) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{admin_port}/metrics") as response,
    ):
        return (await response.read()).decode()


def reloads_of(metrics: str) -> int:
    for line in metrics.splitlines():
        if line.startswith('canary_config_reloads_total{result="success"}'):
            return int(float(line.split()[-1]))
    return 0


def upstream_errors(metrics: str) -> Counter[str]:
    """`canary_upstream_requests_total{outcome="error"}` by variant and error.type."""
    found: Counter[str] = Counter()
    for line in metrics.splitlines():
        if line.startswith("canary_upstream_requests_total{") and 'outcome="error"' in line:
            inside = line[line.index("{") + 1 : line.index("}")]
            labels = {
                name: value.strip('"')
                for name, value in (p.split("=", 1) for p in inside.split(","))
            }
            found[f"{labels['canary_variant']} {labels['error_type']}"] += int(
                float(line.split()[-1])
            )
    return found


async def soak(duration_s: float, clients: int, workdir: Path) -> tuple[str, bool]:
    with Children() as children:
        exe = str(Path(sys.executable).with_name("canary-proxy"))
        ports = {}
        for name, flags in (("stable", []), ("canary", ["--error-rate", "0.01", "--seed", "7"])):
            port = free_port()
            argv = [
                exe,
                "fake-backend",
                "--port",
                str(port),
                "--model",
                name,
                "--tokens-per-s",
                "200",
            ]
            process = children.start(argv + flags, core=LOAD_CORE, log=workdir / f"{name}.log")
            wait_for_port(port, process)
            ports[name] = port
        admin_port = free_port()
        config = workdir / "soak.yaml"
        stable, canary = (f"http://127.0.0.1:{ports[n]}" for n in ("stable", "canary"))
        write_config(config, stable, canary, admin_port, WEIGHTS[0])
        proxy = children.start(
            [exe, "run", "-c", str(config)], core=PROXY_CORE, log=workdir / "proxy.log", cwd=workdir
        )
        wait_for_port(admin_port, proxy)
        proxy_url = public_url(workdir / "proxy.log")
        url = f"{proxy_url}/v1/chat/completions"

        tally = Tally()
        started = time.monotonic()
        deadline = started + WARM_UP_S + duration_s
        load = [
            asyncio.create_task(client(url, seed, deadline, tally))
            for seed in range(1, clients + 1)
        ]
        await asyncio.sleep(WARM_UP_S)
        start_rss, start_fds = proxy_readings(proxy.pid)
        for weight in WEIGHTS[1:]:
            await asyncio.sleep(duration_s / 3)
            write_config(config, stable, canary, admin_port, weight)
            proxy.send_signal(signal.SIGHUP)
        await asyncio.gather(*load)
        await asyncio.sleep(SETTLE_S)
        end_rss, end_fds = proxy_readings(proxy.pid)
        metrics = await metrics_text(admin_port)
        elapsed = time.monotonic() - started
    passed = (
        not tally.unexplained
        and end_rss - start_rss <= RSS_GROWTH_BOUND_KIB
        and end_fds - start_fds <= FD_GROWTH_BOUND
        and reloads_of(metrics) >= 2
    )
    text = report(
        tally, elapsed, duration_s, clients, metrics, (start_rss, end_rss), (start_fds, end_fds)
    )
    return text + f"\n\nResult: {'PASS' if passed else 'FAIL'}", passed


def public_url(log: Path, timeout_s: float = 15.0) -> str:
    """The public URL the proxy's log line announces."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if "listening on http://" in line:
                return line.split("listening on ", 1)[1].split(",", 1)[0]
        time.sleep(0.1)
    raise RuntimeError(f"the proxy did not say where it listens: {log.read_text()[-500:]}")


def report(
    tally: Tally,
    elapsed_s: float,
    duration_s: float,
    clients: int,
    metrics: str,
    rss_kib_pair: tuple[int, int],
    fds_pair: tuple[int, int],
) -> str:
    (start_rss, end_rss), (start_fds, end_fds) = rss_kib_pair, fds_pair
    lines = [
        f"# Soak: {duration_s:g} s of load ({elapsed_s:.0f} s in all), {clients} clients",
        "",
        f"- requests served: {tally.served} ({tally.served / max(elapsed_s, 1):.0f}/s), "
        f"of which answered normally with no fault injected: {tally.ok}",
        f"- config reloads applied: {reloads_of(metrics)}",
        f"- proxy RSS: {start_rss / 1024:.1f} MiB after warm-up, {end_rss / 1024:.1f} MiB at the "
        f"end ({(end_rss - start_rss) / 1024:+.1f} MiB; bound +{RSS_GROWTH_BOUND_KIB // 1024} MiB)",
        f"- proxy open fds: {start_fds} after warm-up, {end_fds} at the end "
        f"({end_fds - start_fds:+d}; bound +{FD_GROWTH_BOUND})",
        f"- unexplained errors: {sum(tally.unexplained.values())}",
        "",
        "| cause (as injected) | errors seen by clients |",
        "|---|---:|",
    ]
    lines += [f"| {cause} | {count} |" for cause, count in sorted(tally.by_cause.items())]
    for cause, count in sorted(tally.unexplained.items()):
        lines.append(f"| **unexplained**: {cause} | {count} |")
    lines += ["", "| variant, error.type (proxy's /metrics) | count |", "|---|---:|"]
    lines += [f"| {key} | {count} |" for key, count in sorted(upstream_errors(metrics).items())]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (600)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (16)")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="canary-soak-") as directory:
        text, passed = asyncio.run(soak(args.duration, args.clients, Path(directory)))
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
