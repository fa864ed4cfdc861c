"""`make bench-workers`: `--workers 2` against `--workers 1`, and how fast a decision spreads.

(e1) throughput. A fresh fake backend (no token delay) and a fresh `canary-proxy run
     --workers 1`, then the same with `--workers 2` (the order alternates by round),
     each in front of its own backend: `wrk -t2 -c64 -s post.lua` (the request of
     scenario (a)) after a warm-up. req/s, and the CPU per request of the proxy's
     process tree (the supervisor and its workers; utime + stime from /proc) and of
     the backend and wrk. Nothing is pinned: this machine has two cores, and two
     workers need both, so every process (proxy, backend, wrk) runs anywhere, in both
     cases alike. The ratio that counts is workers 2 ÷ workers 1 within a round.
(e2) decision propagation. Two setups, each fresh, idle (no traffic):
     - `--workers 2` with the SQLite store;
     - three `canary-proxy run` replicas sharing a throwaway redis-server.
     The route has an automatic rollout whose judge never acts (`min_requests` out of
     reach, `interval: 1h`), so that only the operator moves it. `decisions` operator
     actions per setup and round, alternating rollback (→ 0%) and resume (→ the first
     step, 50%), each POSTed to one process's admin port (the supervisor's; replica
     0's). Each is sent at a chosen phase of the wall-clock second (the processes tick
     just after each whole second): the phases are spread evenly over the second
     across all decisions of the run. From the POST's answer, `/metrics` of every
     process is read every POLL_S (the supervisor's, with a `worker` label per worker;
     each replica's own) until every process's `canary_weight_percent` is the new
     weight: that time is "every process serves it" (the gauge is the weight the
     process routes with). Polls go on until the next decision; a process seen at
     the old weight again counts as a flip.

The runner itself is unpinned as well. The report goes into docs/benchmarks.md, between
the markers of `document.py` (`WORKERS_BEGIN`, `WORKERS_END`), after a full run.

    .venv/bin/python tests/bench/workers.py [--quick] [--rounds N] [--output FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from document import DOC, WORKERS_BEGIN, WORKERS_END, with_workers_block, write_block
from report import markdown_table
from scenarios import MeasurementError
from system import (
    Children,
    CoreTimes,
    cpu_seconds,
    free_port,
    machine_info,
    output_argument,
    output_of,
    positive_int,
    process_tree,
    run_in_workdir,
    scrub_paths,
    wait_for_port,
    wait_until_quiet,
)
from targets import BENCH_DIR, CANARY_ROUTE, CANARY_SALT, CANARY_WEIGHT

from proxy.server.controller import TICK_S

__all__ = ["main"]

POLL_S: Final = 0.02  # (e2) between two reads of every process's /metrics
REPLICAS: Final = 3
FLEET_WORKERS: Final = 2
WRK_THREADS: Final = 2
CONNECTIONS: Final = 64
STEPS: Final = (CANARY_WEIGHT, 100.0)  # the auto rollout's steps; resume goes to the first
_TICK_PHASE_S: Final = 0.05  # every process ticks this long after each whole second
_GAP_S: Final = 0.3  # (e2) at least this long between everyone serving and the next POST
_SERVE_TIMEOUT_S: Final = 10.0
_START_TIMEOUT_S: Final = 30.0
_HTTP_TIMEOUT_S: Final = 5.0
_MARK: Final = "BENCH_JSON "
_WEIGHT_LINE: Final = re.compile(r"^canary_weight_percent\{([^}]*)\} ([0-9.e+-]+)$", re.MULTILINE)
_REQUESTS_LINE: Final = re.compile(
    r"^canary_upstream_requests_total\{([^}]*)\} ([0-9.e+-]+)$", re.MULTILINE
)
_LABEL: Final = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True, slots=True)
class Settings:
    warmup_s: int
    throughput_s: int
    rounds: int
    decisions: int  # (e2) per setup and round
    quiet_wait_s: float


FULL: Final = Settings(warmup_s=2, throughput_s=10, rounds=3, decisions=8, quiet_wait_s=15.0)
QUICK: Final = Settings(warmup_s=1, throughput_s=3, rounds=1, decisions=4, quiet_wait_s=0.0)


# --- processes ---------------------------------------------------------------------------


def _all_cores() -> str:
    return ",".join(str(core) for core in sorted(os.sched_getaffinity(0)))


def _start(children: Children, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """Start `argv` on every core. `Children.start` pins to one core; the inner taskset
    widens the affinity again before the command runs (its children inherit it)."""
    return children.start(["taskset", "-c", _all_cores(), *argv], core=0, log=log)


def _canary_proxy() -> str:
    beside_python = Path(sys.executable).with_name("canary-proxy")
    return str(beside_python) if beside_python.exists() else "canary-proxy"


def _start_backend(children: Children, workdir: Path) -> tuple[str, int]:
    """A `canary-proxy fake-backend` without token delay: its URL and pid."""
    port = free_port()
    argv = [_canary_proxy(), "fake-backend", "--port", str(port), "--tokens-per-s", "0"]
    process = _start(children, argv, workdir / f"backend-{port}.log")
    wait_for_port(port, process)
    return f"http://127.0.0.1:{port}", process.pid


def _start_redis(children: Children, workdir: Path) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    directory = workdir / f"redis-{port}"
    directory.mkdir()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(directory)]
    process = _start(children, argv, workdir / f"redis-{port}.log")
    wait_for_port(port, process)
    return f"redis://127.0.0.1:{port}/0"


@dataclass(frozen=True, slots=True)
class Proxy:
    url: str
    admin_url: str
    process: subprocess.Popen[bytes]
    log: Path


def _write_config(
    directory: Path, port: int, admin_port: int, backend_url: str, state: str, auto: bool
) -> Path:
    """Scenario (a)'s config (one route, both variants on the fake backend, weight 50,
    sticky on x-user-id), with `state` and, for (e2), an auto rollout that never judges."""
    directory.mkdir(exist_ok=True)
    config = directory / f"canary-{port}.yaml"
    rollout = f"{{weight: {CANARY_WEIGHT:g}}}"
    if auto:
        steps = ", ".join(f"{step:g}" for step in STEPS)
        rollout = (
            f"{{weight: {CANARY_WEIGHT:g}, auto: {{steps: [{steps}], interval: 1h, "
            "min_requests: 1000000000, pass_intervals: 1000}}"
        )
    config.write_text(
        f"""# Written by tests/bench/workers.py.
