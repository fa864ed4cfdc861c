"""docs/benchmarks.md: the method, the machine, the figures of one run, how to read them.

Results in, the page's Markdown out. The tables themselves are `report.py`'s;
this file owns the words around them, which describe the method `run.py` follows, so a
change of method is a change here too. Two sections are not `run.py`'s: "Workers and the
fleet", between `WORKERS_BEGIN` and `WORKERS_END`, written by `workers.py`,
"Telemetry cost, interleaved", between `TELEMETRY_BEGIN` and `TELEMETRY_END`, written by
`telemetry_cost.py`, the hot path's (`hot_path.py`) and "Shadow traffic cost", between
`SHADOW_BEGIN` and `SHADOW_END`, written by `shadow_cost.py`; `document` carries them
over from the page it replaces.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

from reloads import RELOAD_CONNECTIONS, USERS, WEIGHTS
from report import (
    Results,
    acceptance_table,
    core_table,
    markdown_table,
    median_of,
    notes,
    reload_latency_table,
    reload_serve_table,
    results_table,
    rounds_table,
    telemetry_notes,
    telemetry_table,
    ttfb_p50,
    ttfb_p99,
)
from scenarios import THROUGHPUT_CONNECTIONS, Settings
from stream_client import SETTLE_S, TAIL_S
from targets import CANARY_WEIGHT, TARGETS

from proxy.server.reload import POLL_S

__all__ = [
    "DOC",
    "HOT_BEGIN",
    "HOT_END",
    "SHADOW_BEGIN",
    "SHADOW_END",
    "TELEMETRY_BEGIN",
    "TELEMETRY_END",
    "WORKERS_BEGIN",
    "WORKERS_END",
    "document",
    "with_hot_block",
    "with_shadow_block",
    "with_telemetry_block",
    "with_workers_block",
]

DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
WORKERS_BEGIN = "<!-- workers:begin -->"
WORKERS_END = "<!-- workers:end -->"
TELEMETRY_BEGIN = "<!-- telemetry:begin -->"
TELEMETRY_END = "<!-- telemetry:end -->"
HOT_BEGIN = "<!-- hot-path:begin -->"
HOT_END = "<!-- hot-path:end -->"
SHADOW_BEGIN = "<!-- shadow:begin -->"
SHADOW_END = "<!-- shadow:end -->"
_RESULTS_HEADING = "## Results\n"
_NOTES_HEADING = "## Notes from this run"
_TELEMETRY_HEADING = "## Telemetry cost\n"
_NEXT_PART = re.compile(r"^(?:## |<!-- )", re.MULTILINE)  # a heading, or a marked block


def _marked_block(page: str, begin: str, end: str) -> str | None:
    """The block of `page` between `begin` and `end`, markers included, or None."""
    start = page.find(begin)
    stop = page.find(end, start)
    if start < 0 or stop < 0:
        return None
    return page[start : stop + len(end)] + "\n"


def _with_block(page: str, block: str, begin: str, end: str, after: str | None = None) -> str:
    """`page` with `block` in place of its block between `begin` and `end`; without one,
    right after the section headed `after` (before the next heading or marked block),
    else before the notes, or at the end."""
    old = _marked_block(page, begin, end)
    if old is not None:
        return page.replace(old.rstrip("\n"), block.rstrip("\n"), 1)
    heading = page.find(after) if after is not None else -1
    following = _NEXT_PART.search(page, heading + 1) if heading >= 0 else None
    at = following.start() if following is not None else page.find(_NOTES_HEADING)
    if at < 0:
        return page.rstrip("\n") + "\n\n" + block
    return page[:at] + block + "\n" + page[at:]


def write_block(output: Path, block: str, with_block: Callable[[str, str], str]) -> None:
    """Put `block` into the page at `output` (made when missing) with `with_block`."""
    page = output.read_text() if output.exists() else "# Benchmarks\n"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(with_block(page, block))
    print(f"wrote {output}")


def with_workers_block(page: str, block: str) -> str:
    """`page` with `block` (workers.py's) in place of its workers block; without one,
    before the notes, or at the end."""
    return _with_block(page, block, WORKERS_BEGIN, WORKERS_END)


def with_telemetry_block(page: str, block: str) -> str:
    """`page` with `block` (telemetry_cost.py's) in place of its telemetry block; without
    one, right after the "Telemetry cost" section, else before the notes, or at the end."""
    return _with_block(page, block, TELEMETRY_BEGIN, TELEMETRY_END, _TELEMETRY_HEADING)


def with_hot_block(page: str, block: str) -> str:
    """`page` with `block` (hot_path.py's) in place of its hot-path block; without one,
    right after the "Results" section, else before the notes, or at the end."""
    return _with_block(page, block, HOT_BEGIN, HOT_END, _RESULTS_HEADING)


def with_shadow_block(page: str, block: str) -> str:
    """`page` with `block` (shadow_cost.py's) in place of its shadow block; without one,
    after the interleaved telemetry block and what follows it up to the next heading,
    else before the notes, or at the end."""
    return _with_block(page, block, SHADOW_BEGIN, SHADOW_END, TELEMETRY_END)


_TARGET_DESCRIPTIONS = {
    "direct": "no proxy: the floor every added figure is measured from",
    "nginx": "one worker, `upstream` with `keepalive 64`, HTTP/1.1 to the upstream, "
    "`proxy_buffering off`, `proxy_request_buffering off` (`nginx.conf.template`)",
    "baseline": "`baseline_proxy.py`, a ~60-line aiohttp proxy: one catch-all route, one "
    "`ClientSession`, `await request.read()`, `iter_any()` → `write()`; `web.run_app` "
    "on asyncio's own loop",
    "baseline-uvloop": "the same file with `--uvloop`",
    "canary-proxy": "`canary-proxy run`: one route, stable and canary both the fake backend "
    "at weight 50, sticky on `header:x-user-id` (salt `chat`), `max_connections: 1024` per "
    "backend (the default; written out for code from before it, when the default 256 was "
    "close to the ~250 streams each variant gets in (c)), no OTLP export "
    "(its metrics are recorded all the same): telemetry off",
    "canary-proxy-otel-0.01": "the same config plus `telemetry: {otlp_endpoint: <sink>, "
    "trace_sample_ratio: 0.01}`: 1% of requests traced, spans exported every second and "
    "metrics every 10 s to `otlp_sink.py` (OTLP/HTTP protobuf)",
    "canary-proxy-otel-1": "the same with `trace_sample_ratio: 1.0`: every request traced",
}


def _targets_table() -> str:
    rows = [(TARGETS[name], text) for name, text in _TARGET_DESCRIPTIONS.items()]
    return markdown_table(("target", "what it is"), rows, numbers=False)


def _telemetry_section(results: Results) -> str:
    """The telemetry cost table and its words; empty when it was not measured."""
    table = telemetry_table(results)
    if table is None:
        return ""
    return f"""## Telemetry cost

{table}

CPU per request (a) and per streamed chunk (c) with OTLP export on, against telemetry
off (the canary-proxy row) in the same round: "÷ off" is the median of the per-round
ratios, with their range. The aims (from the telemetry issues): within 15% of
telemetry off when 1% of requests are traced, within 35% when every request is.
Telemetry off still records metrics; "on" adds the sampling decision per request,
building a server span and a client span per sampled request as the OpenTelemetry
SDK's `ReadableSpan`s, the SDK's batch processor and OTLP/HTTP exporter encoding and
sending them on their own thread (every second, in batches of up to 512), and the
metrics every 10 s. The receiver,
`otlp_sink.py` (aiohttp on uvloop: reads each body, counts the spans, answers 200 with
an empty protobuf body), runs on core 1 in the role of Jaeger or a Collector on
another machine: its CPU is not counted as the proxy's. What it received is in the
notes below. Here the three targets run minutes apart, and this machine's speed drifts
by 20-40% over minutes, so these ratios (and their verdicts) move from run to run; the
interleaved measurement that follows, which alternates the three every few seconds,
is the one to read for the aims.

"""


def _reload_section(results: Results, settings: Settings) -> str:
    """Scenario (d)'s tables and method; empty when it was not measured."""
    serve, latency = reload_serve_table(results), reload_latency_table(results)
    if serve is None and latency is None:
        return ""
    low, high = (f"{weight:g}" for weight in WEIGHTS)
    stagger_ms = POLL_S / settings.reloads * 1e3
    parts = ["## Reload\n"]
    if serve is not None:
        parts.append(f"""(d1) From rewriting the config file to the new weight being served, over
every timed rewrite of every round:

{serve}

canary-proxy alone, fresh, in front of a fake backend without token delay; nothing runs
but one client on core 1 that sends small chat requests one at a time, over and over,
for {USERS} fixed user ids (`x-user-id`) chosen with the SPEC §4 formula (mmh3 of
`salt:key`) so that every one is stable at weight {low} and canary at weight {high}.
The harness rewrites the route's `rollout: {{weight: N}}` line in place (same inode,
one `write()` of a file of the same length), alternating {low} ↔ {high},
{settings.reloads} times per round after one unmeasured rewrite from the start weight
{CANARY_WEIGHT:g}; the rewrites are {settings.reload_spacing_s:g} s apart plus
{stagger_ms:.0f} ms each, so they fall at phases of the proxy's {POLL_S:g} s stat poll
spread evenly over its period (at exactly {settings.reload_spacing_s:g} s, a multiple of
the poll period, every rewrite would meet the poll at the same phase). "Served" is from
just before the write to the end of the first full pass over the users in which every
response's `x-canary-variant` was the new weight's; "first response" to the first
response at the new weight. A pass takes "one pass ms", the resolution of "served".
"Flips" counts passes after the switch that were not wholly at the new weight (there
should be none: the swap is atomic); "applied / rewrites" is the proxy's own
`canary_config_reloads_total{{result="success"}}` against the rewrites made. What to
expect: the wait for the next poll (0 to {POLL_S:g} s, half that on average), then the
reload itself (reading and hashing the file, parsing and validating it, building the
route table, the swap), then, for "served", the rest of the pass under way and one
whole pass.
""")
    if latency is not None:
        parts.append(f"""(d2) Latency during reloads, medians over rounds (non-2xx responses and
socket errors summed over rounds):

{latency}

`wrk -t1 -c{RELOAD_CONNECTIONS} -d{settings.reload_load_s}s --latency -s post.lua` (the
(a) request, 1000 users) against a fresh canary-proxy, after a {settings.warmup_s} s
warm-up: once with the config file left alone, once while a thread rewrites the weight
({low} ↔ {high}) every {settings.reload_every_s:g} s, the two in alternating order by
round; the run without reloads is at weight {CANARY_WEIGHT:g}. "with ÷ without" is the
median of the per-round ratios (their range in brackets). Non-2xx are wrk's "Non-2xx or
3xx responses"; socket errors its connect, read, write and timeout errors; both must
be 0. A reload (parsing and validating the file, the swap) runs on the proxy's event loop, so
its pause shows as queueing in the tail of the requests in flight.
""")
    return "\n".join(parts) + "\n"


def _times_in_words(rounds: int) -> str:
    return {1: "once", 2: "twice"}.get(rounds, f"{rounds} times")


def _window_s(settings: Settings) -> float:
    """The steady window of stream_client.py: after the ramp and the settling, until the
    tail before the first stream ends."""
    stream_s = settings.stream_tokens / settings.stream_tokens_per_s
    return round(stream_s - settings.stream_ramp_s - SETTLE_S - TAIL_S, 1)


def document(
    results: Results,
    *,
    machine: Mapping[str, str],
    settings: Settings,
    started: datetime,
    elapsed_s: float,
) -> str:
    """docs/benchmarks.md: method, machine, the table, acceptance, notes."""
    direct = results.get("direct")
    direct_ttfb = ""
    floor_p50, floor_p99 = median_of(direct, ttfb_p50), median_of(direct, ttfb_p99)
    if floor_p50 is not None and floor_p99 is not None:
        direct_ttfb = (
            f" Direct to the backend, TTFB was {floor_p50:.2f} ms (p50) and "
            f"{floor_p99:.2f} ms (p99)."
        )
    run_notes = notes(results, settings) or [
        "No errors; every stream completed; no other work seen on the cores (a host "
        "that is slower for a while shows only in the round-by-round figures)."
    ]
    run_notes += telemetry_notes(results)
    machine_rows = [(key, value) for key, value in machine.items()]
    page = f"""# Benchmarks

Generated by `make bench` (`tests/bench/run.py`) on {started:%Y-%m-%d %H:%M %Z}; the run
took {elapsed_s / 60:.1f} minutes. Rerun it to refresh this page; `--quick` checks the harness.

## Method

Each target sits between the load generator and one `canary-proxy fake-backend`. The
proxy under test runs alone on core 0 (`taskset -c 0`); the fake backend and the load
generator share core 1, and so does the OTLP receiver of the telemetry targets.
Every target is started fresh for each group of scenarios.
The whole sequence — (a) and (b) for every target, then (c) for every target, then
(d), the config reload, for canary-proxy (the one target with a config to reload) —
ran {_times_in_words(settings.rounds)}; every figure below is the median over the rounds,
and the acceptance ratios are the median of ratios taken within a round (a pair
measured minutes apart), because the machine is shared and drifts by 10-20% over minutes.

{_targets_table()}

- **(a) throughput**: `wrk -t1 -c{THROUGHPUT_CONNECTIONS} -d{settings.throughput_s}s -s post.lua`
  (after a {settings.warmup_s} s warm-up): a ~1 KB JSON chat request from one of 1000 users
  (`x-user-id`), answered with ~1 KB of JSON at once (`max_tokens` 120, no token delay).
  CPU per request = the target's utime + stime (`/proc/PID/stat`, every process and
  thread of it) over wrk's run ÷ the requests wrk completed.
- **(b) latency**: `wrk -t1 -c1 -d{settings.latency_s}s`, the same request one at a time;
  wrk's p50 and p99. "Added" = the target's minus the direct row's.
- **(c) streams**: `tests/bench/stream_client.py` (asyncio protocols on uvloop) opens
  {settings.streams} streamed chat completions, ramped over {settings.stream_ramp_s:g} s, each
  {settings.stream_tokens} tokens at {settings.stream_tokens_per_s:g} tokens/s (one SSE event
  each, ~200 bytes), one connection each. CPU per chunk = the target's CPU over the
  steady window (every stream open, {_window_s(settings):g} s) ÷ the SSE events the client
  received in it.
  TTFB = connect and request → first body byte, per stream. RSS per stream = (VmRSS with
  every stream open, the highest of samples every 0.25 s − VmRSS idle after a 20-stream
  warm-up) ÷ {settings.streams}. The client is a bare protocol rather than aiohttp's client
  because it shares core 1 with the fake backend: with aiohttp's client (~16 µs of core 1
  per chunk, against ~11 µs) core 1 saturated at 25,000 chunks/s and its own queueing
  made even the direct row's TTFB p50 60-190 ms.
- (a) and (b) run against one target process, (c) against a fresh one (and a fresh
  backend), so the idle RSS of (c) is not inflated by the connections of (a).
- **(d) reload**: time from a config file rewrite to the new weight being served, and
  wrk's latency with and without a rewrite every {settings.reload_every_s:g} s; see
  [Reload](#reload).

## Machine

{markdown_table(("", ""), machine_rows, numbers=False)}

## Results

{results_table(results)}

"÷ nginx" is the row's CPU cost over nginx's. Latencies in µs, TTFB in ms.{direct_ttfb}

Round by round (the noise):

{rounds_table(results)}

## canary-proxy against the baselines

{acceptance_table(results)}

The acceptance figure: canary-proxy's CPU per request and per chunk, and its memory per
open stream, are no higher than the ~60-line baseline's, on either event loop.

{_telemetry_section(results)}{_reload_section(results, settings)}## Notes from this run

Core use, medians over rounds (core 1 runs the fake backend and the load generator,
and the OTLP receiver for the telemetry targets; anything else running on the machine
counts too):

{core_table(results)}

{chr(10).join(f"- {line}" for line in run_notes)}

## How to read these figures

- CPU per request and per chunk are the figures to compare. req/s is not: the Python
  proxies saturate core 0 in (a), but nginx does not — it is held back by the Python
  fake backend and wrk sharing core 1 (see its core share in the notes). A process
  that is not saturated wakes up for fewer events at a time, so nginx's CPU per request
  here is higher than on a machine where it runs flat out, and most of it is kernel
  time (loopback TCP in this VM): the "÷ nginx" ratios are lower than the ~10× often
  quoted for a saturated nginx.
- utime + stime do not include softirq time (the kernel's packet processing, which
  /proc/stat counts apart), for any target.
- TTFB is the noisiest figure. Once a few hundred streams are open, the processes
  written in Python (the proxies and the fake backend alike) stall for tens of
  milliseconds at a time — Python's cyclic garbage collector is part of it: with it
  disabled, the baseline's stalls roughly halve — and the proxy's core is 70-80% busy
  by the end of the ramp, so in some rounds a queue forms that pushes even the median
  up. Compare TTFB round by round, and trust the CPU figures more.
- Where a proxy's CPU goes: `tests/bench/pyspy_profile.py --target canary-proxy
  --scenario a` (or `c`; or a telemetry target, `--target canary-proxy-otel-1`) runs
  the same load under py-spy (`.venv/bin/pip install py-spy` first) and prints the top
  functions by own and by total time, and the time in each file of `proxy/`.
- The machine is shared and has two cores; other work on either core shows up as
  noise (the notes above flag it when a core was visibly busy with something else),
  hence the rounds. CPU time is counted in clock ticks of 10 ms, well under 1% of
  these windows.
"""
    # workers.py's, telemetry_cost.py's, hot_path.py's and shadow_cost.py's sections,
    # from the page this one replaces.
    replaced = DOC.read_text() if DOC.exists() else ""
    for begin, end, put in (
        (WORKERS_BEGIN, WORKERS_END, with_workers_block),
        (TELEMETRY_BEGIN, TELEMETRY_END, with_telemetry_block),
        (HOT_BEGIN, HOT_END, with_hot_block),
        (SHADOW_BEGIN, SHADOW_END, with_shadow_block),
    ):
        kept = _marked_block(replaced, begin, end)
        if kept is not None:
            page = put(page, kept)
    return page
