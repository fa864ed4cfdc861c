"""`make bench-telemetry`: what telemetry costs canary-proxy, measured interleaved.

With `--before TREE` (a source tree of the code before a change), the two telemetry
targets also run from that tree, in the same round-robin, and the report sets new
against old ("÷ before").

`run.py` measures each target for 10 s, minutes apart from the others; on a shared
machine whose speed drifts by 20-40% over minutes, the ratio of two such figures is
mostly drift. This file owns the other way: the three canary-proxy targets of
`targets.py` — telemetry off, traces 1%, traces 100% (each telemetry target with its
own OTLP sink) — run side by side, and short measured runs go to one after another
in round-robin, so that each "on ÷ off" ratio compares runs seconds apart.

Two phases, each with its own fake backend and three fresh targets (the targets are
restarted between the phases, as `run.py` restarts them for (c)):
  requests  a backend without token delay; one `wrk -t1 -c64 -s post.lua` warm-up per
            target, then `cycles` cycles of one `run_s` wrk run per target. CPU per
            request = the target's utime + stime from the start of wrk's run until
            `drain_s` after its end (the exporter's last batch of the run goes out in
            that second; every target gets the same window) ÷ the requests wrk
            completed.
  streams   a backend at 50 tokens/s; one warm-up `stream_client.py` run per target,
            then `cycles` cycles of one run per target (`streams` streams of
            `stream_tokens` tokens). CPU per chunk = `stream_client.py`'s own figure:
            the target's CPU over the steady window (every stream open) ÷ the SSE
            events received in it, as in (c). Because no stream starts or ends in that
            window, its spans are not in it: the CPU of the whole run (launch to
            `drain_s` after the last stream) per stream is kept as well.
In each cycle the order is off → 1% → 100%, rotated by one target per cycle, so each
target goes first equally often. A ratio is taken within a cycle (the target's run
over the off run of the same cycle); the figure is the median over cycles, with the
range.

Placement is `targets.py`'s: every proxy on core 0, the backend, the sinks, wrk,
`stream_client.py` and this runner on core 1. The two idle proxies share core 0 with
the loaded one; their CPU over each run is measured and reported (it should be near
nothing: metrics every 10 s, the exporter's timer). At the end of each phase, the
sinks are stopped and their span counts set against what was sent (2 spans, server
and client, per traced request). After a full run the section goes into
docs/benchmarks.md between `document.py`'s `TELEMETRY_BEGIN` and `TELEMETRY_END`.

    .venv/bin/python tests/bench/telemetry_cost.py [--quick] [--cycles N] [--output FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

import scenarios
from document import DOC, TELEMETRY_BEGIN, TELEMETRY_END, with_telemetry_block, write_block
from otlp_sink import SinkCounts
from report import BEFORE_AIM, TELEMETRY_AIMS, markdown_table
from scenarios import THROUGHPUT_CONNECTIONS, MeasurementError, measure_streams, wrk_post
from stream_client import SETTLE_S, TAIL_S
from system import (
    Children,
    cpu_seconds,
    machine_info,
    output_argument,
    output_of,
    positive_int,
    process_tree,
    run_in_workdir,
    scrub_paths,
    wait_until_quiet,
)
from targets import (
    BEFORE_LABELS,
    BEFORE_RATIOS,
    LOAD_CORE,
    TARGETS,
    TELEMETRY_RATIOS,
    Running,
    start_backend,
    start_target,
    stop_sink,
    use_before_tree,
)

__all__ = ["main"]

OFF: Final = "canary-proxy"
# The round-robin order, before rotation; `--before` adds BEFORE_RATIOS' targets.
NAMES: list[str] = [OFF, *TELEMETRY_RATIOS]
SHORT: Final = {
    OFF: "off",
    **{name: f"{r:.0%}" for name, r in TELEMETRY_RATIOS.items()},
    **{name: f"b{r:.0%}" for name, r in BEFORE_RATIOS.items()},
}
LABELS: Final = {**TARGETS, **BEFORE_LABELS}
# Each telemetry target's counterpart in the code before (`--before`).
BEFORE_OF: Final = dict(zip(TELEMETRY_RATIOS, BEFORE_RATIOS, strict=True))
SPANS_PER_TRACE: Final = 2  # a server span, and a client span for its one backend attempt


@dataclass(frozen=True, slots=True)
class Settings:
    cycles: int
    warmup_s: int  # the one wrk warm-up per target
    run_s: int  # each measured wrk run
    streams: int
    stream_tokens: int
    stream_tokens_per_s: float
    stream_ramp_s: float
    drain_s: float  # after each run, inside its CPU window: the exporter sends every 1 s
    quiet_wait_s: float


FULL: Final = Settings(
    cycles=8,
    warmup_s=2,
    run_s=3,
    streams=200,
    stream_tokens=300,
    stream_tokens_per_s=50.0,
    stream_ramp_s=1.0,
    drain_s=1.5,
    quiet_wait_s=20.0,
)
QUICK: Final = Settings(
    cycles=2,
    warmup_s=1,
    run_s=2,
    streams=100,
    stream_tokens=200,
    stream_tokens_per_s=50.0,
    stream_ramp_s=0.5,
    drain_s=1.5,
    quiet_wait_s=0.0,
)


@dataclass(frozen=True, slots=True)
class Run:
    """One measured run of one target."""

    units: int  # requests wrk completed; SSE events in the steady window
    cpu_s: float  # the target's, over the window that `units` were counted in
    errors: int
    window_s: float  # the window in which the idle targets were measured
    idle_cpu_s: dict[str, float]  # each idle target's CPU over `window_s`
    whole_cpu_s: float = 0.0  # streams: the target's over the whole run, drain included
    whole_streams: int = 0  # streams: the measured streams, for `whole_cpu_s`

    @property
    def per_unit_us(self) -> float:
        return self.cpu_s / max(self.units, 1) * 1e6

    @property
    def per_stream_us(self) -> float:
        return self.whole_cpu_s / max(self.whole_streams, 1) * 1e6


@dataclass
class Phase:
    """The runs of one phase ("requests" or "streams"), by cycle and target."""

    name: str
    runs: dict[int, dict[str, Run]] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)  # requests or streams, warm-ups included
    received: dict[str, SinkCounts] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def ratios(self, name: str, per_stream: bool = False, over: str = OFF) -> list[float]:
        """`name`'s figure over `over`'s run (off), per cycle where both were measured."""
        found = []
        for by in self.runs.values():
            on, off = by.get(name), by.get(over)
            if on is None or off is None:
                continue
            if per_stream:
                found.append(on.per_stream_us / off.per_stream_us)
            else:
                found.append(on.per_unit_us / off.per_unit_us)
        return found


# --- the runs ----------------------------------------------------------------------------


def _order(cycle: int) -> tuple[str, ...]:
    shift = (cycle - 1) % len(NAMES)
    return (*NAMES[shift:], *NAMES[:shift])


def _cpu(targets: dict[str, Running]) -> dict[str, float]:
    return {name: cpu_seconds(target.pids) for name, target in targets.items()}


def _request_run(name: str, targets: dict[str, Running], settings: Settings) -> Run:
    started, before = time.monotonic(), _cpu(targets)
    result = wrk_post(targets[name].url, THROUGHPUT_CONNECTIONS, settings.run_s)
    time.sleep(settings.drain_s)
    after, window_s = _cpu(targets), time.monotonic() - started
    return Run(
        units=int(result["requests"]),
        cpu_s=after[name] - before[name],
        errors=sum(int(count) for count in result["errors"].values()),
        window_s=window_s,
        idle_cpu_s={other: after[other] - before[other] for other in targets if other != name},
    )


def _stream_settings(settings: Settings, tokens: int) -> scenarios.Settings:
    return dataclasses.replace(
        scenarios.FULL,
        streams=settings.streams,
        stream_tokens=tokens,
        stream_tokens_per_s=settings.stream_tokens_per_s,
        stream_ramp_s=settings.stream_ramp_s,
    )


def _warmup_tokens(settings: Settings) -> int:
    """The shortest streams `stream_client.py` accepts (a steady window of 0.5 s)."""
    shortest_s = settings.stream_ramp_s + SETTLE_S + TAIL_S + 0.6
    return int(shortest_s * settings.stream_tokens_per_s) + 1


def _stream_run(name: str, targets: dict[str, Running], settings: Settings) -> tuple[Run, int]:
    """One measured stream run; and the streams it sent, its own warm-up included."""
    started, before = time.monotonic(), _cpu(targets)
    s = measure_streams(targets[name], _stream_settings(settings, settings.stream_tokens))
    time.sleep(settings.drain_s)
    after, window_s = _cpu(targets), time.monotonic() - started
    run = Run(
        units=s.window_events,
        cpu_s=s.window_cpu_s,
        errors=s.streams - s.completed,
        window_s=window_s,
        idle_cpu_s={other: after[other] - before[other] for other in targets if other != name},
        whole_cpu_s=after[name] - before[name],
        whole_streams=s.streams,
    )
    return run, s.warmup_streams + s.streams


def _start_all(children: Children, workdir: Path, tokens_per_s: float) -> dict[str, Running]:
    backend = start_backend(children, workdir, tokens_per_s=tokens_per_s)
    return {name: start_target(name, children, workdir, backend) for name in NAMES}


def _collect_spans(
    children: Children, targets: dict[str, Running], phase: Phase, settings: Settings
) -> None:
    """Check no target restarted; let the last spans reach the sinks; stop them."""
    for name, target in targets.items():
        if set(process_tree(target.pids[0])) != set(target.pids):
            phase.failures.append(f"{phase.name}: {LABELS[name]}'s processes changed")
    time.sleep(settings.drain_s)
    for name, target in targets.items():
        if target.sink is not None:
            phase.received[name] = stop_sink(children, target.sink)


def _line(phase: Phase, cycle: int, name: str, run: Run) -> str:
    unit = "request" if phase.name == "requests" else "chunk"
    text = f"    {SHORT[name]:>4}: {run.per_unit_us:7.2f} CPU µs/{unit} over {run.units:,}"
    if run.whole_streams:
        text += f", {run.per_stream_us / 1e3:.2f} CPU ms/stream (whole run)"
    idle = ", ".join(f"{SHORT[o]} {cpu * 1e3:.0f} ms" for o, cpu in run.idle_cpu_s.items())
    text += f"; idle targets' CPU {idle} over {run.window_s:.1f} s"
    if run.errors:
        text += f"; {run.errors} errors"
    off = phase.runs.get(cycle, {}).get(OFF)
    if name != OFF and off is not None:
        text += f"; ÷ off {run.per_unit_us / off.per_unit_us:.2f}×"
    return text


def run_requests(settings: Settings, workdir: Path) -> Phase:
    phase = Phase("requests")
    with Children() as children:
        targets = _start_all(children, workdir, tokens_per_s=0)
        wait_until_quiet(settings.quiet_wait_s)
        print("requests: warm-up", flush=True)
        for name in NAMES:
            warmup = wrk_post(targets[name].url, THROUGHPUT_CONNECTIONS, settings.warmup_s)
            phase.sent[name] = int(warmup["requests"])
        for cycle in range(1, settings.cycles + 1):
            order = _order(cycle)
            print(f"requests, cycle {cycle}/{settings.cycles}:", flush=True)
            for name in order:
                try:
                    run = _request_run(name, targets, settings)
                except (MeasurementError, RuntimeError, OSError) as exc:
                    phase.failures.append(f"requests, cycle {cycle}, {SHORT[name]}: {exc}")
                    print(f"    {SHORT[name]} failed: {exc}", file=sys.stderr, flush=True)
                    continue
                phase.sent[name] += run.units
                phase.runs.setdefault(cycle, {})[name] = run
                print(_line(phase, cycle, name, run), flush=True)
        _collect_spans(children, targets, phase, settings)
    return phase


def run_streams(settings: Settings, workdir: Path) -> Phase:
    phase = Phase("streams")
    with Children() as children:
        targets = _start_all(children, workdir, tokens_per_s=settings.stream_tokens_per_s)
        wait_until_quiet(settings.quiet_wait_s)
        print("streams: warm-up", flush=True)
        warmup_settings = _stream_settings(settings, _warmup_tokens(settings))
        for name in NAMES:
            s = measure_streams(targets[name], warmup_settings)
            phase.sent[name] = s.warmup_streams + s.streams
        for cycle in range(1, settings.cycles + 1):
            order = _order(cycle)
            print(f"streams, cycle {cycle}/{settings.cycles}:", flush=True)
            for name in order:
                try:
                    run, sent = _stream_run(name, targets, settings)
                except (MeasurementError, RuntimeError, OSError) as exc:
                    phase.failures.append(f"streams, cycle {cycle}, {SHORT[name]}: {exc}")
                    print(f"    {SHORT[name]} failed: {exc}", file=sys.stderr, flush=True)
                    continue
                phase.sent[name] += sent
                phase.runs.setdefault(cycle, {})[name] = run
                print(_line(phase, cycle, name, run), flush=True)
        _collect_spans(children, targets, phase, settings)
    return phase


# --- the report --------------------------------------------------------------------------


def _spread(ratios: Sequence[float]) -> str:
    if not ratios:
        return "—"
    median = f"{statistics.median(ratios):.2f}×"
    return median if len(ratios) == 1 else f"{median} ({min(ratios):.2f}–{max(ratios):.2f})"


def _median_us(phase: Phase, name: str, digits: int) -> str:
    values = [by[name].per_unit_us for by in phase.runs.values() if name in by]
    return f"{statistics.median(values):.{digits}f}" if values else "—"


def _verdict(checks: Sequence[tuple[str, list[float]]], aim: float) -> str:
    """Yes when every figure's median is within the aim; says how many cycles were not."""
    over = [what for what, ratios in checks if ratios and statistics.median(ratios) > aim]
    if not any(ratios for _, ratios in checks):
        return "not measured"
    if over:
        return "no: " + ", ".join(over)
    stray = [
        f"{what} {sum(r > aim for r in ratios)}/{len(ratios)} cycles over"
        for what, ratios in checks
        if any(r > aim for r in ratios)
    ]
    return "yes" + (f" ({'; '.join(stray)})" if stray else ", every cycle")


