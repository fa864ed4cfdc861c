"""The benchmark's figures: one side-by-side table, the acceptance ratios, the notes.

Everything here is pure: results in, Markdown tables out (`document.py` puts them on
the page). Every figure is the median over rounds. Derived figures:
- added latency / TTFB = the target's percentile minus the direct row's;
- "÷ nginx" = the target's CPU per request (or per chunk) over nginx's;
- RSS per stream = (RSS with every stream open − RSS idle after warm-up) / streams;
- telemetry cost = a telemetry target's CPU per request (or per chunk) over canary-proxy's
  (telemetry off) in the same round, the median of those ratios over rounds;
- reload (d1): p50 and max over every timed rewrite of every round (pooled, not medians);
  (d2): medians over rounds, and "with ÷ without" the median of the per-round ratios;
  non-2xx responses and socket errors summed over rounds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from otlp_sink import SinkCounts
from reloads import ReloadLatency, ReloadServe, WrkRun
from scenarios import Latency, Settings, Streams, Throughput
from targets import BEFORE_OFF, LABELS, TARGETS, TELEMETRY_RATIOS

__all__ = [
    "BEFORE_AIM",
    "TELEMETRY_AIMS",
    "Exported",
    "Results",
    "TargetResult",
    "acceptance_table",
    "core_table",
    "markdown_table",
    "median_of",
    "notes",
    "reload_latency_table",
    "reload_serve_table",
    "reload_summary",
    "results_table",
    "rounds_table",
    "telemetry_notes",
    "telemetry_table",
    "ttfb_p50",
    "ttfb_p99",
]

_DASH = "—"
_FOREIGN_LOAD_WARN = 0.10  # a core busier than our own work by this much had visitors
_LOAD_CORE_BUSY_WARN = 0.90  # past this the load core itself adds queueing to TTFB
_ACCEPTANCE_BASELINES = ("baseline", "baseline-uvloop", BEFORE_OFF)
# Table order: `run.py --before` adds the code before a change after every other target.
_ORDER = (*TARGETS, BEFORE_OFF)
_TELEMETRY_OFF = "canary-proxy"
TELEMETRY_AIMS = {"canary-proxy-otel-0.01": 1.15, "canary-proxy-otel-1": 1.35}
"""The aims: CPU per request and per chunk at most this many times telemetry off."""
BEFORE_AIM = 1.05
"""With 1% traced, CPU per request at most this many times the code before the move to
the OpenTelemetry SDK (`telemetry_cost.py --before`), measured in the same run."""
_SPANS_PER_TRACE = 2  # a server span, and a client span for its one backend attempt
_SPAN_SLACK = 0.01  # wrk abandons its requests in flight at the end; they make spans too


@dataclass(frozen=True, slots=True)
class Exported:
    """What one telemetry target process was sent, and what its OTLP sink received."""

    requests: int  # every request sent to the target over its life, warm-ups included
    received: SinkCounts


@dataclass
class TargetResult:
    """Everything measured for one target, by round (rounds are numbered from 1)."""

    name: str
    throughput: dict[int, Throughput] = field(default_factory=dict)
    latency: dict[int, Latency] = field(default_factory=dict)
    streams: dict[int, Streams] = field(default_factory=dict)
    exported: dict[tuple[int, str], Exported] = field(default_factory=dict)  # (round, "ab"|"c")
    reload_serve: dict[int, ReloadServe] = field(default_factory=dict)  # (d1)
    reload_latency: dict[int, ReloadLatency] = field(default_factory=dict)  # (d2)
    failures: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return LABELS[self.name]

    @property
    def is_proxy(self) -> bool:
        return self.name != "direct"


Results = Mapping[str, TargetResult]
ByRound = dict[int, float]
Metric = Callable[[TargetResult], ByRound]


# --- metrics, by round -------------------------------------------------------------------


def requests_per_s(r: TargetResult) -> ByRound:
    return {n: t.requests_per_s for n, t in r.throughput.items()}


def cpu_per_request(r: TargetResult) -> ByRound:
    return {n: t.cpu_us_per_request for n, t in r.throughput.items()} if r.is_proxy else {}


def latency_p50(r: TargetResult) -> ByRound:
    return {n: x.p50_us for n, x in r.latency.items()}


def latency_p99(r: TargetResult) -> ByRound:
    return {n: x.p99_us for n, x in r.latency.items()}


def cpu_per_chunk(r: TargetResult) -> ByRound:
    return {n: s.cpu_us_per_chunk for n, s in r.streams.items()} if r.is_proxy else {}


def chunks_per_s(r: TargetResult) -> ByRound:
    return {n: s.events_per_s for n, s in r.streams.items()}


def ttfb_p50(r: TargetResult) -> ByRound:
    return {n: s.ttfb_p50_ms for n, s in r.streams.items()}


def ttfb_p99(r: TargetResult) -> ByRound:
    return {n: s.ttfb_p99_ms for n, s in r.streams.items()}


def rss_per_stream(r: TargetResult) -> ByRound:
    return {n: s.rss_kib_per_stream for n, s in r.streams.items()} if r.is_proxy else {}


def proxy_core_share_a(r: TargetResult) -> ByRound:
    return {n: t.cpu_s / t.duration_s for n, t in r.throughput.items()} if r.is_proxy else {}


def proxy_core_share_c(r: TargetResult) -> ByRound:
    if not r.is_proxy:
        return {}
    return {n: s.window_cpu_s / max(s.window_s, 1e-9) for n, s in r.streams.items()}


def load_core_busy_c(r: TargetResult) -> ByRound:
    return {n: s.core_busy[1] for n, s in r.streams.items() if len(s.core_busy) > 1}


def median_of(result: TargetResult | None, metric: Metric) -> float | None:
    values = metric(result) if result is not None else {}
    return statistics.median(values.values()) if values else None


def _added(result: TargetResult, direct: TargetResult | None, metric: Metric) -> float | None:
    if not result.is_proxy:
        return None
    value, floor = median_of(result, metric), median_of(direct, metric)
    return None if value is None or floor is None else value - floor


def _over(result: TargetResult, reference: TargetResult | None, metric: Metric) -> float | None:
    return _ratio(median_of(result, metric), median_of(reference, metric))


def _paired_ratios(
    result: TargetResult,
    reference: TargetResult,
    metric: Metric,
    reference_metric: Metric | None = None,
) -> list[float]:
    """result ÷ reference round by round: each pair was measured minutes apart at most.
    `reference_metric` (default `metric`) is read of the reference."""
    mine, theirs = metric(result), (reference_metric or metric)(reference)
    return [mine[n] / theirs[n] for n in sorted(mine) if n in theirs and theirs[n] > 0]


# --- formatting --------------------------------------------------------------------------


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return _DASH
    return f"{value:,.{digits}f}"


def _signed(value: float | None, digits: int = 0) -> str:
    if value is None:
        return _DASH
    return f"{value:+,.{digits}f}"


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def _times(ratio: float | None) -> str:
    return _DASH if ratio is None else f"{ratio:.2f}×"


_HEADER = (
    "target",
    "req/s",
    "CPU µs/req",
    "÷ nginx",
    "p50 µs",
    "p99 µs",
    "added p50 µs",
    "added p99 µs",
    "CPU µs/chunk",
    "÷ nginx",
    "chunks/s",
    "added TTFB p50 ms",
    "added TTFB p99 ms",
    "RSS KiB/stream",
)


def _row(result: TargetResult, results: Results) -> tuple[str, ...]:
    direct, nginx = results.get("direct"), results.get("nginx")
    if not (result.throughput or result.latency or result.streams):
        return (result.label, "failed", *([_DASH] * (len(_HEADER) - 2)))
    return (
        result.label,
        _number(median_of(result, requests_per_s)),
        _number(median_of(result, cpu_per_request), 1),
        _times(_over(result, nginx, cpu_per_request)),
        _number(median_of(result, latency_p50)),
        _number(median_of(result, latency_p99)),
        _signed(_added(result, direct, latency_p50)),
        _signed(_added(result, direct, latency_p99)),
        _number(median_of(result, cpu_per_chunk), 2),
        _times(_over(result, nginx, cpu_per_chunk)),
        _number(median_of(result, chunks_per_s)),
        _signed(_added(result, direct, ttfb_p50), 2),
        _signed(_added(result, direct, ttfb_p99), 2),
        _number(median_of(result, rss_per_stream), 1),
    )


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, numbers: bool = True
) -> str:
    """A Markdown table padded for plain-text reading; `numbers` right-aligns all but
    the first column."""
    widths = [max(len(cells[i]) for cells in (header, *rows)) for i in range(len(header))]

    def right(i: int) -> bool:
        return numbers and i > 0

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(width) if right(i) else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join("-" * (width + 1) + (":" if right(i) else "-") for i, width in enumerate(widths))
        + "|"
    )
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def results_table(results: Results) -> str:
    """Every target side by side, in table order; each figure the median of the rounds."""
    rows = [_row(results[name], results) for name in _ORDER if name in results]
    return markdown_table(_HEADER, rows)


def rounds_table(results: Results) -> str:
    """The key figures of every round, to show the noise."""

    def cells(result: TargetResult, metric: Metric, digits: int) -> str:
        values = metric(result)
        return " / ".join(f"{values[n]:,.{digits}f}" for n in sorted(values)) or _DASH

    header = ("target", "req/s", "CPU µs/req", "CPU µs/chunk", "RSS KiB/stream", "TTFB p50 ms")
    rows = [
        (
            result.label,
            cells(result, requests_per_s, 0),
            cells(result, cpu_per_request, 1),
            cells(result, cpu_per_chunk, 2),
            cells(result, rss_per_stream, 1),
            cells(result, ttfb_p50, 1),
        )
        for name in _ORDER
        if (result := results.get(name)) is not None
    ]
    return markdown_table(header, rows)


def core_table(results: Results) -> str:
    """How busy each core was (medians over rounds): is the proxy or the load the limit?"""

    def share(result: TargetResult, metric: Metric) -> str:
        value = median_of(result, metric)
        return _DASH if value is None else f"{value:.0%}"

    header = ("target", "(a) proxy's share of core 0", "(c) proxy's share of core 0", "(c) core 1")
    rows = [
        (
            result.label,
            share(result, proxy_core_share_a),
            share(result, proxy_core_share_c),
            share(result, load_core_busy_c),
        )
        for name in _ORDER
        if (result := results.get(name)) is not None
    ]
    return markdown_table(header, rows)


_ACCEPTANCE_METRICS: tuple[tuple[str, Metric], ...] = (
    ("CPU/request", cpu_per_request),
    ("CPU/chunk", cpu_per_chunk),
    ("RSS/stream", rss_per_stream),
)


def acceptance_table(results: Results) -> str:
    """canary-proxy over each reference, per metric: the median of the per-round ratios
    (and their range), with the verdict "no higher" on the median."""
    canary = results.get("canary-proxy")
    header = ("canary-proxy ÷", *(name for name, _ in _ACCEPTANCE_METRICS), "no higher?")
    rows: list[tuple[str, ...]] = []
    for name in (*_ACCEPTANCE_BASELINES, "nginx"):
        reference = results.get(name)
        if reference is None or canary is None:
            continue
        medians: list[float | None] = []
        shown: list[str] = []
        for _, metric in _ACCEPTANCE_METRICS:
            ratios = _paired_ratios(canary, reference, metric)
            median = statistics.median(ratios) if ratios else None
            medians.append(median)
            spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""
            shown.append(_times(median) + spread)
        measured = [(label, m) for (label, _), m in zip(_ACCEPTANCE_METRICS, medians, strict=True)]
        worse = [label for label, m in measured if m is not None and m > 1]
        missing = [label for label, m in measured if m is None]
        if name == "nginx":
            verdict = "(reference)"
        elif len(missing) == len(measured):
            verdict = "not measured"
        else:
            verdict = "yes" if not worse else "no: " + ", ".join(worse)
            if missing:
                verdict += f" ({', '.join(missing)} not measured)"
        rows.append((reference.label, *shown, verdict))
    return markdown_table(header, rows)


_TELEMETRY_METRICS: tuple[tuple[str, str, Metric, int], ...] = (
    ("CPU µs/req (a)", "CPU/request", cpu_per_request, 1),
    ("CPU µs/chunk (c)", "CPU/chunk", cpu_per_chunk, 2),
)


def telemetry_table(results: Results) -> str | None:
    """Telemetry off (canary-proxy) against each telemetry target: CPU per request and
    per chunk, each "on" figure over "off" round by round (median, range), against the
    aims. None when canary-proxy or every telemetry target is missing."""
    off = results.get(_TELEMETRY_OFF)
    on = [results[name] for name in TELEMETRY_RATIOS if name in results]
    if off is None or not on:
        return None
    header: list[str] = ["telemetry"]
    for title, _, _, _ in _TELEMETRY_METRICS:
        header += [title, "÷ off"]
    header += ["aim", "within aim?"]
    rows: list[tuple[str, ...]] = []
    off_cells: list[str] = ["off (" + off.label + ")"]
    for _, _, metric, digits in _TELEMETRY_METRICS:
        off_cells += [_number(median_of(off, metric), digits), _DASH]
    rows.append((*off_cells, _DASH, _DASH))
    for result in on:
        aim = TELEMETRY_AIMS[result.name]
        cells = [result.label]
        over: list[str] = []
        measured = 0
        for _, short, metric, digits in _TELEMETRY_METRICS:
            ratios = _paired_ratios(result, off, metric)
            median = statistics.median(ratios) if ratios else None
            spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""
            cells += [_number(median_of(result, metric), digits), _times(median) + spread]
            if median is not None:
                measured += 1
                if median > aim:
                    over.append(short)
        if not measured:
            verdict = "not measured"
        else:
            verdict = "yes" if not over else "no: " + ", ".join(over)
        rows.append((*cells, f"≤ {aim:.2f}×", verdict))
    return markdown_table(header, rows)


# --- (d) reload ------------------------------------------------------------------------

_RELOAD_TARGET = "canary-proxy"


def _pooled(values: Sequence[float]) -> tuple[float, float] | None:
    return (statistics.median(values), max(values)) if values else None


def reload_serve_table(results: Results) -> str | None:
    """(d1): write → served at the new weight, over every timed rewrite of every round.
    None when (d1) was not measured."""
    result = results.get(_RELOAD_TARGET)
    if result is None or not result.reload_serve:
        return None
    rounds = [result.reload_serve[n] for n in sorted(result.reload_serve)]
    served = _pooled([ms for r in rounds for ms in r.served_ms])
    first = _pooled([ms for r in rounds for ms in r.first_ms])
    header = (
        "rewrites timed",
        "served p50 ms",
        "served max ms",
        "first response p50 ms",
        "first response max ms",
        "one pass ms",
        "applied / rewrites",
        "errors",
        "flips",
    )
    row = (
        f"{sum(len(r.served_ms) for r in rounds)}",
        _number(served[0] if served else None),
        _number(served[1] if served else None),
        _number(first[0] if first else None),
        _number(first[1] if first else None),
        _number(statistics.median(r.pass_ms for r in rounds), 1),
        f"{sum(r.applied for r in rounds)} / {sum(r.rewrites for r in rounds)}",
        f"{sum(r.errors for r in rounds)}",
        f"{sum(r.flips for r in rounds)}",
    )
    return markdown_table(header, [row])


def _wrk_metric(which: str, attribute: str) -> Callable[[TargetResult], ByRound]:
    def metric(r: TargetResult) -> ByRound:
        return {
            n: float(getattr(getattr(x, which), attribute)) for n, x in r.reload_latency.items()
        }

    return metric


def reload_latency_table(results: Results) -> str | None:
    """(d2): wrk -c8 with and without a rewrite every second, and their ratio. None when
    (d2) was not measured."""
    result = results.get(_RELOAD_TARGET)
    if result is None or not result.reload_latency:
        return None
    rounds = [result.reload_latency[n] for n in sorted(result.reload_latency)]
    header = (
        "",
        "req/s",
        "p50 µs",
        "p99 µs",
        "CPU µs/req",
        "non-2xx",
        "socket errors",
        "reloads applied",
    )

    def runs(which: str) -> list[WrkRun]:
        return [getattr(r, which) for r in rounds]

    def cells(which: str, reloads: str) -> tuple[str, ...]:
        done = runs(which)
        return (
            _number(statistics.median(x.requests / max(x.duration_s, 1e-9) for x in done)),
            _number(median_of(result, _wrk_metric(which, "p50_us"))),
            _number(median_of(result, _wrk_metric(which, "p99_us"))),
            _number(median_of(result, _wrk_metric(which, "cpu_us_per_request")), 1),
            f"{sum(x.non_2xx for x in done)}",
            f"{sum(x.socket_errors for x in done)}",
            reloads,
        )

    applied = f"{sum(r.applied for r in rounds)} / {sum(r.rewrites for r in rounds)} rewrites"
    ratio_cells: list[str] = []
    for attribute in ("p50_us", "p99_us", "cpu_us_per_request"):
        ratios = _paired_ratios(
            result, result, _wrk_metric("reloading", attribute), _wrk_metric("quiet", attribute)
        )
        median = statistics.median(ratios) if ratios else None
        spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""
        ratio_cells.append(_times(median) + spread)
    rows = [
        ("no reload", *cells("quiet", "0")),
        ("a reload every second", *cells("reloading", applied)),
        (
            "with ÷ without",
            _DASH,
            ratio_cells[0],
            ratio_cells[1],
            ratio_cells[2],
            _DASH,
            _DASH,
            _DASH,
        ),
    ]
    return markdown_table(header, rows)


def reload_summary(result: TargetResult, round_number: int) -> list[str]:
    """The console lines of one round of (d)."""
    lines = []
    serve = result.reload_serve.get(round_number)
    if serve is not None and serve.served_ms:
        lines.append(
            f"  (d1) {result.label}: {len(serve.served_ms)} rewrites, served at the new "
            f"weight p50 {statistics.median(serve.served_ms):.0f} ms, max "
            f"{max(serve.served_ms):.0f} ms (first response p50 "
            f"{statistics.median(serve.first_ms):.0f} ms; a pass {serve.pass_ms:.1f} ms); "
            f"{serve.applied}/{serve.rewrites} reloads applied, {serve.errors} errors, "
            f"{serve.flips} flips"
        )
    latency = result.reload_latency.get(round_number)
    if latency is not None:
        q, r = latency.quiet, latency.reloading
        lines.append(
            f"  (d2) {result.label}: p50/p99 {q.p50_us:.0f}/{q.p99_us:.0f} µs without "
            f"reloads, {r.p50_us:.0f}/{r.p99_us:.0f} µs with {latency.applied}/"
            f"{latency.rewrites} applied; non-2xx {q.non_2xx}/{r.non_2xx}, socket errors "
            f"{q.socket_errors}/{r.socket_errors}"
        )
    return lines


def _reload_notes(label: str, result: TargetResult) -> list[str]:
    found: list[str] = []
    for n, serve in sorted(result.reload_serve.items()):
        where = f"{label} (d1, round {n})"
        if serve.errors:
            found.append(f"{where}: {serve.errors} of {serve.requests} requests failed")
        if serve.flips:
            found.append(
                f"{where}: {serve.flips} passes after a switch were not wholly at the new weight"
            )
        own = serve.cpu_s / max(serve.duration_s, 1e-9)
        busy = serve.core_busy[0] if serve.core_busy else 0.0
        if busy - own > _FOREIGN_LOAD_WARN:
            found.append(
                f"{where}: core 0 was {busy:.0%} busy but the proxy used {own:.0%} of it: "
                "other work ran there (the machine is shared)"
            )
        if serve.applied != serve.rewrites or serve.failed:
            found.append(
                f"{where}: the proxy applied {serve.applied} and refused {serve.failed} "
                f"reloads for {serve.rewrites} rewrites"
            )
    for n, latency in sorted(result.reload_latency.items()):
        where = f"{label} (d2, round {n})"
        for title, run in (("without reloads", latency.quiet), ("with", latency.reloading)):
            if run.non_2xx or run.socket_errors:
                found.append(
                    f"{where}, {title}: {run.non_2xx} non-2xx responses, "
                    f"{run.socket_errors} socket errors"
                )
            own = run.cpu_s / max(run.duration_s, 1e-9)
            busy = run.core_busy[0] if run.core_busy else 0.0
            if busy - own > _FOREIGN_LOAD_WARN:
                found.append(
                    f"{where}, {title}: core 0 was {busy:.0%} busy but the proxy used "
                    f"{own:.0%} of it: other work ran there (the machine is shared)"
                )
        if latency.applied != latency.rewrites or latency.failed:
            found.append(
                f"{where}: the proxy applied {latency.applied} and refused {latency.failed} "
                f"reloads for {latency.rewrites} rewrites"
            )
    return found


def telemetry_notes(results: Results) -> list[str]:
    """For each telemetry target: spans the sink received per request sent, against the
    sample ratio (2 spans per sampled request), and what the export weighed."""
    found: list[str] = []
    for name, ratio in TELEMETRY_RATIOS.items():
        result = results.get(name)
        if result is None or not result.exported:
            continue
        groups: dict[str, list[Exported]] = {}
        for (_, group), exported in sorted(result.exported.items()):
            groups.setdefault(group, []).append(exported)
        everything = [e for group in groups.values() for e in group]
        requests = sum(e.requests for e in everything)
        spans = sum(e.received.spans for e in everything)
        expected = _SPANS_PER_TRACE * ratio
        per_group = "; ".join(
            f"{'(a), (b)' if group == 'ab' else '(' + group + ')'} "
            f"{_per_request(sum(e.received.spans for e in es), sum(e.requests for e in es))}"
            for group, es in groups.items()
        )
        trace_posts = sum(e.received.trace_posts for e in everything)
        trace_mb = sum(e.received.trace_bytes for e in everything) / 1e6
        metric_posts = sum(e.received.metric_posts for e in everything)
        sink_cpu = sum(e.received.cpu_s for e in everything)
        line = (
            f"{result.label}: the OTLP sink received {spans:,} spans for {requests:,} "
            f"requests sent ({_per_request(spans, requests)} per request, expected "
            f"{expected:.2f}: {_SPANS_PER_TRACE} per sampled request × {ratio:g}; "
            f"{per_group}), in {trace_posts:,} trace posts ({trace_mb:,.1f} MB) and "
            f"{metric_posts:,} metrics posts; the sink used {sink_cpu:.1f} s of core 1 "
            "(not counted as the proxy's)"
        )
        undecodable = sum(e.received.undecodable for e in everything)
        if undecodable:
            line += f"; {undecodable} trace bodies could not be decoded"
        if not _plausible(spans, requests, ratio):
            line += " — more or fewer than sampling explains: spans were dropped or lost"
        found.append(line)
    return found


def _per_request(spans: int, requests: int) -> str:
    return f"{spans / requests:.4f}" if requests else _DASH


def _plausible(spans: int, requests: int, ratio: float) -> bool:
    """Sampled traces are Binomial(requests, ratio): within four standard deviations,
    give or take the requests wrk abandons at its end."""
    traces = spans / _SPANS_PER_TRACE
    mean = requests * ratio
    allowed = 4 * math.sqrt(requests * ratio * (1 - ratio)) + _SPAN_SLACK * mean + 2
    return abs(traces - mean) <= allowed


def notes(results: Results, settings: Settings) -> list[str]:
    """Sanity facts of this run: errors, visitors on the cores, streams that did not finish."""
    found: list[str] = []
    expected_rate = settings.streams * settings.stream_tokens_per_s
    for name in _ORDER:
        result = results.get(name)
        if result is None:
            continue
        label = result.label
        found.extend(f"{label}: {failure}" for failure in result.failures)
        for n, throughput in sorted(result.throughput.items()):
            found.extend(_throughput_notes(f"{label} (a, round {n})", throughput, result.is_proxy))
        for n, latency in sorted(result.latency.items()):
            if latency.errors:
                found.append(f"{label} (b, round {n}): {latency.errors} wrk errors")
        for n, streams in sorted(result.streams.items()):
            found.extend(_stream_notes(f"{label} (c, round {n})", streams, expected_rate))
        found.extend(_reload_notes(label, result))
    return found


def _throughput_notes(where: str, throughput: Throughput, is_proxy: bool) -> list[str]:
    found = []
    if throughput.errors:
        found.append(f"{where}: {throughput.errors} wrk errors (non-2xx, resets, timeouts)")
    own = throughput.cpu_s / throughput.duration_s
    busy = throughput.core_busy[0] if throughput.core_busy else 0.0
    if is_proxy and busy - own > _FOREIGN_LOAD_WARN:
        found.append(
            f"{where}: core 0 was {busy:.0%} busy but the proxy used {own:.0%} of it: "
            "other work ran there (the machine is shared)"
        )
    return found


def _stream_notes(where: str, streams: Streams, expected_rate: float) -> list[str]:
    found = []
    if streams.completed < streams.streams:
        found.append(
            f"{where}: {streams.completed}/{streams.streams} streams completed "
            f"({'; '.join(streams.errors)})"
        )
    if streams.open_at_window_start < streams.streams:
        found.append(
            f"{where}: {streams.open_at_window_start}/{streams.streams} streams were open "
            "when the steady window began (the rest were still waiting for their first byte)"
        )
    if streams.events_per_s < 0.9 * expected_rate:
        found.append(
            f"{where}: {streams.events_per_s:,.0f} chunks/s reached the client, below the "
            f"{expected_rate:,.0f}/s sent"
        )
    if len(streams.core_busy) > 1 and streams.core_busy[1] > _LOAD_CORE_BUSY_WARN:
        found.append(
            f"{where}: the load core (backend and client) was {streams.core_busy[1]:.0%} "
            "busy, so its own queueing is in the TTFB figures"
        )
    return found
