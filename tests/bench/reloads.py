"""Scenario (d): live config reload, against canary-proxy only (it watches its file).

(d1) time to serve a new weight. The proxy is idle but for one client on the load
     core (this process) that sends requests one at a time, over and over, for a fixed
     set of `USERS` user ids (`x-user-id`) chosen so that every one of them is stable at
     weight 10 and canary at weight 60 (the SPEC §4 formula, computed here with mmh3).
     The config file's weight is rewritten in place, alternating 10 ↔ 60, `reloads`
     times (after one unmeasured rewrite from the start weight to 10),
     `reload_spacing_s` + POLL_S / `reloads` apart: the stagger spreads the writes
     evenly over the phases of the proxy's stat poll. For each rewrite: the time from
     just before the write until the end of the first full pass over the users in which
     every response's `x-canary-variant` is the new weight's, and until the first
     response at the new weight. Passes after that must all stay at the new weight
     ("flips" counts those that did not).
(d2) latency during reloads: `wrk -t1 -c8 --latency` with `post.lua` for
     `reload_load_s`, once with the file left alone and once while a thread rewrites
     the weight (10 ↔ 60) every `reload_every_s`; the order of the two alternates by
     round. wrk's p50 and p99, its non-2xx count and socket errors, and the proxy's CPU
     per request for each. The quiet run is at the start weight: after (d1) and after
     the reloading run the weight goes back to it, and the proxy is waited for.

Both count the reloads the proxy applied and refused (`canary_config_reloads_total` on
its admin port) against the rewrites made.
"""

from __future__ import annotations

import http.client
import json
import re
import statistics
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import mmh3
from scenarios import MeasurementError, Settings, wrk_post
from system import CoreTimes, cpu_seconds
from targets import CANARY_SALT, CANARY_WEIGHT, Running, rewrite_weight

from proxy.server.reload import POLL_S

__all__ = [
    "RELOAD_CONNECTIONS",
    "USERS",
    "WEIGHTS",
    "ReloadLatency",
    "ReloadServe",
    "WrkRun",
    "measure_reload_latency",
    "measure_reload_serve",
    "reload_users",
]