def summary_table(requests: Phase, streams: Phase) -> str:
    before = any(name in NAMES for name in BEFORE_RATIOS)
    header: tuple[str, ...] = ("telemetry", "CPU µs/req", "÷ off", "CPU µs/chunk", "÷ off")
    header += ("CPU/stream, whole run ÷ off",)
    header += ("CPU µs/req ÷ before", "CPU µs/chunk ÷ before") if before else ()
    header += ("aim", "within aim?")
    dash = ("—",) * (2 if before else 0)
    rows = [
        (
            f"off ({LABELS[OFF]})",
            _median_us(requests, OFF, 1),
            "—",
            _median_us(streams, OFF, 2),
            *("—", "—", *dash, "—", "—"),
        )
    ]
    for name in TELEMETRY_RATIOS:
        aim = TELEMETRY_AIMS[name]
        per_request, per_chunk = requests.ratios(name), streams.ratios(name)
        checks = [("CPU/request", per_request), ("CPU/chunk", per_chunk)]
        aim_text = f"≤ {aim:.2f}× off"
        compared: tuple[str, ...] = ()
        if before:
            was = BEFORE_OF[name]
            against = requests.ratios(name, over=was), streams.ratios(name, over=was)
            compared = (_spread(against[0]), _spread(against[1]))
            if TELEMETRY_RATIOS[name] < 1.0:
                checks = [("CPU/request ÷ before", against[0])]
                aim, aim_text = BEFORE_AIM, f"≤ {BEFORE_AIM:.2f}× before"
        rows.append(
            (
                LABELS[name],
                _median_us(requests, name, 1),
                _spread(per_request),
                _median_us(streams, name, 2),
                _spread(per_chunk),
                _spread(streams.ratios(name, per_stream=True)),
                *compared,
                aim_text,
                _verdict(checks, aim),
            )
        )
    for name in BEFORE_RATIOS:
        if name not in NAMES:
            continue
        rows.append(
            (
                LABELS[name],
                _median_us(requests, name, 1),
                _spread(requests.ratios(name)),
                _median_us(streams, name, 2),
                _spread(streams.ratios(name)),
                _spread(streams.ratios(name, per_stream=True)),
                *dash,
                "—",
                "—",
            )
        )
    return markdown_table(header, rows)


