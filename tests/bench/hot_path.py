"""`make bench-hot`: the hot path's four figures beside nginx and the naive aiohttp proxy.

This file owns one table: CPU per non-streamed request, CPU per streamed chunk, the
latency added at one connection, and 500 paced streams (how many completed, time to
first byte p99), for nginx, the ~60-line aiohttp proxy (`baseline_proxy.py`, on
asyncio's own loop), canary-proxy as the hot-path issue measured it (one route at
weight 10, every backend setting at its default, no OTLP export), and, with
`--before TREE`, the same from another source tree, so that a change is measured
against the code before it in the same run. It reuses the scenarios of `make bench`
(`scenarios.py`: (a) throughput, (b) latency, (c) streams), the same fake backend and
load for every target, each proxy alone on core 0 (`taskset`), the backend and the
load generators on core 1.

Order, in each round: (a) and (b) for every target, each with a fresh fake backend
(no token delay) and a fresh target; then (c) for every target, again fresh, with a
backend at 50 tokens/s. Each round reverses the order of the one before. Figures are
medians over rounds; a ratio to nginx is the median of the ratios within a round.

The aims (the hot-path issue): CPU per request and per chunk at most 4× nginx's; the
latency added at one connection within 0.1 ms of nginx's; every stream completed.
The run writes its section of docs/benchmarks.md (`make bench` keeps it).

    .venv/bin/python tests/bench/hot_path.py [--quick] [--rounds N] [--before TREE]
        [--output PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import textwrap
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Final

from document import DOC, HOT_BEGIN, HOT_END, with_hot_block, write_block
from report import (
    Metric,
    Results,
    TargetResult,
    cpu_per_chunk,
    cpu_per_request,
    latency_p50,
    markdown_table,
    median_of,
    ttfb_p99,
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
    machine_info,
    output_argument,
    output_of,
    positive_int,
    run_in_workdir,
    wait_until_quiet,
)
from targets import LOAD_CORE, start_backend, start_target, use_before_tree

__all__ = ["main"]

TARGET_NAMES: Final = ("direct", "nginx", "baseline", "hot")
BEFORE: Final = "hot-before"
CPU_AIM: Final = 4.0  # CPU per request and per chunk, at most this many times nginx's
LATENCY_AIM_US: Final = 100.0  # added latency at most this much above nginx's
_DASH: Final = "—"


def _measure_requests(
    name: str, settings: Settings, workdir: Path, result: TargetResult, n: int
) -> None:
    with Children() as children:
        backend = start_backend(children, workdir, tokens_per_s=0)
        target = start_target(name, children, workdir, backend)
        wait_until_quiet(settings.quiet_wait_s)
        t = result.throughput[n] = measure_throughput(target, settings)
        lat = result.latency[n] = measure_latency(target, settings)
        cpu = "" if name == "direct" else f", {t.cpu_us_per_request:.1f} CPU µs/request"
        print(
            f"  (a, b) {result.label}: {t.requests_per_s:,.0f} req/s{cpu}, "
            f"one connection p50 {lat.p50_us:.0f} µs",
            flush=True,
        )


def _measure_streams(
    name: str, settings: Settings, workdir: Path, result: TargetResult, n: int
) -> None:
    with Children() as children:
        backend = start_backend(children, workdir, tokens_per_s=settings.stream_tokens_per_s)
        target = start_target(name, children, workdir, backend)
        wait_until_quiet(settings.quiet_wait_s)
        s = result.streams[n] = measure_streams(target, settings)
        cpu = "" if name == "direct" else f", {s.cpu_us_per_chunk:.2f} CPU µs/chunk"
        print(
            f"  (c) {result.label}: {s.completed}/{s.streams} streams completed, "
            f"TTFB p99 {s.ttfb_p99_ms:,.1f} ms{cpu}",
            flush=True,
        )


def run(names: Sequence[str], settings: Settings, workdir: Path) -> dict[str, TargetResult]:
    results = {name: TargetResult(name) for name in names}
    for n in range(1, settings.rounds + 1):
        order = list(results.values())
        if n % 2 == 0:
            order.reverse()
        for group, measure in (("(a), (b)", _measure_requests), ("(c)", _measure_streams)):
            print(f"round {n}/{settings.rounds}, {group}:", flush=True)
            for result in order:
                try:
                    measure(result.name, settings, workdir, result, n)
                except (MeasurementError, RuntimeError, OSError) as exc:
                    result.failures.append(f"round {n} {group}: {exc}")
                    print(f"  {result.label} failed: {exc}", file=sys.stderr, flush=True)
    return results


# --- the table ---------------------------------------------------------------------------


def _completed(r: TargetResult) -> dict[int, float]:
    return {n: float(s.completed) for n, s in r.streams.items()}


def _added_p50(r: TargetResult, direct: TargetResult | None) -> dict[int, float]:
    """The p50 at one connection less the direct row's of the same round (µs)."""
    floor = latency_p50(direct) if direct is not None else {}
    return {n: value - floor[n] for n, value in latency_p50(r).items() if n in floor}


