"""`make bench`: measure canary-proxy against nginx and a plain aiohttp proxy, side by side.

This file owns the run: which targets and scenarios, in which order, and where the
report goes. The pieces live beside it:
    system.py          child processes (all killed on exit), /proc readings, ports
    targets.py         starting the fake backend and each proxy, pinned to its core
    scenarios.py       (a) throughput, (b) latency, (c) 500 streams — the measurements
    reloads.py         (d) live config reload: time to serve a new weight, latency
                       during reloads (canary-proxy only)
    stream_client.py   the load generator of (c), a process of its own
    report.py          the tables: side by side, round by round, acceptance, telemetry
                       cost, core use
    document.py        docs/benchmarks.md: the method and the tables of one run
    baseline_proxy.py  the ~60-line aiohttp proxy; nginx.conf.template; post.lua (wrk)
    otlp_sink.py       the OTLP/HTTP receiver the telemetry targets export to (core 1)
    pyspy_profile.py   not part of the run: where a proxy's CPU goes under (a) or (c)
    telemetry_cost.py  not part of the run (`make bench-telemetry`): telemetry off, 1%
                       and 100% interleaved run by run, for ratios the drift cannot skew
    workers.py         not part of the run (`make bench-workers`): --workers 2 against 1,
                       and a decision's way to every worker and replica
    soak.py            not part of the run: ten minutes of traffic with injected faults

Order, in each round: scenarios (a) and (b) for every target, each with a fresh fake
backend (no token delay) and a fresh target; then (c) for every target, again fresh,
with a backend at 50 tokens/s; then (d) for canary-proxy alone (the other targets have
no config to reload), fresh again, with a backend without token delay. Rounds repeat
that sequence (3 in a full run, each target's order reversed every other round); the
report shows medians over rounds.
The runner itself stays on the load core. A telemetry target's OTLP sink is started
with it and stopped after its scenarios (once its last batch of spans is in), and
its counts go into the notes.

With `--before TREE` (a source tree of the code before a change), canary-proxy also runs
from that tree ("canary-proxy before") in the same rounds, and the acceptance table
sets the two side by side, ratio by round.

    .venv/bin/python tests/bench/run.py [--quick] [--rounds N] [--only a,b,c,d] [--targets ...]
                                        [--before TREE]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Final

from document import document
from reloads import measure_reload_latency, measure_reload_serve
from report import (
    Exported,
    TargetResult,
    acceptance_table,
    core_table,
    notes,
    reload_latency_table,
    reload_serve_table,
    reload_summary,
    results_table,
    rounds_table,
    telemetry_notes,
    telemetry_table,
)
from scenarios import (
    FULL,
    QUICK,
    MeasurementError,
    Settings,
    measure_latency,
    measure_streams,
    measure_throughput,
)
from system import (
    Children,
    install_signal_exit,
    machine_info,
    positive_int,
    wait_until_quiet,
)
from targets import (
    BEFORE_OFF,
    BENCH_DIR,
    LOAD_CORE,
    TARGETS,
    Running,
    start_backend,
    start_target,
    stop_sink,
    use_before_tree,
)

__all__ = ["main"]

DOC: Final = BENCH_DIR.parent.parent / "docs" / "benchmarks.md"
SCENARIOS: Final = ("a", "b", "c", "d")
RELOAD_TARGET: Final = "canary-proxy"  # (d) runs against this target only
_SINK_DRAIN_S: Final = 2.0  # the proxy exports its spans every second


def _choices(text: str, allowed: Sequence[str], flag: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [part for part in chosen if part not in allowed]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"{flag}: unknown {', '.join(unknown) or 'empty list'}; choose from {','.join(allowed)}"
        )
    return chosen


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, to check the harness")
    parser.add_argument(
        "--only",
        type=lambda text: _choices(text, SCENARIOS, "--only"),
        default=SCENARIOS,
        metavar="a,b,c,d",
        help="scenarios: a throughput, b latency, c streams, d config reload "
        f"({RELOAD_TARGET} only) (default all)",
    )
    parser.add_argument(
        "--targets",
        type=lambda text: _choices(text, tuple(TARGETS), "--targets"),
        default=tuple(TARGETS),
        metavar="NAMES",
        help=f"targets, comma-separated (default all: {','.join(TARGETS)})",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        metavar="N",
        help=f"run the whole sequence N times (default {FULL.rounds}, {QUICK.rounds} with --quick)",
    )
    parser.add_argument(
        "--before",
        type=Path,
        metavar="TREE",
        help="also run canary-proxy from this source tree (the code before a change)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help=f"write the report here (default: {DOC.relative_to(DOC.parents[1])} after a "
        "full run of every target and scenario; nothing after --quick, --only or --targets)",
    )
    args = parser.parse_args(argv)
    whole = (
        not args.quick and set(args.only) == set(SCENARIOS) and set(args.targets) == set(TARGETS)
    )
    if args.output is None and whole:
        args.output = DOC
    return args


def _collect_spans(
    children: Children, target: Running, requests: int, result: TargetResult, key: tuple[int, str]
) -> None:
    """Let the target's last batch of spans reach its sink, then stop the sink and keep
    its counts."""
    if target.sink is None:
        return
    time.sleep(_SINK_DRAIN_S)
    received = stop_sink(children, target.sink)
    result.exported[key] = Exported(requests, received)
    per_request = received.spans / requests if requests else 0.0
    print(f"      spans: {received.spans:,} for {requests:,} requests ({per_request:.4f} each)")


def _measure_requests(
    name: str,
    only: Sequence[str],
    settings: Settings,
    workdir: Path,
    result: TargetResult,
    round_number: int,
) -> None:
    """Scenarios (a) and (b) against a fresh target and backend."""
    with Children() as children:
        backend = start_backend(children, workdir, tokens_per_s=0)
        target = start_target(name, children, workdir, backend)
        wait_until_quiet(settings.quiet_wait_s)
        if "a" in only:
            t = result.throughput[round_number] = measure_throughput(target, settings)
            cpu = "" if name == "direct" else f", {t.cpu_us_per_request:.1f} CPU µs/request"
            print(f"  (a) {result.label}: {t.requests_per_s:,.0f} req/s{cpu}", flush=True)
        if "b" in only:
            lat = result.latency[round_number] = measure_latency(target, settings)
            print(f"  (b) {result.label}: p50 {lat.p50_us:.0f} µs, p99 {lat.p99_us:.0f} µs")
        sent = sum(
            done.warmup_requests + done.requests
            for done in (result.throughput.get(round_number), result.latency.get(round_number))
            if done is not None
        )
        _collect_spans(children, target, sent, result, (round_number, "ab"))


def _measure_streams(
    name: str, settings: Settings, workdir: Path, result: TargetResult, round_number: int
) -> None:
    """Scenario (c) against a fresh target and a backend at the stream token rate."""
    with Children() as children:
        backend = start_backend(children, workdir, tokens_per_s=settings.stream_tokens_per_s)
        target = start_target(name, children, workdir, backend)
        wait_until_quiet(settings.quiet_wait_s)
        s = result.streams[round_number] = measure_streams(target, settings)
        line = f"  (c) {result.label}: {s.completed}/{s.streams} streams"
        line += f", {s.events_per_s:,.0f} chunks/s"
        line += f", TTFB p50 {s.ttfb_p50_ms:.2f} ms p99 {s.ttfb_p99_ms:.2f} ms"
        if name != "direct":
            line += f", {s.cpu_us_per_chunk:.2f} CPU µs/chunk"
            line += f", {s.rss_kib_per_stream:.1f} KiB/stream"
        print(line, flush=True)
        sent = s.warmup_streams + s.streams
        _collect_spans(children, target, sent, result, (round_number, "c"))


def _measure_reload(settings: Settings, workdir: Path, result: TargetResult, n: int) -> None:
    """Scenario (d) against a fresh canary-proxy and backend (no token delay)."""
    with Children() as children:
        backend = start_backend(children, workdir, tokens_per_s=0)
        target = start_target(result.name, children, workdir, backend)
        wait_until_quiet(settings.quiet_wait_s)
        result.reload_serve[n] = measure_reload_serve(target, settings)
        wait_until_quiet(settings.quiet_wait_s)
        result.reload_latency[n] = measure_reload_latency(target, settings, n)
        for line in reload_summary(result, n):
            print(line, flush=True)


def _run(args: argparse.Namespace, settings: Settings, workdir: Path) -> dict[str, TargetResult]:
    results = {name: TargetResult(name) for name in TARGETS if name in args.targets}
    if args.before is not None:
        results[BEFORE_OFF] = TargetResult(BEFORE_OFF)
    groups = []
    if {"a", "b"} & set(args.only):
        groups.append("ab")
    if "c" in args.only:
        groups.append("c")
    if "d" in args.only:
        if RELOAD_TARGET in results:
            groups.append("d")
        else:
            print(f"(d) skipped: it runs against {RELOAD_TARGET} only", flush=True)
    for round_number in range(1, settings.rounds + 1):
        order = list(results.values())
        if round_number % 2 == 0:
            order.reverse()
        for group in groups:
            title = "(a), (b)" if group == "ab" else f"({group})"
            print(f"round {round_number}/{settings.rounds}, {title}:", flush=True)
            for result in order:
                try:
                    if group == "ab":
                        _measure_requests(
                            result.name, args.only, settings, workdir, result, round_number
                        )
                    elif group == "c":
                        _measure_streams(result.name, settings, workdir, result, round_number)
                    elif result.name == RELOAD_TARGET:
                        _measure_reload(settings, workdir, result, round_number)
                except (MeasurementError, RuntimeError, OSError) as exc:
                    result.failures.append(f"round {round_number} ({group}): {exc}")
                    print(f"  {result.label} failed: {exc}", file=sys.stderr, flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    settings = QUICK if args.quick else FULL
    if args.rounds is not None:
        settings = dataclasses.replace(settings, rounds=args.rounds)
    if args.before is not None:
        use_before_tree(args.before)
    install_signal_exit()
    os.sched_setaffinity(0, {LOAD_CORE})
    started = datetime.now().astimezone()
    clock = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="canary-bench-") as tmp:
            results = _run(args, settings, Path(tmp))
    except KeyboardInterrupt:
        print("\ninterrupted: every process the benchmark started has been stopped")
        return 130
    elapsed_s = time.monotonic() - clock
    print()
    if {"a", "b", "c"} & set(args.only):
        print(results_table(results))
        print()
    if settings.rounds > 1:
        print(rounds_table(results))
        print()
    measured_ac = bool({"a", "c"} & set(args.only))
    if (
        measured_ac
        and "canary-proxy" in results
        and {"baseline", "baseline-uvloop", "nginx", BEFORE_OFF} & set(results)
    ):
        print(acceptance_table(results))
        print()
    telemetry = telemetry_table(results) if measured_ac else None
    if telemetry is not None:
        print(telemetry)
        print()
    for table in (reload_serve_table(results), reload_latency_table(results)):
        if table is not None:
            print(table)
            print()
    if {"a", "b", "c"} & set(args.only):
        print(core_table(results))
        print()
    for line in notes(results, settings) + telemetry_notes(results):
        print(f"- {line}")
    print(f"\nthe run took {elapsed_s:.0f} s")
    if args.output is not None:
        text = document(
            results,
            machine=machine_info(),
            settings=settings,
            started=started,
            elapsed_s=elapsed_s,
        )
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        print(f"wrote {args.output}")
    return 1 if any(result.failures for result in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