def cycles_table(phase: Phase, unit: str, digits: int) -> str:
    header: tuple[str, ...] = ("cycle", "order")
    header += tuple(f"{SHORT[name]} µs/{unit}" for name in NAMES)
    header += tuple(f"{SHORT[name]} ÷ off" for name in NAMES if name != OFF)
    rows = []
    for cycle, by in sorted(phase.runs.items()):
        cells = [str(cycle), " → ".join(SHORT[name] for name in _order(cycle))]
        cells += [f"{by[name].per_unit_us:.{digits}f}" if name in by else "—" for name in NAMES]
        for name in NAMES:
            if name == OFF:
                continue
            ok = name in by and OFF in by
            cells.append(f"{by[name].per_unit_us / by[OFF].per_unit_us:.2f}×" if ok else "—")
        rows.append(tuple(cells))
    return markdown_table(header, rows)


def spans_table(requests: Phase, streams: Phase) -> str:
    header: tuple[str, ...] = (
        "target",
        "phase",
        "sent",
        "spans received",
        "traced ÷ sent",
        "sample ratio",
    )
    header += ("trace POSTs", "undecodable")
    rows = []
    for phase, what in ((requests, "requests"), (streams, "streams")):
        for name, ratio in {**TELEMETRY_RATIOS, **BEFORE_RATIOS}.items():
            counts, sent = phase.received.get(name), phase.sent.get(name, 0)
            if counts is None:
                continue
            traced = counts.spans / SPANS_PER_TRACE / max(sent, 1)
            rows.append(
                (
                    LABELS[name],
                    phase.name,
                    f"{sent:,} {what}",
                    f"{counts.spans:,}",
                    f"{traced:.2%}",
                    f"{ratio:.0%}",
                    f"{counts.trace_posts:,}",
                    str(counts.undecodable),
                )
            )
    return markdown_table(header, rows)


