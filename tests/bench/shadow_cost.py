"""`make bench-shadow`: what shadowing 5% of requests costs canary-proxy, measured interleaved.

Three canary-proxy targets with one config each, differing only in what the shadow
phase does: one route with `rollout.auto.shadow` in front of one fake backend (stable
and canary both on it), its share the one that holds 5% of post.lua's users, and

  off          the rollout paused by an operator at weight 0 (no shadow traffic);
  shadow 5%    the rollout in shadow: the 5% of users below the share (by sticky
               bucket) also have their request sent to the canary in the background;
  + pair checks  the same with `shadow.checks` (agreement and output length): stable's
               answer kept as it is relayed, both answers' texts read and compared.

Every target serves all users from stable at weight 0, so what differs is the shadow
work alone. The shadow lanes are wide (`max_concurrency: 64, queue: 256`) so that
the whole share is sent (what was dropped, if anything, is reported).

The targets run side by side on core 0, the backend, wrk and this runner on core 1
(`targets.py`'s placement). Per cycle one `wrk -t1 -c64 -s post.lua` run per target
(a ~1 KB chat request from one of 1000 users, answered with ~1 KB at once), the order
rotated by one target each cycle. CPU per request = the target's utime + stime from
the start of wrk's run until `drain_s` after its end (the shadow requests of the run's
last requests finish in it; every target gets the same window) ÷ the requests wrk
completed. "÷ off" is a target's figure over the off target's in the same cycle: the
median over the cycles, and their range.

    .venv/bin/python tests/bench/shadow_cost.py [--quick] [--cycles N] [--output FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

from document import DOC, SHADOW_BEGIN, SHADOW_END, with_shadow_block, write_block
from report import markdown_table
from scenarios import THROUGHPUT_CONNECTIONS, MeasurementError, wrk_post
from system import (
    Children,
    cpu_seconds,
    free_port,
    machine_info,
    output_argument,
    output_of,
    positive_int,
    process_tree,
    run_in_workdir,
    wait_for_port,
    wait_until_quiet,
)
from targets import LOAD_CORE, PROXY_CORE, Running, start_backend

from proxy.routing.assignment import BUCKETS, bucket_of

NAMES: Final = ("off", "shadow 5%", "shadow 5% + pair checks")
_USERS: Final = 1000  # post.lua's, user-1 ... user-1000, in turn
_SALT: Final = "chat"
_SHADOW: Final = "{share: %s, duration: 24h, max_concurrency: 64, queue: 256%s}"
_PAIR_CHECKS: Final = (
    ", checks: {agreement: {min: 0.5}, output_length: {max_ratio: 2, max_share: 0.5}}"
)


@dataclass(frozen=True, slots=True)
class Settings:
    cycles: int
    run_s: int
    warmup_s: int
    drain_s: float
    quiet_wait_s: float


FULL: Final = Settings(cycles=8, run_s=4, warmup_s=2, drain_s=1.0, quiet_wait_s=20.0)
QUICK: Final = Settings(cycles=2, run_s=2, warmup_s=1, drain_s=1.0, quiet_wait_s=2.0)


@dataclass
class Target:
    name: str
    running: Running
    admin: str
    cpu_us: list[float] = field(default_factory=list)  # per cycle, per request
    requests: int = 0  # over the measured runs
    shadow: dict[str, int] = field(default_factory=dict)  # its shadow requests, by outcome


def share_of_five_percent() -> float:
    """The share whose buckets hold exactly 5% of post.lua's users: a share of buckets
    holds that share of users only on average (0.05 holds 36 of these 1000)."""
    buckets = sorted(bucket_of(_SALT, f"user-{n}") for n in range(1, _USERS + 1))
    return (buckets[_USERS // 20 - 1] + 1) / BUCKETS


def _config(directory: Path, port: int, admin_port: int, backend: str, name: str) -> Path:
    checks = _PAIR_CHECKS if name.endswith("pair checks") else ""
    shadow = _SHADOW % (f"{share_of_five_percent():g}", checks)
    config = directory / "canary.yaml"
    config.write_text(
        f"""# Written by tests/bench/shadow_cost.py: one route in shadow, one backend.