listen: 127.0.0.1:{port}
admin: {{listen: "127.0.0.1:{admin_port}"}}
shutdown_grace: 0
backends:
  stable: {{url: "{backend_url}", max_connections: 1024}}
  canary: {{url: "{backend_url}", max_connections: 1024}}
routes:
  - name: {CANARY_ROUTE}
    match: {{path_prefix: /}}
    stable: stable
    canary: canary
    sticky: {{keys: ["header:x-user-id"], salt: {CANARY_SALT}}}
    rollout: {rollout}
state: {state}
"""
    )
    return config


def _start_proxy(
    children: Children,
    workdir: Path,
    backend_url: str,
    *,
    workers: int,
    state: str | None = None,
    auto: bool = False,
) -> Proxy:
    """A `canary-proxy run --workers N`, ready (its admin port answers /readyz 200)."""
    port, admin_port = free_port(), free_port()
    directory = workdir / f"proxy-{port}"
    if state is None:
        state = f'{{store: sqlite, path: "{directory / "canary-state.db"}"}}'
    config = _write_config(directory, port, admin_port, backend_url, state, auto)
    log = directory / "proxy.log"
    argv = [_canary_proxy(), "run", "-c", str(config), "--workers", str(workers)]
    process = _start(children, [*argv, "--log-level", "warning"], log)
    proxy = Proxy(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", process, log)
    try:
        # With workers, the supervisor's admin port opens once every worker is ready.
        wait_for_port(admin_port, process, timeout_s=_START_TIMEOUT_S)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while _get(proxy.admin_url, "/readyz")[0] != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("not ready")
            time.sleep(0.05)
    except RuntimeError as exc:
        raise RuntimeError(f"canary-proxy did not start ({exc}); its log: {_tail(log)}") from exc
    return proxy


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- HTTP --------------------------------------------------------------------------------


class _Admin:
    """One keep-alive connection to an admin port."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._connection: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str) -> tuple[int, str]:
        for attempt in (1, 2):
            if self._connection is None:
                self._connection = http.client.HTTPConnection(
                    self._host, self._port, timeout=_HTTP_TIMEOUT_S
                )
            try:
                self._connection.request(method, path, body=b"" if method == "POST" else None)
                response = self._connection.getresponse()
                return response.status, response.read().decode()
            except (OSError, http.client.HTTPException):
                self._connection.close()
                self._connection = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()


