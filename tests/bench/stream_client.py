"""The load generator of scenario (c): many concurrent streamed chat completions.

It owns the streaming measurement, so the counts and the /proc readings are taken at
the same instants: it opens `--streams` streams through the target (ramped evenly over
`--ramp-s`), times each stream's first body byte, counts the SSE events received, and,
over the steady window in which every stream is open, reads the CPU time of the
process tree `--pid` (the proxy under test) and samples its RSS. It prints one line,
`BENCH_JSON {...}`, for `run.py`.

Steady window: from `--ramp-s + --settle-s` after the first stream started until
half a second before the first stream is due to end (`--tokens / --tokens-per-s`).

Why asyncio protocols on uvloop and not aiohttp's client: this process shares core 1
with the fake backend, which spends ~18 µs of it per chunk. aiohttp's client spends
another ~16 µs per chunk, so at 25,000 chunks/s core 1 saturated and its own queueing
swamped the time to first byte (backend direct: p50 60-190 ms at the end of the ramp,
instead of ~2 ms). A protocol that sends one HTTP/1.1 request per connection and only
counts the bytes it gets back costs about a third less, and TTFB stays ~1-3 ms.

    python stream_client.py --url http://127.0.0.1:8080 --pid 1234 [--streams 500]

Everything is bounded: each stream times out at three times its expected length, and
the whole run at that plus a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Final, cast
from urllib.parse import urlsplit

import uvloop
from system import CoreTimes, cpu_seconds, process_tree, rss_kib

__all__ = ["SETTLE_S", "TAIL_S", "StreamReport", "main"]

PATH: Final = "/v1/chat/completions"
_END: Final = b"data: [DONE]\n\n\r\n0\r\n\r\n"  # the last event, then the last chunk
_HEAD_END: Final = b"\r\n\r\n"
_RSS_SAMPLE_S: Final = 0.25
_WARMUP_TOKENS: Final = 10
_IDLE_AFTER_WARMUP_S: Final = 1.0
SETTLE_S: Final = 1.0  # after the ramp, before the steady window
TAIL_S: Final = 0.5  # the steady window ends this long before the first stream is due to end


@dataclass
class _Counters:
    """Shared by every stream; read by the window sampler."""

    open: int = 0
    events: int = 0
    reads: int = 0


class _StreamProtocol(asyncio.Protocol):
    """One request, one chunked SSE response: time its first body byte, count its events.

    `done` gets None when the response was 200 and ended with [DONE] and the last
    chunk, else what went wrong. Events are counted by their blank line (b"\\n\\n"),
    which chunk framing (b"\\r\\n") never forms.
    """

    def __init__(
        self, request: bytes, counters: _Counters, ttfbs: list[float], started: float
    ) -> None:
        self.request = request
        self.counters = counters
        self.ttfbs = ttfbs
        self.started = started
        self.done: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.BaseTransport | None = None
        self.head = b""
        self.in_body = False
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but they write.
        self.transport = transport
        cast(asyncio.WriteTransport, transport).write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            end = self.head.find(_HEAD_END)
            if end < 0:
                return
            status_line = self.head[: self.head.find(b"\r\n")]
            if status_line.split(b" ", 2)[1:2] != [b"200"]:
                self._finish(f"status line {status_line.decode(errors='replace')!r}")
                return
            data = self.head[end + len(_HEAD_END) :]
            self.in_body = True
            self.counters.open += 1
            if not data:
                return
        if not self.tail:
            self.ttfbs.append(time.perf_counter() - self.started)
        counters = self.counters
        # An event's blank line may straddle two reads.
        counters.events += (self.tail[-1:] + data).count(b"\n\n")
        counters.reads += 1
        self.tail = (self.tail + data)[-len(_END) :]
        if self.tail == _END:
            self._finish(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(f"connection closed before the end ({exc or 'EOF'})")

    def _finish(self, outcome: str | None) -> None:
        if self.done.done():
            return
        if self.in_body:
            self.counters.open -= 1
        self.done.set_result(outcome)
        if self.transport is not None:
            self.transport.close()


def _request(host: str, user: str, body: bytes) -> bytes:
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"x-user-id: {user}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _chat_body(tokens: int) -> bytes:
    return json.dumps(
        {
            "model": "fake-model",
            "stream": True,
            "max_tokens": tokens,
            "messages": [{"role": "user", "content": "Tell me a long story. " * 8}],
        },
        separators=(",", ":"),
    ).encode()


async def _stream(
    address: tuple[str, int],
    user: str,
    body: bytes,
    counters: _Counters,
    ttfbs: list[float],
    timeout_s: float,
) -> str | None:
    """One streamed completion; None when it ended with [DONE], else what went wrong."""
    loop = asyncio.get_running_loop()
    request = _request(f"{address[0]}:{address[1]}", user, body)
    started = time.perf_counter()
    protocol = _StreamProtocol(request, counters, ttfbs, started)
    try:
        await asyncio.wait_for(loop.create_connection(lambda: protocol, *address), timeout_s)
    except (OSError, TimeoutError) as exc:
        return f"cannot connect: {exc.__class__.__name__}: {exc}"
    await asyncio.wait({protocol.done}, timeout=timeout_s)
    protocol._finish(f"no end within {timeout_s:g}s")  # a no-op if it has ended
    return protocol.done.result()


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile `share` (0-1) of `values`; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, round(share * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class StreamReport:
    """What `run.py` reads back (all times in milliseconds unless named otherwise)."""

    streams: int
    warmup_streams: int = 0
    completed: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    ttfb_p50_ms: float = 0.0
    ttfb_p99_ms: float = 0.0
    window_s: float = 0.0
    window_events: int = 0
    window_reads: int = 0
    window_cpu_s: float = 0.0
    window_client_cpu_s: float = 0.0  # this process's own, to see how loaded the load core was
    open_at_window_start: int = 0
    open_at_window_end: int = 0
    rss_idle_kib: int = 0
    rss_open_kib: int = 0
    core_busy: list[float] = field(default_factory=list)


async def measure(args: argparse.Namespace) -> StreamReport:
    """Warm up, note the idle RSS, then run the streams and measure the steady window."""
    split = urlsplit(args.url)
    address = (split.hostname or "127.0.0.1", split.port or 80)
    stream_s = args.tokens / args.tokens_per_s
    timeout_s = 3 * stream_s + 10
    pids = process_tree(args.pid) if args.pid else []
    report = StreamReport(streams=args.streams, warmup_streams=args.warmup_streams)
    loop = asyncio.get_running_loop()

    warm_body = _chat_body(_WARMUP_TOKENS)
    warmups = (
        _stream(address, f"warmup-{i}", warm_body, _Counters(), [], timeout_s)
        for i in range(args.warmup_streams)
    )
    await asyncio.gather(*warmups)
    await asyncio.sleep(_IDLE_AFTER_WARMUP_S)
    report.rss_idle_kib = rss_kib(pids)

    counters = _Counters()
    ttfbs: list[float] = []
    body = _chat_body(args.tokens)
    t0 = loop.time()

    async def ramped(index: int) -> str | None:
        await asyncio.sleep(index * args.ramp_s / args.streams)
        return await _stream(address, f"user-{index}", body, counters, ttfbs, timeout_s)

    tasks = [asyncio.create_task(ramped(i)) for i in range(args.streams)]
    await asyncio.sleep(t0 + args.ramp_s + args.settle_s - loop.time())
    report.open_at_window_start = counters.open
    window_started = loop.time()
    cpu_before, events_before, reads_before = cpu_seconds(pids), counters.events, counters.reads
    own_before = time.process_time()
    cores_before = CoreTimes.now()
    rss_peak = 0
    window_end = t0 + stream_s - TAIL_S
    while loop.time() < window_end:
        rss_peak = max(rss_peak, rss_kib(pids))
        await asyncio.sleep(min(_RSS_SAMPLE_S, max(0.0, window_end - loop.time())))
    report.window_cpu_s = cpu_seconds(pids) - cpu_before
    report.window_client_cpu_s = time.process_time() - own_before
    report.window_events = counters.events - events_before
    report.window_reads = counters.reads - reads_before
    report.window_s = loop.time() - window_started
    report.core_busy = list(CoreTimes.now().busy_since(cores_before))
    report.open_at_window_end = counters.open
    report.rss_open_kib = rss_peak

    outcomes = await asyncio.gather(*tasks)
    report.completed = sum(1 for outcome in outcomes if outcome is None)
    report.failed = len(outcomes) - report.completed
    report.errors = sorted({outcome for outcome in outcomes if outcome is not None})[:5]
    report.ttfb_p50_ms = percentile(ttfbs, 0.50) * 1000
    report.ttfb_p99_ms = percentile(ttfbs, 0.99) * 1000
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the target's base URL, http://host:port")
    parser.add_argument("--pid", type=int, default=0, help="the process tree to measure")
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--ramp-s", type=float, default=1.0)
    parser.add_argument("--settle-s", type=float, default=SETTLE_S)
    parser.add_argument("--tokens", type=int, default=500, help="tokens per stream")
    parser.add_argument("--tokens-per-s", type=float, default=50.0, help="the backend's rate")
    parser.add_argument("--warmup-streams", type=int, default=20)
    args = parser.parse_args(argv)
    stream_s = args.tokens / args.tokens_per_s
    if stream_s - TAIL_S - args.ramp_s - args.settle_s < 0.5:
        parser.error("the streams are too short for a steady window; raise --tokens")
    deadline_s = 3 * stream_s + 60
    report = uvloop.run(asyncio.wait_for(measure(args), deadline_s))
    print("BENCH_JSON " + json.dumps(asdict(report)), flush=True)


if __name__ == "__main__":
    main()