def idle_summary(phase: Phase) -> str:
    """The idle targets' CPU during the loaded one's runs: share of a core, and against
    the loaded target's own CPU over the same window."""
    shares: list[float] = []
    against: list[float] = []
    for by in phase.runs.values():
        for run in by.values():
            loaded_s = run.whole_cpu_s or run.cpu_s
            shares += [cpu / run.window_s for cpu in run.idle_cpu_s.values()]
            against.append(sum(run.idle_cpu_s.values()) / max(loaded_s, 1e-9))
    if not shares:
        return f"{phase.name}: not measured"
    return (
        f"{phase.name}: each idle target used {statistics.median(shares):.2%} of a core at "
        f"the median, {max(shares):.2%} at most; the others together "
        f"{statistics.median(against):.2%} of the loaded target's CPU at the median, "
        f"{max(against):.2%} at most"
    )


def _verdict_words(requests: Phase, streams: Phase) -> str:
    parts = []
    for name in TELEMETRY_RATIOS:
        aim = TELEMETRY_AIMS[name]
        checks = [("CPU/request", requests.ratios(name)), ("CPU/chunk", streams.ratios(name))]
        against = f"aim ≤ {aim:.2f}× off"
        if TELEMETRY_RATIOS[name] < 1.0 and BEFORE_OF[name] in NAMES:
            aim, against = BEFORE_AIM, f"aim ≤ {BEFORE_AIM:.2f}× before"
            checks = [("CPU/request ÷ before", requests.ratios(name, over=BEFORE_OF[name]))]
        parts.append(f"{SHORT[name]} traced ({against}): {_verdict(checks, aim)}")
    return "; ".join(parts)