def _get(base_url: str, path: str) -> tuple[int, str]:
    admin = _Admin(base_url)
    try:
        return admin.request("GET", path)
    except (OSError, http.client.HTTPException):
        return 0, ""
    finally:
        admin.close()


def _labelled(pattern: re.Pattern[str], text: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(_LABEL.findall(labels)), float(value)) for labels, value in pattern.findall(text)]


# --- (e1) throughput ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Throughput:
    workers: int
    requests: int
    duration_s: float
    errors: int  # wrk's socket errors and non-2xx answers
    p50_us: float
    p99_us: float
    proxy_cpu_s: float
    worker_cpu_s: tuple[float, ...]  # each worker's (with --workers 2), in worker order
    worker_requests: tuple[float, ...]  # requests each worker sent to the backend
    backend_cpu_s: float
    wrk_cpu_s: float
    core_busy: tuple[float, ...]  # each core's busy share over wrk's run, anyone's work
    background_busy: tuple[float, ...]  # before the run, the proxy idle: other work

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s

    def per_request_us(self, cpu_s: float) -> float:
        return cpu_s / max(self.requests, 1) * 1e6


def _wrk(url: str, duration_s: int) -> tuple[dict[str, Any], float]:
    """`wrk -t2 -c64 --latency -s post.lua`, unpinned; its result and its CPU seconds."""
    argv = ["wrk", f"-t{WRK_THREADS}", f"-c{CONNECTIONS}", f"-d{duration_s}s", "--latency"]
    argv += ["--timeout", "10s", "-s", str(BENCH_DIR / "post.lua"), url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration_s + 60, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise MeasurementError(f"wrk did not finish within {duration_s + 60}s") from exc
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise MeasurementError(f"wrk exited {done.returncode}: {done.stderr.strip()[-800:]}")
    for line in done.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK) :]), cpu_s
    raise MeasurementError(f"wrk printed no result: {done.stdout[-800:]}")


def _worker_pids(proxy: Proxy, workers: int) -> list[int]:
    """The workers' pids, in worker order (from the supervisor's /api/status)."""
    if workers == 1:
        return [proxy.process.pid]
    code, text = _get(proxy.admin_url, "/api/status")
    if code != 200:
        raise MeasurementError(f"/api/status answered {code}")
    listed = sorted(json.loads(text)["workers"], key=lambda worker: worker["worker"])
    return [int(worker["pid"]) for worker in listed]


def _requests_by_worker(proxy: Proxy, workers: int) -> tuple[float, ...]:
    code, text = _get(proxy.admin_url, "/metrics")
    if code != 200:
        return ()
    totals = [0.0] * workers
    for labels, value in _labelled(_REQUESTS_LINE, text):
        totals[int(labels.get("worker", "0"))] += value
    return tuple(totals)


def measure_throughput(workers: int, settings: Settings, workdir: Path) -> Throughput:
    with Children() as children:
        backend_url, backend_pid = _start_backend(children, workdir)
        proxy = _start_proxy(children, workdir, backend_url, workers=workers)
        backend_pids = process_tree(backend_pid)
        pids = process_tree(proxy.process.pid)
        worker_pids = _worker_pids(proxy, workers)
        background = wait_until_quiet(settings.quiet_wait_s)
        _wrk(proxy.url, settings.warmup_s)
        requests_before = _requests_by_worker(proxy, workers)
        cores_before = CoreTimes.now()
        proxy_before, backend_before = cpu_seconds(pids), cpu_seconds(backend_pids)
        workers_before = [cpu_seconds([pid]) for pid in worker_pids]
        result, wrk_cpu_s = _wrk(proxy.url, settings.throughput_s)
        proxy_cpu_s = cpu_seconds(pids) - proxy_before
        backend_cpu_s = cpu_seconds(backend_pids) - backend_before
        worker_cpu = [
            cpu_seconds([pid]) - b for pid, b in zip(worker_pids, workers_before, strict=True)
        ]
        core_busy = CoreTimes.now().busy_since(cores_before)
        requests_after = _requests_by_worker(proxy, workers)
        if set(process_tree(proxy.process.pid)) != set(pids):
            raise MeasurementError("the proxy's processes changed during the run (a restart?)")
    served = tuple(b - a for a, b in zip(requests_before, requests_after, strict=False))
    return Throughput(
        workers=workers,
        requests=int(result["requests"]),
        duration_s=int(result["duration_us"]) / 1e6,
        errors=sum(int(count) for count in result["errors"].values()),
        p50_us=float(result["p50_us"]),
        p99_us=float(result["p99_us"]),
        proxy_cpu_s=proxy_cpu_s,
        worker_cpu_s=tuple(worker_cpu) if workers > 1 else (),
        worker_requests=served if workers > 1 else (),
        backend_cpu_s=backend_cpu_s,
        wrk_cpu_s=wrk_cpu_s,
        core_busy=core_busy,
        background_busy=background,
    )