listen: 127.0.0.1:{port}
admin: {{listen: "127.0.0.1:{admin_port}"}}
backends:
  stable: {{url: "{backend}"}}
  canary: {{url: "{backend}"}}
routes:
  - name: chat
    match: {{path_prefix: /}}
    stable: stable
    canary: canary
    sticky: {{keys: ["header:x-user-id"], salt: {_SALT}}}
    rollout:
      weight: 0
      auto:
        steps: [5, 100]
        interval: 30s
        checks: {{error_rate: {{max: 0.05}}}}
        shadow: {shadow}
state: {{store: sqlite, path: "{directory / "state.db"}"}}
"""
    )
    return config


def _admin(url: str, method: str = "GET") -> dict[str, object]:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=10) as answer:
        document: dict[str, object] = json.loads(answer.read())
        return document


def _status(target: Target) -> str:
    routes = _admin(f"{target.admin}/api/status")["routes"]
    assert isinstance(routes, list)
    rollout = routes[0]["rollout"]
    return str(rollout["status"])


def _shadow_counts(target: Target) -> dict[str, int]:
    with urllib.request.urlopen(f"{target.admin}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("canary_shadow_requests_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = int(float(line.rsplit(" ", 1)[1]))
    return counts


def _start(name: str, children: Children, workdir: Path, backend: Running) -> Target:
    port, admin_port = free_port(), free_port()
    directory = Path(tempfile.mkdtemp(prefix="shadow-", dir=workdir))
    config = _config(directory, port, admin_port, backend.url, name)
    argv = [str(Path(sys.executable).with_name("canary-proxy")), "run", "-c", str(config)]
    argv += ["--log-level", "warning"]
    process = children.start(argv, core=PROXY_CORE, log=directory / "proxy.log", cwd=workdir)
    wait_for_port(port, process)
    running = Running(name, f"http://127.0.0.1:{port}", tuple(process_tree(process.pid)))
    target = Target(name, running, f"http://127.0.0.1:{admin_port}")
    if name == "off":
        _admin(f"{target.admin}/api/routes/chat/pause", "POST")
    wanted = "paused" if name == "off" else "shadow"
    if _status(target) != wanted:
        raise MeasurementError(f"{name}: the rollout is {_status(target)}, not {wanted}")
    return target


def run(settings: Settings, workdir: Path) -> list[Target]:
    with Children() as children:
        backend = start_backend(children, workdir, tokens_per_s=0)
        targets = [_start(name, children, workdir, backend) for name in NAMES]
        for target in targets:
            wrk_post(target.running.url, THROUGHPUT_CONNECTIONS, settings.warmup_s)
        wait_until_quiet(settings.quiet_wait_s)
        for cycle in range(settings.cycles):
            order = targets[cycle % len(targets) :] + targets[: cycle % len(targets)]
            for target in order:
                before = cpu_seconds(target.running.pids)
                result = wrk_post(target.running.url, THROUGHPUT_CONNECTIONS, settings.run_s)
                time.sleep(settings.drain_s)
                used = cpu_seconds(target.running.pids) - before
                requests = int(result["requests"])
                target.requests += requests
                target.cpu_us.append(used / requests * 1e6)
            figures = ", ".join(f"{t.name} {t.cpu_us[-1]:.1f} µs/req" for t in targets)
            print(f"  cycle {cycle + 1}: {figures}")
        for target in targets:
            target.shadow = _shadow_counts(target)
        return targets


def _ratio(target: Target, off: Target) -> str:
    ratios = [mine / theirs for mine, theirs in zip(target.cpu_us, off.cpu_us, strict=True)]
    return f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"


def section(
    targets: list[Target],
    settings: Settings,
    machine: dict[str, str],
    started: datetime,
    elapsed_s: float,
) -> str:
    off = targets[0]
    rows = []
    for target in targets:
        counts = target.shadow
        sent = counts.get("dispatched", 0)
        rows.append(
            [
                target.name,
                f"{statistics.median(target.cpu_us):.1f}",
                "—" if target is off else _ratio(target, off),
                "—" if target is off else f"{sent / max(target.requests, 1):.2%}",
                "—" if target is off else f"{counts.get('dropped', 0):,}",
                "—" if target is off else f"{counts.get('failed', 0):,}",
            ]
        )
    table = markdown_table(
        ["target", "CPU µs/req", "÷ off", "shadowed ÷ served", "dropped", "failed"], rows
    )
    cycles = markdown_table(
        ["cycle", *(f"{t.name} µs/req" for t in targets)],
        [[str(n + 1), *(f"{t.cpu_us[n]:.1f}" for t in targets)] for n in range(len(off.cpu_us))],
    )
    when = started.astimezone().strftime("%Y-%m-%d %H:%M %Z")
    intro = textwrap.fill(
        f"Generated by `make bench-shadow` (`tests/bench/shadow_cost.py`) on {when}; the run "
        f"took {elapsed_s / 60:.1f} minutes, {settings.cycles} cycles of one "
        f"`wrk -t1 -c{THROUGHPUT_CONNECTIONS} -d{settings.run_s}s -s post.lua` run per "
        "target. `make bench` keeps this section as it is.",
        88,
    )
    method = textwrap.fill(
        "Three canary-proxy targets side by side on core 0, one route each with "
        f"`rollout.auto.shadow: {{share: {share_of_five_percent():g}}}` (the share whose "
        "buckets hold 50 of post.lua's 1000 users: 5% of the requests; 0.05 would hold "
        "36) in front of one fake backend (stable and "
        "canary both on it, answers of ~1 KB at once), all users served by stable at "
        "weight 0: **off**, the rollout paused by an operator (no shadow traffic); "
        "**shadow 5%**, the rollout in shadow (the users below the share, by sticky "
        "bucket, also sent to the canary in the background); **+ pair checks**, the same "
        "with `shadow.checks` (stable's answer kept while relayed, both texts read and "
        "compared). The lanes are wide (`max_concurrency: 64, queue: 256`) so the whole "
        "share is sent. The order of the targets rotates by one each cycle; CPU per "
        "request is the target's utime + stime from the start of wrk's run until "
        f"{settings.drain_s:g} s after its end (the last shadow requests finish in it) ÷ "
        'the requests wrk completed; "÷ off" is the median of the ratios within a '
        'cycle, with their range. "shadowed ÷ served" is the shadow requests sent over '
        "the requests measured (the warm-ups' shadow requests are in it too).",
        88,
    )
    machine_line = ", ".join(f"{key} {value}" for key, value in machine.items())
    return (
        f"{SHADOW_BEGIN}\n## Shadow traffic cost\n\n{intro}\n\n{method}\n\n{table}\n\n"
        f"Per cycle:\n\n{cycles}\n\nMachine: {machine_line}.\n{SHADOW_END}\n"
    )


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="2 short cycles: check the harness")
    parser.add_argument("--cycles", type=positive_int, help="cycles to run (default 8)")
    output_argument(parser, DOC)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    settings = QUICK if args.quick else FULL
    if args.cycles is not None:
        settings = dataclasses.replace(settings, cycles=args.cycles)
    os.sched_setaffinity(0, {LOAD_CORE})
    done = run_in_workdir("canary-bench-shadow-", lambda workdir: run(settings, workdir))
    if done is None:
        return 130
    machine = machine_info()
    machine = {key: machine[key] for key in ("CPU", "cores", "kernel", "Python")}
    text = section(done.value, settings, machine, done.started, done.elapsed_s)
    print()
    print(text)
    if (output := output_of(args, DOC)) is not None:
        write_block(output, text, with_shadow_block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