def _paired(mine: dict[int, float], theirs: dict[int, float], how: str) -> list[float]:
    rounds = [n for n in sorted(mine) if n in theirs]
    if how == "ratio":
        return [mine[n] / theirs[n] for n in rounds if theirs[n] > 0]
    return [mine[n] - theirs[n] for n in rounds]


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _spread(values: Sequence[float], fmt: str) -> str:
    if len(values) < 2:
        return ""
    return f" ({min(values):{fmt}}–{max(values):{fmt}})"


def _cell(value: float | None, fmt: str, suffix: str = "") -> str:
    return _DASH if value is None else f"{value:{fmt}}{suffix}"


def _cpu_cells(result: TargetResult, nginx: TargetResult | None, metric: Metric) -> tuple[str, str]:
    own = median_of(result, metric)
    ratios = _paired(metric(result), metric(nginx), "ratio") if nginx is not None else []
    over = _DASH if not ratios or result.name == "nginx" else _cell(_median(ratios), ".2f", "×")
    return _cell(own, ",.1f"), over + ("" if over == _DASH else _spread(ratios, ".2f"))


def hot_table(results: Results, settings: Settings) -> str:
    direct, nginx = results.get("direct"), results.get("nginx")
    rows = []
    for result in results.values():
        if result.name == "direct":
            continue
        added = _added_p50(result, direct)
        above = _paired(added, _added_p50(nginx, direct), "difference") if nginx is not None else []
        completed = median_of(result, _completed)
        rows.append(
            (
                result.label,
                *_cpu_cells(result, nginx, cpu_per_request),
                *_cpu_cells(result, nginx, cpu_per_chunk),
                _cell(_median(list(added.values())), "+,.0f"),
                _DASH if result.name == "nginx" else _cell(_median(above), "+,.0f"),
                _DASH if completed is None else f"{completed:.0f} / {settings.streams}",
                _cell(median_of(result, ttfb_p99), ",.0f"),
            )
        )
    header = (
        "target",
        "CPU µs/request",
        "÷ nginx",
        "CPU µs/chunk",
        "÷ nginx",
        "added p50 µs, 1 connection",
        "− nginx's µs",
        f"{settings.streams} streams completed",
        "TTFB p99 ms",
    )
    return markdown_table(header, rows)


def aims(results: Results) -> list[str]:
    """Each canary-proxy target against the issue's aims, in words."""
    direct, nginx = results.get("direct"), results.get("nginx")
    lines = []
    for name in ("hot", BEFORE):
        result = results.get(name)
        if result is None or nginx is None:
            continue
        checks = []
        for what, metric in (("CPU/request", cpu_per_request), ("CPU/chunk", cpu_per_chunk)):
            ratio = _median(_paired(metric(result), metric(nginx), "ratio"))
            met = ratio is not None and ratio <= CPU_AIM
            checks.append(
                f"{what} ≤ {CPU_AIM:g}× nginx: {'met' if met else 'not met'} "
                f"({_cell(ratio, '.2f', '×')})"
            )
        above = _median(
            _paired(_added_p50(result, direct), _added_p50(nginx, direct), "difference")
        )
        met = above is not None and above <= LATENCY_AIM_US
        checks.append(
            f"added latency within {LATENCY_AIM_US / 1000:g} ms of nginx's: "
            f"{'met' if met else 'not met'} ({_cell(above, '+,.0f', ' µs')})"
        )
        streams = list(result.streams.values())
        every = bool(streams) and all(s.completed == s.streams for s in streams)
        checks.append(f"every stream completed: {'met' if every else 'not met'}")
        lines.append(f"{result.label}: " + "; ".join(checks) + ".")
    return lines