# --- (e2) decision propagation -----------------------------------------------------------


@dataclass
class Propagation:
    setup: str
    processes: int
    post_s: list[float] = field(default_factory=list)  # the POST, sent to answered
    every_s: list[float] = field(default_factory=list)  # answered → every process serves
    after_tick_s: list[float] = field(default_factory=list)  # the tick that served it → seen
    poll_s: list[float] = field(default_factory=list)  # one read of every process's /metrics
    flips: int = 0


class _Watch:
    """Reads the served weight of every process: `(process, weight)` pairs."""

    def __init__(self, admin_urls: Sequence[str], per_worker: bool) -> None:
        self._admins = [_Admin(url) for url in admin_urls]
        self._per_worker = per_worker

    def weights(self) -> dict[str, float]:
        seen: dict[str, float] = {}
        for index, admin in enumerate(self._admins):
            code, text = admin.request("GET", "/metrics")
            if code != 200:
                raise MeasurementError(f"/metrics answered {code}")
            for labels, value in _labelled(_WEIGHT_LINE, text):
                if labels.get("canary_route") != CANARY_ROUTE:
                    continue
                name = f"worker {labels['worker']}" if self._per_worker else f"replica {index}"
                seen[name] = value
        return seen

    def close(self) -> None:
        for admin in self._admins:
            admin.close()


