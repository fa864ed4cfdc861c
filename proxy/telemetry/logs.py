"""Log lines: text or JSON, with the trace of the request they belong to; and the access log.

Rules:
1. `configure` sets up the process's one stderr handler, in the config's
   `telemetry.log_format` (`text` or `json`); a reload may change it (`set_format`).
2. Every record logged while a request is served carries `trace_id` and `span_id`: the
   request's server span when it is sampled, the incoming `traceparent`'s trace and
   span when it is not; empty outside a request. The request path sets one context
   variable per request (`REQUEST`); the ids are read only when a line is written.
3. `json`: one object per line with `time`, `level`, `logger`, `message`, `trace_id`,
   `span_id`, `worker` and, on an access line, its fields.
4. The access log (logger `proxy.access`, INFO): one line per request for the share of
   requests `telemetry.access_log` says (0, the default: none), sampled at random:
   method, path, route, variant, status, durations, tokens, trace id. Never the query
   string, a user key or a header's value.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any, Final, Protocol, TextIO

from proxy.config.model import LogFormat
from proxy.telemetry.tracing import TraceContext, parse_traceparent

__all__ = [
    "ACCESS_LOGGER",
    "REQUEST",
    "JsonFormatter",
    "TextFormatter",
    "access_line",
    "configure",
    "install_trace_ids",
    "set_format",
    "trace_ids",
]

ACCESS_LOGGER: Final = "proxy.access"
_TEXT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Traced(Protocol):
    """A request being served, as `proxy.telemetry.recorder.Exchange` is."""

    @property
    def trace(self) -> TraceContext | None: ...

    @property
    def traceparent(self) -> str | None: ...


REQUEST: ContextVar[Traced | None] = ContextVar("canary_proxy_request", default=None)
"""The request the current task serves: set (and reset) once per request (rule 2)."""
_handler: list[logging.Handler] = []
_worker: list[int | None] = [None]


def trace_ids() -> tuple[str, str]:
    """(trace id, span id) in hex of the request being served, or two empty strings."""
    current = REQUEST.get()
    if current is None:
        return "", ""
    trace = current.trace
    if trace is not None:
        return f"{trace.trace_id:032x}", f"{trace.server_span_id:016x}"
    parent = parse_traceparent(current.traceparent)
    if parent is None:
        return "", ""
    return f"{parent[0]:032x}", f"{parent[1]:016x}"


def install_trace_ids() -> None:
    """Give every log record of the process `trace_id` and `span_id` (rule 2)."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "canary_proxy_trace_ids", False):
        return

    def with_trace_ids(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.trace_id, record.span_id = trace_ids()
        return record

    with_trace_ids.canary_proxy_trace_ids = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(with_trace_ids)


class TextFormatter(logging.Formatter):
    """The usual line, then `trace_id=... span_id=...` when the line has a trace."""

    def __init__(self, worker: int | None = None) -> None:
        prefix = f"[worker {worker}] " if worker is not None else ""
        super().__init__(_TEXT.replace("%(name)s", prefix + "%(name)s"))

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        trace_id = getattr(record, "trace_id", "")
        if trace_id:
            line += f" trace_id={trace_id} span_id={getattr(record, 'span_id', '')}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line (rule 3)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, object] = {
            "time": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace_id = getattr(record, "trace_id", "")
        if trace_id:
            document["trace_id"] = trace_id
            document["span_id"] = getattr(record, "span_id", "")
        if self._worker is not None:
            document["worker"] = self._worker
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            document.update(access)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, separators=(",", ":"), default=str)


def _iso(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def _formatter(log_format: LogFormat, worker: int | None) -> logging.Formatter:
    return JsonFormatter(worker) if log_format is LogFormat.JSON else TextFormatter(worker)


def configure(
    level: str,
    log_format: LogFormat = LogFormat.TEXT,
    *,
    worker: int | None = None,
    stream: TextIO | None = None,
) -> None:
    """The process's logging: one handler on stderr, in `log_format` (rule 1)."""
    install_trace_ids()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_formatter(log_format, worker))
    root = logging.getLogger()
    for old in _handler:
        root.removeHandler(old)
    _handler[:] = [handler]
    _worker[0] = worker
    root.addHandler(handler)
    root.setLevel(level.upper())


def set_format(log_format: LogFormat) -> None:
    """A reload's `telemetry.log_format`, from the next line on (nothing when not configured)."""
    for handler in _handler:
        handler.setFormatter(_formatter(log_format, _worker[0]))


def access_line(fields: dict[str, object]) -> tuple[str, dict[str, object]]:
    """The access log's message and its `extra` (rule 4)."""
    text = " ".join(f"{key}={value}" for key, value in fields.items() if value is not None)
    return text, {"access": {k: v for k, v in fields.items() if v is not None}}
