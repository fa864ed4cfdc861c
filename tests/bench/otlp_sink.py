"""A stand-in for Jaeger or a Collector: an OTLP/HTTP receiver that counts and discards.

It owns the far end of the telemetry targets (`canary-proxy-otel-*` in `targets.py`):
the proxy exports its spans and metrics here, over the same kind of connection and
with the same protobuf bodies it would send to a real collector, so the proxy's side
of the export is measured in full; this process runs on the load core and its CPU is
not the proxy's.

It accepts `POST /v1/traces` and `POST /v1/metrics`, reads each body, answers 200 with
an empty `Export…ServiceResponse` (an empty protobuf body), and counts posts, bytes
and, in trace bodies, spans (by walking the wire format down to
ExportTraceServiceRequest.resource_spans[].scope_spans[].spans[], without decoding
the spans themselves). On SIGTERM or SIGINT it writes its counts as one JSON line to
`--counts` (when given) and to stdout, as `SINK_JSON {...}`, then exits.

    python otlp_sink.py --port 4318 [--counts counts.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from aiohttp import web

__all__ = ["MARK", "SinkCounts", "count_spans", "main"]

MARK: Final = "SINK_JSON "
_EMPTY_PROTOBUF: Final = {"Content-Type": "application/x-protobuf"}
_LENGTH_DELIMITED: Final = 2


@dataclass
class SinkCounts:
    """What the sink received over its life."""

    trace_posts: int = 0
    trace_bytes: int = 0
    spans: int = 0
    metric_posts: int = 0
    metric_bytes: int = 0
    undecodable: int = 0  # trace bodies whose wire format could not be walked
    cpu_s: float = 0.0  # the sink's own CPU time (on the load core)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SinkCounts:
        return cls(
            trace_posts=int(data["trace_posts"]),
            trace_bytes=int(data["trace_bytes"]),
            spans=int(data["spans"]),
            metric_posts=int(data["metric_posts"]),
            metric_bytes=int(data["metric_bytes"]),
            undecodable=int(data["undecodable"]),
            cpu_s=float(data["cpu_s"]),
        )


# --- the wire format ---------------------------------------------------------------------


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """The varint at `at`, and the offset after it."""
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field in data[start:end];
    other wire types are skipped."""
    at = start
    while at < end:
        key, at = _varint(data, at)
        wire_type = key & 7
        if wire_type == _LENGTH_DELIMITED:
            length, at = _varint(data, at)
            if at + length > end:
                raise ValueError("field runs past its message")
            yield key >> 3, at, at + length
            at += length
        elif wire_type == 0:
            _, at = _varint(data, at)
        elif wire_type == 1:
            at += 8
        elif wire_type == 5:
            at += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
    if at != end:
        raise ValueError("message ends inside a field")


def count_spans(body: bytes) -> int:
    """The spans in an ExportTraceServiceRequest: resource_spans = 1, scope_spans = 2,
    spans = 2."""
    spans = 0
    for field, start, end in _fields(body, 0, len(body)):
        if field != 1:
            continue
        for field2, start2, end2 in _fields(body, start, end):
            if field2 != 2:
                continue
            spans += sum(1 for field3, _, _ in _fields(body, start2, end2) if field3 == 2)
    return spans


# --- the server --------------------------------------------------------------------------


class _Sink:
    def __init__(self) -> None:
        self.counts = SinkCounts()

    async def traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        counts = self.counts
        counts.trace_posts += 1
        counts.trace_bytes += len(body)
        try:
            counts.spans += count_spans(body)
        except (ValueError, IndexError):
            counts.undecodable += 1
        return web.Response(body=b"", headers=_EMPTY_PROTOBUF)

    async def metrics(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.counts.metric_posts += 1
        self.counts.metric_bytes += len(body)
        return web.Response(body=b"", headers=_EMPTY_PROTOBUF)


async def serve(host: str, port: int, counts_path: Path | None) -> SinkCounts:
    """Receive until SIGTERM or SIGINT; write and return the counts."""
    sink = _Sink()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", sink.traces)
    app.router.add_post("/v1/metrics", sink.metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"otlp sink listening on http://{host}:{port}", flush=True)
    await stop.wait()
    counts = sink.counts
    counts.cpu_s = time.process_time()
    # The counts go out before the cleanup, which may wait on the client's connections.
    line = json.dumps(asdict(counts))
    if counts_path is not None:
        partial = counts_path.with_suffix(".partial")
        partial.write_text(line + "\n")
        partial.replace(counts_path)
    print(MARK + line, flush=True)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0):
            await runner.cleanup()
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--counts", type=Path, help="write the counts here on SIGTERM")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port, args.counts))
    else:
        uvloop.run(serve(args.host, args.port, args.counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