def _wait_for_processes(admin_url: str, processes: int) -> None:
    """Until the store lists every process (each has met it, at least once)."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        code, text = _get(admin_url, "/api/status")
        if code == 200 and len(json.loads(text).get("processes", ())) >= processes:
            return
        if time.monotonic() > deadline:
            raise MeasurementError(f"the store did not list {processes} processes: {text[-400:]}")
        time.sleep(0.1)


def _after_tick(answered_wall: float, every_s: float) -> float:
    """How long after the tick that served it every process was seen serving a decision:
    the tick's own work (its exchange with the store) plus the poll's resolution. The
    tick is the first after the answer, or, when every process served it sooner than
    that, the one already under way when the answer came."""
    to_tick = (_TICK_PHASE_S - answered_wall) % TICK_S
    return every_s - to_tick if every_s >= to_tick else every_s - to_tick + TICK_S


def _phase_wait(earliest: float, phase: float) -> None:
    """Sleep until the wall clock is past `earliest` and at `phase` of its second."""
    now = time.time()
    start = max(now, earliest)
    at = int(start) + phase
    if at < start:
        at += 1.0
    time.sleep(max(0.0, at - now))


def _decide(
    watch: _Watch,
    actor: _Admin,
    result: Propagation,
    settings: Settings,
    round_number: int,
) -> None:
    """`settings.decisions` decisions through `actor`, each timed to every process."""
    expected = {name: CANARY_WEIGHT for name in watch.weights()}
    if len(expected) != result.processes or set(expected.values()) != {CANARY_WEIGHT}:
        raise MeasurementError(f"{result.setup}: not every process serves the start: {expected}")
    next_at = time.time()
    for k in range(settings.decisions):
        action, weight = ("rollback", 0.0) if k % 2 == 0 else ("resume", STEPS[0])
        phase = ((k + (round_number - 1) / settings.rounds) / settings.decisions) % 1.0
        # Until the next POST: whoever leaves the last decision's weight flips.
        while time.time() < next_at:
            result.flips += sum(w != expected[n] for n, w in watch.weights().items())
            time.sleep(POLL_S)
        _phase_wait(next_at, phase)
        sent = time.monotonic()
        code, text = actor.request("POST", f"/api/routes/{CANARY_ROUTE}/{action}")
        answered, answered_wall = time.monotonic(), time.time()
        if code != 200:
            raise MeasurementError(f"{result.setup}: {action} answered {code}: {text[-400:]}")
        expected = dict.fromkeys(expected, weight)
        while True:
            before = time.monotonic()
            weights = watch.weights()
            after = time.monotonic()
            result.poll_s.append(after - before)
            if weights == expected:
                break
            if after - answered > _SERVE_TIMEOUT_S:
                raise MeasurementError(f"{result.setup}: {action} not served by all: {weights}")
            time.sleep(max(0.0, POLL_S - (time.monotonic() - before)))
        result.post_s.append(answered - sent)
        result.every_s.append(after - answered)
        result.after_tick_s.append(_after_tick(answered_wall, after - answered))
        next_at = time.time() + _GAP_S


def measure_propagation(
    setup: str, settings: Settings, workdir: Path, round_number: int, result: Propagation
) -> None:
    with Children() as children:
        backend_url, _ = _start_backend(children, workdir)
        if setup == "workers":
            proxy = _start_proxy(children, workdir, backend_url, workers=FLEET_WORKERS, auto=True)
            admin_urls = [proxy.admin_url]
        else:
            redis_url = _start_redis(children, workdir)
            state = f'{{store: redis, url: "{redis_url}"}}'
            replicas = [
                _start_proxy(children, workdir, backend_url, workers=1, state=state, auto=True)
                for _ in range(REPLICAS)
            ]
            admin_urls = [replica.admin_url for replica in replicas]
        _wait_for_processes(admin_urls[0], result.processes)
        time.sleep(1.2)  # a whole tick more: every process has read the stored state
        watch = _Watch(admin_urls, per_worker=setup == "workers")
        actor = _Admin(admin_urls[0])
        try:
            _decide(watch, actor, result, settings, round_number)
        finally:
            watch.close()
            actor.close()


# --- the report --------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f}"


def _percent(shares: Sequence[float]) -> str:
    return "/".join(f"{share:.0%}" for share in shares)


def _split(values: Sequence[float]) -> str:
    total = sum(values)
    return "/".join(f"{value / total:.0%}" for value in values) if total else "—"


def throughput_tables(runs: dict[int, dict[int, Throughput]]) -> tuple[str, str]:
    """The medians of each setup, and the rounds with their ratios."""
    summary = []
    for workers in (1, 2):
        done = [by[workers] for by in runs.values() if workers in by]
        if not done:
            continue

        def med(values: Sequence[float]) -> float:
            return statistics.median(values)

        summary.append(
            (
                f"`--workers {workers}`",
                f"{med([t.requests_per_s for t in done]):,.0f}",
                f"{med([t.proxy_cpu_s / t.duration_s for t in done]):.2f}",
                f"{med([t.per_request_us(t.proxy_cpu_s) for t in done]):.1f}",
                f"{med([t.per_request_us(t.backend_cpu_s) for t in done]):.1f}",
                f"{med([t.per_request_us(t.wrk_cpu_s) for t in done]):.1f}",
                f"{med([t.p50_us for t in done]) / 1e3:.2f}",
                f"{med([t.p99_us for t in done]) / 1e3:.2f}",
                str(sum(t.errors for t in done)),
            )
        )
    header: tuple[str, ...] = (
        "proxy",
        "req/s",
        "proxy cores",
        "proxy CPU µs/req",
        "backend µs/req",
        "wrk µs/req",
    )
    header += ("p50 ms", "p99 ms", "errors")
    rows = []
    ratios: list[float] = []
    cpu_ratios: list[float] = []
    for round_number, by in runs.items():
        one, two = by.get(1), by.get(2)
        if one is None or two is None:
            continue
        ratio = two.requests_per_s / one.requests_per_s
        cpu_ratio = two.per_request_us(two.proxy_cpu_s) / one.per_request_us(one.proxy_cpu_s)
        ratios.append(ratio)
        cpu_ratios.append(cpu_ratio)
        first = "1" if round_number % 2 == 1 else "2"
        rows.append(
            (
                str(round_number),
                first,
                f"{one.requests_per_s:,.0f}",
                f"{two.requests_per_s:,.0f}",
                f"{ratio:.2f}×",
                f"{one.per_request_us(one.proxy_cpu_s):.1f}",
                f"{two.per_request_us(two.proxy_cpu_s):.1f}",
                f"{cpu_ratio:.2f}×",
                f"{_split(two.worker_requests)} ({_split(two.worker_cpu_s)})",
                f"{_percent(one.core_busy)} · {_percent(two.core_busy)}",
                f"{_percent(one.background_busy)} · {_percent(two.background_busy)}",
            )
        )
    if ratios:
        rows.append(
            (
                "median",
                "",
                "",
                "",
                f"{statistics.median(ratios):.2f}×",
                "",
                "",
                f"{statistics.median(cpu_ratios):.2f}×",
                "",
                "",
                "",
            )
        )
    round_header: tuple[str, ...] = (
        "round",
        "first",
        "w1 req/s",
        "w2 req/s",
        "w2 ÷ w1",
        "w1 CPU µs/req",
    )
    round_header += ("w2 CPU µs/req", "CPU ÷", "w2 split: requests (CPU)", "cores busy w1 · w2")
    round_header += ("idle before w1 · w2",)
    return markdown_table(header, summary), markdown_table(round_header, rows)


def propagation_table(results: Sequence[Propagation]) -> str:
    rows = []
    for result in results:
        if not result.every_s:
            continue
        every = sorted(result.every_s)
        rows.append(
            (
                result.setup,
                str(len(every)),
                _ms(statistics.median(result.post_s)),
                _ms(min(every)),
                _ms(statistics.median(every)),
                _ms(statistics.quantiles(every, n=10, method="inclusive")[-1])
                if len(every) > 1
                else _ms(every[0]),
                _ms(max(every)),
                _ms(statistics.median(result.after_tick_s)),
                _ms(max(result.after_tick_s)),
                f"{statistics.median(result.poll_s) * 1e3:.1f}",
                str(result.flips),
            )
        )
    header: tuple[str, ...] = (
        "setup",
        "decisions",
        "POST ms",
        "min ms",
        "p50 ms",
        "p90 ms",
        "max ms",
    )
    header += ("after the tick p50 ms", "max ms", "one poll ms", "flips")
    return markdown_table(header, rows)


def section(
    runs: dict[int, dict[int, Throughput]],
    propagation: Sequence[Propagation],
    failures: Sequence[str],
    settings: Settings,
    machine: dict[str, str],
    started: datetime,
    elapsed_s: float,
) -> str:
    summary, rounds = throughput_tables(runs)
    ratios = [
        by[2].requests_per_s / by[1].requests_per_s for by in runs.values() if {1, 2} <= set(by)
    ]
    spread = f"{min(ratios):.2f}-{max(ratios):.2f}×" if ratios else "—"
    median_ratio = f"{statistics.median(ratios):.2f}×" if ratios else "—"
    machine_table = markdown_table(("", ""), list(machine.items()), numbers=False)
    reading = _throughput_reading(runs)
    failed = "".join(f"\n- {scrub_paths(line)}" for line in failures)
    failed = f"\n\nFailed measurements:\n{failed}" if failures else ""
    return f"""{WORKERS_BEGIN}