def _para(text: str, indent: str = "") -> str:
    """`text` as one paragraph of lines up to 88 characters."""
    return textwrap.fill(
        " ".join(text.split()),
        width=88,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )


def section(
    requests: Phase,
    streams: Phase,
    settings: Settings,
    machine: dict[str, str],
    started: datetime,
    elapsed_s: float,
) -> str:
    stream_s = settings.stream_tokens / settings.stream_tokens_per_s
    window_s = stream_s - settings.stream_ramp_s - SETTLE_S - TAIL_S
    wrk = f"wrk -t1 -c{THROUGHPUT_CONNECTIONS} -d{settings.run_s}s -s post.lua"
    machine_text = ", ".join(f"{key} {value}" for key, value in machine.items())
    failures = requests.failures + streams.failures
    failed = "".join(f"\n- {_para(scrub_paths(line), '  ')}" for line in failures)
    failed = f"\n\nFailed measurements:\n{failed}" if failures else ""
    generated = _para(f"""Generated by `make bench-telemetry` (`tests/bench/telemetry_cost.py`) on
        {started:%Y-%m-%d %H:%M %Z}; the run took {elapsed_s / 60:.1f} minutes,
        {settings.cycles} cycles. `make bench` keeps this section as it is.""")
    before = [name for name in NAMES if name in BEFORE_RATIOS]
    also = (
        """, and the same two telemetry targets run from the code before the move to the
        OpenTelemetry SDK (`--before`: "b1%", "b100%"), so that new and old are set side
        by side in one run"""
        if before
        else ""
    )
    why = _para(f"""The table above compares runs minutes apart, and this machine's speed
        drifts by tens of percent over minutes, so its ratios carry that drift. Here the
        canary-proxy targets run side by side — telemetry off, traces 1%, traces 100%,
        the configs of the table above, each telemetry target exporting to its own
        `otlp_sink.py`{also} — all {len(NAMES)} on core 0, with the fake backend, the sinks
        and the load generator on core 1. Short measured runs go to one target after
        another, {" → ".join(SHORT[name] for name in NAMES)}, the order rotated by one
        target each cycle, so that each ratio compares runs seconds apart.""")
    method_requests = _para(f"""**Requests**: one fresh fake backend (no token delay) and
        the {len(NAMES)} targets, fresh; one {settings.warmup_s} s warm-up per target, then per
        cycle one `{wrk}` run per target. CPU per request = the target's utime + stime
        from the start of wrk's run until {settings.drain_s:g} s after its end (the exporter
        sends every second, so the run's last batch is counted; every target gets the same
        window) ÷ the requests wrk completed.""")
    method_streams = _para(f"""**Streams**: the targets restarted, fresh, in front of a
        second backend at {settings.stream_tokens_per_s:g} tokens/s; one warm-up run per
        target, then per cycle one `stream_client.py` run per target: {settings.streams}
        streams of {settings.stream_tokens} tokens ({stream_s:g} s), ramped over
        {settings.stream_ramp_s:g} s. CPU per chunk = the target's CPU over the steady window
        ({window_s:g} s, every stream open) ÷ the SSE events received in it, as in (c). No
        stream starts or ends in that window, so the streams' spans are not in it;
        "CPU/stream, whole run" counts them: the target's CPU from the client's launch
        until {settings.drain_s:g} s after its last stream ÷ the {settings.streams} measured
        streams (the client's 20 short warm-up streams and its idle second are in it too,
        alike for every target).""")
    method_ratio = _para(f""""÷ off" is the target's figure over the off target's in the
        same cycle ("÷ before": over the same telemetry target of the code before): the
        median over the cycles, and their range. The aims (the telemetry issues): with
        every request traced, within {TELEMETRY_AIMS["canary-proxy-otel-1"]:.2f}× of
        telemetry off; with 1% traced, within {BEFORE_AIM:.2f}× of the code before where it
        ran, else within {TELEMETRY_AIMS["canary-proxy-otel-0.01"]:.2f}× of off; "within
        aim?" judges the medians, and counts the cycles over the aim.""")
    verdict = _para(f"Verdict: {_verdict_words(requests, streams)}.")
    spans = _para(f"""Spans received by the sinks over each phase, against what the
        target was sent (warm-ups included; {SPANS_PER_TRACE} spans, server and client, per
        traced request; the requests wrk still had in flight when a run ended are not in
        "sent" but made spans too):""")
    idle = "\n".join(
        "- " + _para(idle_summary(phase) + end, "  ")
        for phase, end in ((requests, ";"), (streams, "."))
    )
    return f"""{TELEMETRY_BEGIN}
## Telemetry cost, interleaved

{generated}

{why}

{method_requests}

{method_streams}

{method_ratio}

{summary_table(requests, streams)}

{verdict}

Per cycle, requests (CPU µs per request):

{cycles_table(requests, "req", 1)}

Per cycle, streams (CPU µs per chunk):

{cycles_table(streams, "chunk", 2)}

{spans}

{spans_table(requests, streams)}

The idle targets share core 0 with the loaded one; their CPU over each run of another
target:

{idle}

Machine: {machine_text}.{failed}
{TELEMETRY_END}
"""