def _para(text: str, indent: str = "") -> str:
    """`text` as one paragraph of lines up to 88 characters."""
    return textwrap.fill(
        " ".join(text.split()),
        width=88,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )


def section(results: Results, settings: Settings, started: datetime, elapsed_s: float) -> str:
    machine = machine_info()
    direct = results.get("direct")
    direct_p50 = median_of(direct, latency_p50) if direct is not None else None
    direct_ttfb = median_of(direct, ttfb_p99) if direct is not None else None
    failures = [f"- {r.label}: {f}" for r in results.values() for f in r.failures]
    generated = (
        f"Generated by `make bench-hot` (`tests/bench/hot_path.py`) on "
        f"{started:%Y-%m-%d %H:%M %Z}; the run took {elapsed_s / 60:.1f} minutes, "
        f"{settings.rounds} round{'s' if settings.rounds != 1 else ''}. "
        "`make bench` keeps this section as it is."
    )
    method = (
        "The four figures of the hot-path issue, from one run: every target in front of the "
        "same fake backend, under the same load, the proxy alone on core 0 (`taskset -c 0`), "
        "the backend and the load generators on core 1. canary-proxy runs one route at "
        "weight 10 with every backend setting at its default (the connection pool "
        "included) and no OTLP export (its metrics are recorded all the same)"
        + (
            '; "before" is the same config run from the source tree of the code before '
            "this change, by the same Python."
            if BEFORE in results
            else "."
        )
        + f" CPU per request: (a), `wrk -t1 -c64 -d{settings.throughput_s}s -s post.lua` "
        "(~1 KB JSON in and out, no token delay), the target's utime + stime ÷ requests. "
        f"Added p50: (b), `wrk -t1 -c1 -d{settings.latency_s}s`, the target's p50 less the "
        f"backend's own ({_cell(direct_p50, ',.0f', ' µs')}) in the same round. Streams: (c), "
        f"`stream_client.py`: {settings.streams} streamed chat completions ramped over "
        f"{settings.stream_ramp_s:g} s, each {settings.stream_tokens} tokens at "
        f"{settings.stream_tokens_per_s:g} tokens/s (one SSE event each); CPU per chunk over "
        "the window with every stream open; a stream that has not ended by three times its "
        "length is not completed; TTFB from connecting to the first body byte "
        f"(direct to the backend, p99 {_cell(direct_ttfb, ',.0f', ' ms')})."
    )
    machine_line = (
        f"Machine: CPU {machine.get('CPU', '?')}, cores {machine.get('cores', '?')}, "
        f"kernel {machine.get('kernel', '?')}, Python {machine.get('Python', '?')}, "
        f"nginx {machine.get('nginx', '?')}, wrk {machine.get('wrk', '?')}; shared with "
        "other work, which moves single figures by 10-40% from minute to minute."
    )
    parts = [
        HOT_BEGIN,
        "## The hot path against nginx",
        "",
        _para(generated),
        "",
        _para(method),
        "",
        hot_table(results, settings),
        "",
        _para(
            '"÷ nginx" and "− nginx\'s" are medians of the figures paired within a round '
            "(their range in brackets); the rest are medians over rounds. Aims:"
        ),
        "",
        *(_para(f"- {line}", "  ") for line in aims(results)),
        "",
        _para(machine_line),
    ]
    if failures:
        parts += ["", "Failed measurements:", "", *failures]
    parts.append(HOT_END)
    return "\n".join(parts) + "\n"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, to check the harness")
    parser.add_argument("--rounds", type=positive_int, metavar="N", help="rounds (default 3)")
    parser.add_argument(
        "--before", type=Path, metavar="TREE", help="also run canary-proxy from this source tree"
    )
    output_argument(parser, DOC)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    settings = QUICK if args.quick else FULL
    if args.rounds is not None:
        settings = dataclasses.replace(settings, rounds=args.rounds)
    names = list(TARGET_NAMES)
    if args.before is not None:
        use_before_tree(args.before)
        names.append(BEFORE)
    os.sched_setaffinity(0, {LOAD_CORE})
    done = run_in_workdir("canary-bench-hot-", lambda workdir: run(names, settings, workdir))
    if done is None:
        return 130
    results = done.value
    text = section(results, settings, done.started, done.elapsed_s)
    print()
    print(text)
    if (output := output_of(args, DOC)) is not None:
        write_block(output, text, with_hot_block)
    return 1 if any(result.failures for result in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