## Workers and the fleet

Generated by `make bench-workers` (`tests/bench/workers.py`) on {started:%Y-%m-%d %H:%M %Z};
the run took {elapsed_s / 60:.1f} minutes, {_rounds_in_words(settings.rounds)}. `make bench`
keeps this section as it is.

**(e1) Throughput, `--workers 2` against `--workers 1`.** Each run starts a fresh fake
backend (no token delay) and a fresh `canary-proxy run --workers N` with the config of
(a) (one route at weight {CANARY_WEIGHT:g}, sticky on `x-user-id`; with 2 workers the
SQLite store is opened, as it must be, and each worker publishes its stats to it every
second), then `wrk -t{WRK_THREADS} -c{CONNECTIONS} -d{settings.throughput_s}s -s post.lua`
(the request of (a), 1000 users) after a {settings.warmup_s} s warm-up; `--workers 1` and
`--workers 2` alternate which goes first by round. **Nothing is pinned**: the machine
has two cores and two workers need both, so the proxy, the fake backend and wrk all run
unpinned, in both cases alike; they compete for the same two cores, and the proxy can
gain only what the backend and wrk leave it. That is why these figures are not those of
(a) above, where the proxy has core 0 to itself. CPU per request = utime + stime of the
proxy's process tree (the supervisor and its workers) over wrk's run ÷ the requests wrk
completed; the backend's and wrk's likewise. "Proxy cores" = the proxy's CPU seconds
per second of the run: above 1 only if the two workers together used more than one core.
Medians over rounds:

{summary}
{reading}
Round by round; "w2 ÷ w1" is the ratio that counts (a pair measured a minute apart on
a shared machine): its median over rounds is {median_ratio} (spread {spread}). "w2
split" is each worker's share of the requests (and of the proxy's CPU); "cores busy"
each core's busy share during wrk's run (anyone's work); "idle before" each core's busy
share in the second before the warm-up, with the proxy idle: other people's work on
the machine.

{rounds}

**(e2) From a decision to every process serving it.** Two setups, each started fresh
and idle: `--workers {FLEET_WORKERS}` with the SQLite store (the supervisor's admin
port), and {REPLICAS} `canary-proxy run` replicas sharing a redis-server (no
persistence). The route has an automatic rollout (steps {STEPS[0]:g}, {STEPS[1]:g}) whose
judge cannot act (`min_requests` out of reach, `interval: 1h`). {settings.decisions}
operator decisions per setup and round, alternating `POST /api/routes/{CANARY_ROUTE}/rollback`
(→ 0%) and `…/resume` (→ {STEPS[0]:g}%), sent to the supervisor's admin port (it passes
them to one worker) or to replica 0's. Each POST is sent at a chosen phase of the
wall-clock second, spread evenly over the second across every decision of the run
(every process ticks just after each whole second; at one fixed phase every decision
would wait the same). From the POST's answer, `/metrics` of every process is read every
{POLL_S * 1e3:.0f} ms (the supervisor's, with a `worker` label per worker; each
replica's own) until every process's `canary_weight_percent`, the weight it routes
with, is the new one: that time, from the answer, is in "min" to "max". "POST ms" is the
decision itself (a compare-and-set in the store, then served by the process that took
it). "After the tick" is the same time less the wait from the answer to the tick that
served it (the first after the answer, at a whole second + {_TICK_PHASE_S * 1e3:.0f} ms, or
the one under way): the tick's exchange with the store (beat, publish, lease, read the
states) and applying the state, plus the poll's resolution, the {POLL_S * 1e3:.0f} ms
sleep and "one poll ms", one read of every process. Polls go on until the next POST;
"flips" counts readings back at the old weight (there should be none).

{propagation_table(propagation)}

What to expect: the process that takes the POST serves at once; every other one at its
next tick, which falls 0-1 s later (with the phases spread evenly, 0.5 s at the median),
plus the tick's own work. The aim (the fleet issue): every process within 2 s. The
processes share one machine, hence one clock; across machines, their clocks' offset
moves the ticks apart but still bounds the wait by one tick period.

The machine (shared: other work ran on it meanwhile, which "idle before" shows; ratios
within a round are the figures to trust):

