"""The measurements of (a), (b), (c), each driven from the load core against one running
target ((d), the reload scenario, is `reloads.py`'s; its settings are here).

(a) throughput: `wrk -t1 -c64` with `post.lua` (~1 KB JSON in, ~1 KB JSON out); the
    target's CPU time over the run divided by the requests wrk completed.
(b) latency: `wrk -t1 -c1`, one request at a time; wrk's p50 and p99.
(c) streams: `stream_client.py` (see its docstring) against a fake backend that sends
    50 tokens a second.

Each runs after a short warm-up, is bounded in time (every subprocess has a timeout),
and returns a frozen record; a load generator that fails raises `MeasurementError`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Final

from system import CoreTimes, cpu_seconds
from targets import BENCH_DIR, LOAD_CORE, Running

__all__ = [
    "FULL",
    "QUICK",
    "THROUGHPUT_CONNECTIONS",
    "Latency",
    "MeasurementError",
    "Settings",
    "Streams",
    "Throughput",
    "measure_latency",
    "measure_streams",
    "measure_throughput",
    "wrk_post",
]

THROUGHPUT_CONNECTIONS: Final = 64
_MARK: Final = "BENCH_JSON "
_SLACK_S: Final = 60.0
_LATENCY_WARMUP_S: Final = 1


class MeasurementError(RuntimeError):
    """A load generator failed or printed no result."""


@dataclass(frozen=True, slots=True)
class Settings:
    """How long and how hard each scenario runs."""

    warmup_s: int
    throughput_s: int
    latency_s: int
    streams: int
    stream_tokens: int
    stream_tokens_per_s: float
    stream_ramp_s: float
    quiet_wait_s: float  # how long to wait, at most, for other work to leave the cores
    rounds: int  # how many times the whole sequence runs; figures are medians over rounds
    reloads: int  # (d1) config rewrites timed, per round
    reload_spacing_s: float  # (d1) between two rewrites
    reload_load_s: int  # (d2) each wrk run, with and without reloads
    reload_every_s: float  # (d2) between two rewrites while wrk runs


FULL: Final = Settings(
    warmup_s=2,
    throughput_s=10,
    latency_s=5,
    streams=500,
    stream_tokens=500,
    stream_tokens_per_s=50.0,
    stream_ramp_s=1.0,
    quiet_wait_s=20.0,
    rounds=3,
    reloads=10,
    reload_spacing_s=2.5,
    reload_load_s=10,
    reload_every_s=1.0,
)
QUICK: Final = Settings(
    warmup_s=1,
    throughput_s=2,
    latency_s=1,
    streams=100,
    stream_tokens=150,
    stream_tokens_per_s=50.0,
    stream_ramp_s=0.5,
    quiet_wait_s=0.0,
    rounds=1,
    reloads=4,
    reload_spacing_s=2.5,
    reload_load_s=3,
    reload_every_s=1.0,
)


@dataclass(frozen=True, slots=True)
class Throughput:
    requests: int
    warmup_requests: int  # sent before, not measured; they count for the spans sent
    duration_s: float
    errors: int
    cpu_s: float  # the target's, over wrk's run
    core_busy: tuple[float, ...]  # each core's busy share over wrk's run, anyone's work

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / max(self.requests, 1) * 1e6


@dataclass(frozen=True, slots=True)
class Latency:
    requests: int
    warmup_requests: int
    errors: int
    p50_us: float
    p99_us: float


@dataclass(frozen=True, slots=True)
class Streams:
    streams: int
    warmup_streams: int
    completed: int
    errors: tuple[str, ...]
    ttfb_p50_ms: float
    ttfb_p99_ms: float
    window_s: float
    window_events: int
    window_reads: int
    window_cpu_s: float
    open_at_window_start: int
    open_at_window_end: int
    rss_idle_kib: int
    rss_open_kib: int
    core_busy: tuple[float, ...]

    @property
    def events_per_s(self) -> float:
        return self.window_events / max(self.window_s, 1e-9)

    @property
    def cpu_us_per_chunk(self) -> float:
        return self.window_cpu_s / max(self.window_events, 1) * 1e6

    @property
    def rss_kib_per_stream(self) -> float:
        return (self.rss_open_kib - self.rss_idle_kib) / self.streams


def _bench_json(output: str, what: str) -> dict[str, Any]:
    for line in output.splitlines():
        if line.startswith(_MARK):
            result: dict[str, Any] = json.loads(line[len(_MARK) :])
            return result
    raise MeasurementError(f"{what} printed no result; its output ends: {output[-800:]}")


def _run_on_load_core(argv: list[str], timeout_s: float, what: str) -> dict[str, Any]:
    try:
        done = subprocess.run(
            ["taskset", "-c", str(LOAD_CORE), *argv],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise MeasurementError(f"{what} did not finish within {timeout_s:g}s") from exc
    if done.returncode != 0:
        raise MeasurementError(f"{what} exited {done.returncode}: {done.stderr.strip()[-800:]}")
    return _bench_json(done.stdout, what)


def wrk_post(url: str, connections: int, duration_s: int) -> dict[str, Any]:
    """`wrk -t1 --latency -s post.lua` on the load core; the fields `post.lua` prints."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", "--timeout", "10s"]
    argv += ["-s", str(BENCH_DIR / "post.lua"), url]
    return _run_on_load_core(argv, duration_s + _SLACK_S, f"wrk -c{connections}")