# --- the run -----------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, to check the harness")
    parser.add_argument(
        "--cycles",
        type=positive_int,
        metavar="N",
        help=f"round-robin cycles per phase (default {FULL.cycles}, {QUICK.cycles} with --quick)",
    )
    parser.add_argument(
        "--before",
        type=Path,
        metavar="TREE",
        help="also run the telemetry targets from this source tree (the code before a "
        "change, e.g. `git archive main | tar -x -C TREE`), side by side",
    )
    output_argument(parser, DOC)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    settings = QUICK if args.quick else FULL
    if args.cycles is not None:
        settings = dataclasses.replace(settings, cycles=args.cycles)
    if args.before is not None:
        use_before_tree(args.before)
        NAMES.extend(BEFORE_RATIOS)
    os.sched_setaffinity(0, {LOAD_CORE})
    done = run_in_workdir(
        "canary-bench-telemetry-",
        lambda workdir: (run_requests(settings, workdir), run_streams(settings, workdir)),
    )
    if done is None:
        return 130
    requests, streams = done.value
    machine = machine_info()
    machine = {key: machine[key] for key in ("CPU", "cores", "kernel", "Python")}
    text = section(requests, streams, settings, machine, done.started, done.elapsed_s)
    print()
    print(text)
    if (output := output_of(args, DOC)) is not None:
        write_block(output, text, with_telemetry_block)
    return 1 if requests.failures or streams.failures else 0


if __name__ == "__main__":
    sys.exit(main())