{machine_table}{failed}
{WORKERS_END}
"""


def _throughput_reading(runs: dict[int, dict[int, Throughput]]) -> str:
    """Where the two cores went, from the medians; empty without both setups."""
    medians: dict[int, tuple[float, float, float]] = {}
    for workers in (1, 2):
        done = [by[workers] for by in runs.values() if workers in by]
        if not done:
            return ""
        proxy = statistics.median(t.proxy_cpu_s / t.duration_s for t in done)
        measured = statistics.median(
            (t.proxy_cpu_s + t.backend_cpu_s + t.wrk_cpu_s) / t.duration_s for t in done
        )
        busy = statistics.median(sum(t.core_busy) for t in done)
        medians[workers] = (proxy, measured, busy)
    (proxy1, measured1, busy1), (proxy2, measured2, busy2) = medians[1], medians[2]
    text = (
        f"Where the cores went: they were busy for "
        f"{busy1:.2f} and {busy2:.2f} cores' worth (one worker, two), of which the proxy, "
        f"the backend and wrk used {measured1:.2f} and {measured2:.2f} (utime + stime); "
        "the rest is the kernel's softirq time (loopback TCP, in no process's utime + "
        f"stime) and other people's work. One worker used {proxy1:.2f} of a core, two "
        f"workers {proxy2:.2f} cores together"
    )
    cores = len(os.sched_getaffinity(0))
    if busy1 >= 0.9 * cores:
        text += (
            f": the {cores} cores were nearly full with one worker already, so a second "
            "worker had no idle core to take, only a share of the backend's and wrk's. On a "
            "machine with cores to spare (the backends elsewhere, as in production) a "
            "second worker is what lets the proxy use more than one core; this machine "
            "cannot show that gain"
        )
    return "\n" + textwrap.fill(text + ".", width=88) + "\n"


def _rounds_in_words(rounds: int) -> str:
    return "one round" if rounds == 1 else f"{rounds} rounds"


# --- the run -----------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, to check the harness")
    parser.add_argument(
        "--rounds", type=positive_int, metavar="N", help="default 3, 1 with --quick"
    )
    output_argument(parser, DOC)
    return parser.parse_args(argv)


def _run(
    settings: Settings, workdir: Path
) -> tuple[dict[int, dict[int, Throughput]], list[Propagation], list[str]]:
    runs: dict[int, dict[int, Throughput]] = {}
    propagation = {
        "workers": Propagation(f"`--workers {FLEET_WORKERS}`, SQLite", FLEET_WORKERS),
        "fleet": Propagation(f"{REPLICAS} replicas, Redis", REPLICAS),
    }
    failures: list[str] = []
    for n in range(1, settings.rounds + 1):
        order = (1, 2) if n % 2 == 1 else (2, 1)
        print(f"round {n}/{settings.rounds}, (e1) throughput:", flush=True)
        for workers in order:
            try:
                t = runs.setdefault(n, {})[workers] = measure_throughput(workers, settings, workdir)
            except (MeasurementError, RuntimeError, OSError) as exc:
                failures.append(f"round {n} (e1, --workers {workers}): {exc}")
                print(f"  --workers {workers} failed: {exc}", file=sys.stderr, flush=True)
                continue
            line = f"  --workers {workers}: {t.requests_per_s:,.0f} req/s"
            line += f", {t.per_request_us(t.proxy_cpu_s):.1f} CPU µs/request"
            line += f", errors {t.errors}, cores {_percent(t.core_busy)}"
            line += f" (idle before: {_percent(t.background_busy)})"
            if t.worker_requests:
                line += f", split {_split(t.worker_requests)} (CPU {_split(t.worker_cpu_s)})"
            print(line, flush=True)
        print(f"round {n}/{settings.rounds}, (e2) propagation:", flush=True)
        setups = ("workers", "fleet") if n % 2 == 1 else ("fleet", "workers")
        for setup in setups:
            result = propagation[setup]
            done = len(result.every_s)
            try:
                measure_propagation(setup, settings, workdir, n, result)
            except (MeasurementError, RuntimeError, OSError) as exc:
                failures.append(f"round {n} (e2, {result.setup}): {exc}")
                print(f"  {result.setup} failed: {exc}", file=sys.stderr, flush=True)
                continue
            times = result.every_s[done:]
            print(
                f"  {result.setup}: every process in p50 {_ms(statistics.median(times))} ms, "
                f"max {_ms(max(times))} ms over {len(times)} decisions; flips {result.flips}",
                flush=True,
            )
    return runs, list(propagation.values()), failures


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    settings = QUICK if args.quick else FULL
    if args.rounds is not None:
        settings = dataclasses.replace(settings, rounds=args.rounds)
    done = run_in_workdir("canary-bench-workers-", lambda workdir: _run(settings, workdir))
    if done is None:
        return 130
    runs, propagation, failures = done.value
    machine = machine_info()
    machine = {key: machine[key] for key in ("CPU", "cores", "kernel", "Python", "wrk")}
    machine["redis-server"] = _redis_version()
    text = section(runs, propagation, failures, settings, machine, done.started, done.elapsed_s)
    print()
    print(text)
    if (output := output_of(args, DOC)) is not None:
        write_block(output, text, with_workers_block)
    return 1 if failures else 0


def _redis_version() -> str:
    try:
        done = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return "not found"
    match = re.search(r"v=(\S+)", done.stdout)
    return match.group(1) if match else "unknown"


if __name__ == "__main__":
    sys.exit(main())