def _wrk_errors(result: dict[str, Any]) -> int:
    return sum(int(count) for count in result["errors"].values())


def measure_throughput(target: Running, settings: Settings) -> Throughput:
    """Scenario (a): 64 keep-alive connections for `throughput_s` after a warm-up."""
    warmup = wrk_post(target.url, THROUGHPUT_CONNECTIONS, settings.warmup_s)
    cores_before, cpu_before = CoreTimes.now(), cpu_seconds(target.pids)
    result = wrk_post(target.url, THROUGHPUT_CONNECTIONS, settings.throughput_s)
    cpu_s = cpu_seconds(target.pids) - cpu_before
    return Throughput(
        requests=int(result["requests"]),
        warmup_requests=int(warmup["requests"]),
        duration_s=int(result["duration_us"]) / 1e6,
        errors=_wrk_errors(result),
        cpu_s=cpu_s,
        core_busy=CoreTimes.now().busy_since(cores_before),
    )


def measure_latency(target: Running, settings: Settings) -> Latency:
    """Scenario (b): one connection, one request at a time."""
    warmup = wrk_post(target.url, 1, _LATENCY_WARMUP_S)
    result = wrk_post(target.url, 1, settings.latency_s)
    return Latency(
        requests=int(result["requests"]),
        warmup_requests=int(warmup["requests"]),
        errors=_wrk_errors(result),
        p50_us=float(result["p50_us"]),
        p99_us=float(result["p99_us"]),
    )


def measure_streams(target: Running, settings: Settings) -> Streams:
    """Scenario (c): `streams` concurrent streams at the backend's token rate."""
    argv = [sys.executable, str(BENCH_DIR / "stream_client.py"), "--url", target.url]
    argv += ["--streams", str(settings.streams), "--tokens", str(settings.stream_tokens)]
    argv += ["--tokens-per-s", f"{settings.stream_tokens_per_s:g}"]
    argv += ["--ramp-s", f"{settings.stream_ramp_s:g}"]
    if target.pids:
        argv += ["--pid", str(target.pids[0])]
    stream_s = settings.stream_tokens / settings.stream_tokens_per_s
    result = _run_on_load_core(argv, 3 * stream_s + 2 * _SLACK_S, "stream_client.py")
    return Streams(
        streams=int(result["streams"]),
        warmup_streams=int(result["warmup_streams"]),
        completed=int(result["completed"]),
        errors=tuple(result["errors"]),
        ttfb_p50_ms=float(result["ttfb_p50_ms"]),
        ttfb_p99_ms=float(result["ttfb_p99_ms"]),
        window_s=float(result["window_s"]),
        window_events=int(result["window_events"]),
        window_reads=int(result["window_reads"]),
        window_cpu_s=float(result["window_cpu_s"]),
        open_at_window_start=int(result["open_at_window_start"]),
        open_at_window_end=int(result["open_at_window_end"]),
        rss_idle_kib=int(result["rss_idle_kib"]),
        rss_open_kib=int(result["rss_open_kib"]),
        core_busy=tuple(result["core_busy"]),
    )