WEIGHTS: Final = (10.0, 60.0)
USERS: Final = 50
RELOAD_CONNECTIONS: Final = 8
_BUCKETS: Final = 10_000
_SERVE_TIMEOUT_S: Final = 10.0  # a rewrite not served by then fails the measurement
_APPLIED_TIMEOUT_S: Final = 5.0
_REQUEST_TIMEOUT_S: Final = 5.0
_PATH: Final = "/v1/chat/completions"
_BODY: Final = json.dumps(
    {"model": "fake-model", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
).encode()
_RELOADS_LINE: Final = re.compile(
    r'^canary_config_reloads_total\{result="(success|failure)"\} ([0-9.e+]+)$', re.MULTILINE
)


def _threshold(weight: float) -> int:
    return round(weight * 100)


def _canary(salt: str, user: str, weight: float) -> bool:
    bucket = int(mmh3.hash(f"{salt}:{user}", 0, signed=False)) % _BUCKETS
    return bucket < _threshold(weight)


def reload_users(salt: str = CANARY_SALT, count: int = USERS) -> tuple[str, ...]:
    """The first `count` user ids that are stable at WEIGHTS[0] and canary at WEIGHTS[1]."""
    low, high = WEIGHTS
    found: list[str] = []
    n = 0
    while len(found) < count:
        n += 1
        user = f"reload-user-{n}"
        if not _canary(salt, user, low) and _canary(salt, user, high):
            found.append(user)
    return tuple(found)


def _expected(users: tuple[str, ...], weight: float) -> tuple[str, ...]:
    return tuple("canary" if _canary(CANARY_SALT, user, weight) else "stable" for user in users)


# --- the proxy's own count of reloads ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ReloadCount:
    applied: int
    failed: int


def _reload_count(target: Running) -> _ReloadCount:
    """`canary_config_reloads_total` from the target's admin port."""
    if target.admin_url is None:
        raise MeasurementError(f"{target.name} has no admin port to count its reloads")
    try:
        with urllib.request.urlopen(f"{target.admin_url}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError as exc:
        raise MeasurementError(f"{target.admin_url}/metrics: {exc}") from exc
    counts = {result: int(float(value)) for result, value in _RELOADS_LINE.findall(text)}
    return _ReloadCount(counts.get("success", 0), counts.get("failure", 0))


def _since(target: Running, before: _ReloadCount) -> _ReloadCount:
    now = _reload_count(target)
    return _ReloadCount(now.applied - before.applied, now.failed - before.failed)


def _wait_applied(target: Running, before: _ReloadCount, applied: int) -> _ReloadCount:
    """Wait (a little) until the proxy has applied `applied` reloads since `before`."""
    deadline = time.monotonic() + _APPLIED_TIMEOUT_S
    while True:
        done = _since(target, before)
        if done.applied + done.failed >= applied or time.monotonic() > deadline:
            return done
        time.sleep(0.1)


# --- (d1) time to serve a new weight -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReloadServe:
    """(d1), one round: one entry per timed rewrite, in ms from just before the write."""

    served_ms: tuple[float, ...]  # until the end of the first full pass at the new weight
    first_ms: tuple[float, ...]  # until the first response at the new weight
    pass_ms: float  # the median time one pass over the users took
    users: int
    requests: int
    errors: int  # requests that failed or were not answered 200
    flips: int  # passes after the switch not wholly at the new weight (should be 0)
    rewrites: int  # every rewrite, the unmeasured first one included
    applied: int  # reloads the proxy applied meanwhile (should equal rewrites)
    failed: int  # reloads it refused (should be 0)
    duration_s: float
    cpu_s: float  # the target's, over the whole of (d1)
    core_busy: tuple[float, ...]  # each core's busy share over (d1), anyone's work


class _Poller:
    """One keep-alive connection; asks for every user in turn and notes the variants."""

    def __init__(self, url: str, users: tuple[str, ...]) -> None:
        parts = urlsplit(url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self.users = users
        self._connection: http.client.HTTPConnection | None = None
        self.requests = 0
        self.errors = 0

    def one(self, user: str) -> str | None:
        """The variant that served `user`, None when the request failed."""
        self.requests += 1
        try:
            if self._connection is None:
                self._connection = http.client.HTTPConnection(
                    self._host, self._port, timeout=_REQUEST_TIMEOUT_S
                )
            self._connection.request(
                "POST",
                _PATH,
                _BODY,
                {"content-type": "application/json", "x-user-id": user},
            )
            response = self._connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            self.errors += 1
            self.close()
            return None
        if response.status != 200:
            self.errors += 1
            return None
        return response.getheader("x-canary-variant")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _serve_one(
    poller: _Poller, config: Path, weight: float, until: float
) -> tuple[float, float, int, list[float]]:
    """Rewrite to `weight`, then poll until one whole pass is at the new weight and
    `until` (a `perf_counter` time) has come, ending mid-pass then. Returns (ms to that
    pass's end, ms to the first response at the new weight, flips, each whole pass's
    duration in ms)."""
    users = poller.users
    expected = _expected(users, weight)
    served_s: float | None = None
    first_s: float | None = None
    flips = 0
    passes: list[float] = []
    written = time.perf_counter()
    rewrite_weight(config, weight)
    while True:
        started = time.perf_counter()
        seen: list[str | None] = []
        for user, want in zip(users, expected, strict=True):
            if served_s is not None and time.perf_counter() >= until:
                return served_s * 1e3, (first_s or served_s) * 1e3, flips, passes
            variant = poller.one(user)
            seen.append(variant)
            if first_s is None and variant == want:
                first_s = time.perf_counter() - written
        now = time.perf_counter()
        passes.append((now - started) * 1e3)
        whole = tuple(seen) == expected
        if served_s is None and whole:
            served_s = now - written
        elif served_s is not None and not whole:
            flips += 1
        if served_s is None and now - written > _SERVE_TIMEOUT_S:
            raise MeasurementError(
                f"weight {weight:g} was not served within {_SERVE_TIMEOUT_S:g} s of the "
                f"rewrite; the last pass saw {seen}"
            )


def _restore(target: Running) -> None:
    """Put the start weight back (from another) and wait until the proxy serves it."""
    assert target.config is not None
    before = _reload_count(target)
    rewrite_weight(target.config, CANARY_WEIGHT)
    done = _wait_applied(target, before, 1)
    if done.applied != 1:
        raise MeasurementError(
            f"restoring weight {CANARY_WEIGHT:g}: {done.applied} reloads applied, "
            f"{done.failed} refused"
        )


def measure_reload_serve(target: Running, settings: Settings) -> ReloadServe:
    """(d1): `settings.reloads` timed rewrites, `settings.reload_spacing_s` apart plus a
    stagger of POLL_S / reloads each, so that the writes fall at phases of the proxy's
    stat poll spread evenly over its period (at exactly 2.5 s, a multiple of 0.5 s,
    every write would meet the poll at the same phase and time the same)."""
    if target.config is None:
        raise MeasurementError(f"{target.name} has no config file to rewrite")
    users = reload_users()
    poller = _Poller(target.url, users)
    before = _reload_count(target)
    served: list[float] = []
    first: list[float] = []
    passes: list[float] = []
    flips = 0
    step_s = settings.reload_spacing_s + POLL_S / settings.reloads
    cores_before, cpu_before = CoreTimes.now(), cpu_seconds(target.pids)
    start = time.perf_counter()
    try:
        # The first rewrite moves from the start weight to WEIGHTS[0], unmeasured.
        for n in range(settings.reloads + 1):
            weight = WEIGHTS[n % 2]
            served_ms, first_ms, flipped, timed = _serve_one(
                poller, target.config, weight, start + (n + 1) * step_s
            )
            passes += timed
            if n > 0:
                served.append(served_ms)
                first.append(first_ms)
                flips += flipped
    finally:
        poller.close()
    duration_s = time.perf_counter() - start
    cpu_s = cpu_seconds(target.pids) - cpu_before
    core_busy = CoreTimes.now().busy_since(cores_before)
    rewrites = settings.reloads + 1
    done = _wait_applied(target, before, rewrites)
    _restore(target)
    return ReloadServe(
        served_ms=tuple(served),
        first_ms=tuple(first),
        pass_ms=statistics.median(passes),
        users=len(users),
        requests=poller.requests,
        errors=poller.errors,
        flips=flips,
        rewrites=rewrites,
        applied=done.applied,
        failed=done.failed,
        duration_s=duration_s,
        cpu_s=cpu_s,
        core_busy=core_busy,
    )


# --- (d2) latency with and without reloads -----------------------------------------------


@dataclass(frozen=True, slots=True)
class WrkRun:
    """One wrk run of (d2)."""

    requests: int
    duration_s: float
    p50_us: float
    p99_us: float
    non_2xx: int  # wrk's "Non-2xx or 3xx responses"
    socket_errors: int  # connect, read, write, timeout
    cpu_s: float  # the target's, over wrk's run
    core_busy: tuple[float, ...]  # each core's busy share over wrk's run, anyone's work

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / max(self.requests, 1) * 1e6


@dataclass(frozen=True, slots=True)
class ReloadLatency:
    """(d2), one round."""

    quiet: WrkRun  # the file left alone
    reloading: WrkRun  # rewritten every `reload_every_s`
    reloading_first: bool  # which of the two ran first
    warmup_requests: int
    rewrites: int  # during the reloading run (the restore after it not counted)
    applied: int  # reloads the proxy applied during and just after that run
    failed: int


def _wrk_run(target: Running, duration_s: int) -> WrkRun:
    cores_before, cpu_before = CoreTimes.now(), cpu_seconds(target.pids)
    result: dict[str, Any] = wrk_post(target.url, RELOAD_CONNECTIONS, duration_s)
    cpu_s = cpu_seconds(target.pids) - cpu_before
    core_busy = CoreTimes.now().busy_since(cores_before)
    errors = result["errors"]
    return WrkRun(
        requests=int(result["requests"]),
        duration_s=int(result["duration_us"]) / 1e6,
        p50_us=float(result["p50_us"]),
        p99_us=float(result["p99_us"]),
        non_2xx=int(errors["status"]),
        socket_errors=sum(int(errors[kind]) for kind in ("connect", "read", "write", "timeout")),
        cpu_s=cpu_s,
        core_busy=core_busy,
    )


class _Rewriter(threading.Thread):
    """Rewrites the weight (WEIGHTS alternately) every `every_s`, the first after half
    of that, until stopped."""

    def __init__(self, target: Running, every_s: float) -> None:
        super().__init__(name="config rewriter", daemon=True)
        assert target.config is not None
        self._config = target.config
        self._every_s = every_s
        self._stopping = threading.Event()
        self.rewrites = 0
        self.error: Exception | None = None

    def run(self) -> None:
        wait_s = self._every_s / 2
        while not self._stopping.wait(wait_s):
            try:
                rewrite_weight(self._config, WEIGHTS[self.rewrites % 2])
            except (OSError, RuntimeError) as exc:
                self.error = exc
                return
            self.rewrites += 1
            wait_s = self._every_s

    def stop(self) -> None:
        self._stopping.set()
        self.join()


def measure_reload_latency(target: Running, settings: Settings, round_number: int) -> ReloadLatency:
    """(d2): wrk with and without a rewrite every `settings.reload_every_s`."""
    if target.config is None:
        raise MeasurementError(f"{target.name} has no config file to rewrite")
    warmup = wrk_post(target.url, RELOAD_CONNECTIONS, settings.warmup_s)
    reloading_first = round_number % 2 == 0
    runs: dict[bool, WrkRun] = {}
    rewrites = 0
    done = _ReloadCount(0, 0)
    for reloading in (reloading_first, not reloading_first):
        if not reloading:
            runs[False] = _wrk_run(target, settings.reload_load_s)
            continue
        before = _reload_count(target)
        rewriter = _Rewriter(target, settings.reload_every_s)
        rewriter.start()
        try:
            runs[True] = _wrk_run(target, settings.reload_load_s)
        finally:
            rewriter.stop()
        if rewriter.error is not None:
            raise MeasurementError(f"rewriting the config failed: {rewriter.error}")
        rewrites = rewriter.rewrites
        done = _wait_applied(target, before, rewrites)
        if rewrites:
            _restore(target)  # the start weight again (both variants) for the other run
    return ReloadLatency(
        quiet=runs[False],
        reloading=runs[True],
        reloading_first=reloading_first,
        warmup_requests=int(warmup["requests"]),
        rewrites=rewrites,
        applied=done.applied,
        failed=done.failed,
    )
