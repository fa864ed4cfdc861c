"""The things measured: the fake backend, and the proxies put in front of it.

Rules:
1. A proxy under test runs on core 0 alone; the fake backend (and every load
   generator) runs on core 1.
2. Every target is started fresh, on free ports, from files written into the run's
   temp dir; nothing is written anywhere else.
3. `Running.pids` is the process tree whose CPU and memory count as the target's
   (nginx: master and worker); the direct target has none.
4. A telemetry target (`TELEMETRY_RATIOS`) gets its own OTLP sink (`otlp_sink.py`),
   started before it on the load core, like a collector on another machine: its CPU
   is not the target's. `stop_sink` stops it and returns what it received.
5. A canary-proxy target's config file stays valid and rewritable: `Running.config`
   names it, its route's weight sits on a line of its own, and `rewrite_weight`
   changes just that number (scenario (d); the proxy watches the file).
6. The hot-path targets (`HOT_TARGETS`, `hot_path.py`) run canary-proxy as the
   hot-path issue measured it: weight 10, every backend setting at its default (the
   connection pool included), no OTLP export; "before" from another source tree.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from otlp_sink import SinkCounts
from system import Children, free_port, process_tree, wait_for_port

__all__ = [
    "BEFORE_LABELS",
    "BEFORE_OFF",
    "BEFORE_RATIOS",
    "BENCH_DIR",
    "CANARY_ROUTE",
    "CANARY_SALT",
    "CANARY_WEIGHT",
    "HOT_TARGETS",
    "LABELS",
    "LOAD_CORE",
    "PROXY_CORE",
    "TARGETS",
    "TELEMETRY_RATIOS",
    "Running",
    "Sink",
    "rewrite_weight",
    "start_backend",
    "start_sink",
    "start_target",
    "stop_sink",
    "use_before_tree",
]

BENCH_DIR: Final = Path(__file__).resolve().parent
PROXY_CORE: Final = 0
LOAD_CORE: Final = 1

TARGETS: Final = {
    "direct": "backend direct",
    "nginx": "nginx",
    "baseline": "baseline (asyncio)",
    "baseline-uvloop": "baseline + uvloop",
    "canary-proxy": "canary-proxy",
    "canary-proxy-otel-0.01": "canary-proxy, traces 1%",
    "canary-proxy-otel-1": "canary-proxy, traces 100%",
}
"""Target name (for `--targets`) → the label in the table, in table order."""

HOT_TARGETS: Final = {
    "hot": "canary-proxy (defaults, weight 10)",
    "hot-before": "canary-proxy before (defaults, weight 10)",
}
"""`hot_path.py`'s canary-proxy targets (rule 6); "hot-before" needs `use_before_tree`."""
_HOT_WEIGHT: Final = 10.0

TELEMETRY_RATIOS: Final = {"canary-proxy-otel-0.01": 0.01, "canary-proxy-otel-1": 1.0}
"""The telemetry targets: canary-proxy's config plus OTLP export at this trace sample ratio."""

BEFORE_RATIOS: Final = {"before-otel-0.01": 0.01, "before-otel-1": 1.0}
"""`make bench-telemetry --before TREE`: the same telemetry targets, run from another
source tree (the code before a change), to set the two side by side in one run."""
BEFORE_OFF: Final = "before"
"""`make bench --before TREE`: canary-proxy with telemetry off, run from another source
tree, beside this tree's `canary-proxy` in the same rounds."""
BEFORE_LABELS: Final = {
    BEFORE_OFF: "canary-proxy before",
    "before-otel-0.01": "before, traces 1%",
    "before-otel-1": "before, traces 100%",
}
LABELS: Final = {**TARGETS, **BEFORE_LABELS, **HOT_TARGETS}
"""Every target's label, by name."""
_before_tree: list[Path] = []


def use_before_tree(tree: Path) -> None:
    """Run the `BEFORE_RATIOS` targets from the proxy package in `tree`."""
    if not (tree / "proxy" / "cli.py").exists():
        raise ValueError(f"{tree} has no proxy/cli.py: not a canary-proxy source tree")
    _before_tree[:] = [tree.resolve()]


# The baseline's pool is unlimited, nginx has none: canary-proxy gets room for every
# stream of (c) as well. 1024 is the default now; written out, so that code from before
# it (the default was 256, close to the ~250 streams each variant gets) runs alike.
_CANARY_MAX_CONNECTIONS: Final = 1024

CANARY_ROUTE: Final = "chat"
CANARY_SALT: Final = "chat"  # written into the config, so the harness can hash users itself
CANARY_WEIGHT: Final = 50.0  # the weight every canary-proxy target starts at
_WEIGHT_LINE: Final = re.compile(r"^(    rollout: \{weight: )([0-9.]+)(\}\n)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Sink:
    """A running `otlp_sink.py`: its endpoint, and the file it writes its counts to."""

    url: str
    process: subprocess.Popen[bytes]
    counts_path: Path


@dataclass(frozen=True, slots=True)
class Running:
    """A started target: where to send requests, and which processes to measure."""

    name: str
    url: str
    pids: tuple[int, ...]
    sink: Sink | None = None  # the OTLP receiver of a telemetry target (not measured)
    config: Path | None = None  # a canary-proxy target's config file (it watches it)
    admin_url: str | None = None  # a canary-proxy target's admin port


def _canary_proxy_command() -> str:
    beside_python = Path(sys.executable).with_name("canary-proxy")
    return str(beside_python) if beside_python.exists() else "canary-proxy"


def _before_command() -> list[str]:
    """This Python, running the proxy of the `--before` tree (its own dependencies are
    this environment's: the older code needs no package the newer lacks)."""
    if not _before_tree:
        raise ValueError("a before target needs use_before_tree() first")
    launch = (
        "import sys; sys.path.insert(0, sys.argv.pop(1)); "
        "from proxy.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return [sys.executable, "-c", launch, str(_before_tree[0])]


def start_backend(children: Children, workdir: Path, *, tokens_per_s: float) -> Running:
    """A `canary-proxy fake-backend` on the load core."""
    port = free_port()
    argv = [_canary_proxy_command(), "fake-backend", "--port", str(port)]
    argv += ["--tokens-per-s", f"{tokens_per_s:g}"]
    process = children.start(argv, core=LOAD_CORE, log=workdir / f"backend-{port}.log")
    wait_for_port(port, process)
    return Running("backend", f"http://127.0.0.1:{port}", (process.pid,))


def start_sink(children: Children, workdir: Path) -> Sink:
    """An `otlp_sink.py` on the load core."""
    port = free_port()
    counts_path = workdir / f"otlp-sink-{port}.json"
    argv = [sys.executable, str(BENCH_DIR / "otlp_sink.py"), "--port", str(port)]
    argv += ["--counts", str(counts_path)]
    process = children.start(argv, core=LOAD_CORE, log=workdir / f"otlp-sink-{port}.log")
    wait_for_port(port, process)
    return Sink(f"http://127.0.0.1:{port}", process, counts_path)


def stop_sink(children: Children, sink: Sink) -> SinkCounts:
    """Stop the sink (SIGTERM) and read what it received over its life."""
    children.stop(sink.process)
    try:
        return SinkCounts.from_json(json.loads(sink.counts_path.read_text()))
    except (OSError, ValueError, KeyError) as exc:
        raise RuntimeError(f"the OTLP sink left no counts ({exc})") from exc


def start_target(name: str, children: Children, workdir: Path, backend: Running) -> Running:
    """Start target `name` (a key of TARGETS) in front of `backend`; a telemetry target's
    OTLP sink first."""
    if name == "direct":
        return Running(name, backend.url, ())
    port = free_port()
    log = workdir / f"{name}-{port}.log"
    sink: Sink | None = None
    config: Path | None = None
    admin_url: str | None = None
    if name == "nginx":
        argv = _nginx_argv(workdir / f"nginx-{port}", port, backend.url)
    elif name in ("baseline", "baseline-uvloop"):
        argv = [sys.executable, str(BENCH_DIR / "baseline_proxy.py"), "--port", str(port)]
        argv += ["--upstream", backend.url]
        if name == "baseline-uvloop":
            argv.append("--uvloop")
    elif name in ("canary-proxy", BEFORE_OFF) or name in TELEMETRY_RATIOS or name in BEFORE_RATIOS:
        telemetry = ""
        ratios = {**TELEMETRY_RATIOS, **BEFORE_RATIOS}
        if name in ratios:
            sink = start_sink(children, workdir)
            telemetry = _telemetry_section(sink.url, ratios[name])
        admin_port = free_port()
        admin_url = f"http://127.0.0.1:{admin_port}"
        # A directory of its own: a port can come round again in a later round, and the
        # state store in the directory must start empty.
        directory = Path(tempfile.mkdtemp(prefix=f"canary-{port}-", dir=workdir))
        config = _write_canary_config(directory, port, admin_port, backend.url, telemetry)
        run = ["run", "-c", str(config), "--log-level", "warning"]
        argv = (
            [*_before_command(), *run] if name in BEFORE_LABELS else [_canary_proxy_command(), *run]
        )
    elif name in HOT_TARGETS:
        admin_port = free_port()
        admin_url = f"http://127.0.0.1:{admin_port}"
        directory = Path(tempfile.mkdtemp(prefix=f"canary-{port}-", dir=workdir))
        config = _write_canary_config(directory, port, admin_port, backend.url, defaults=True)
        run = ["run", "-c", str(config), "--log-level", "warning"]
        argv = (
            [*_before_command(), *run] if name == "hot-before" else [_canary_proxy_command(), *run]
        )
    else:
        raise ValueError(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")
    process = children.start(argv, core=PROXY_CORE, log=log, cwd=workdir)
    try:
        wait_for_port(port, process)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; its log: {_tail(log)}") from exc
    pids = process_tree(process.pid)
    # nginx's master listens before it forks its worker; measure both.
    deadline = time.monotonic() + 5
    while name == "nginx" and len(pids) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = process_tree(process.pid)
    return Running(name, f"http://127.0.0.1:{port}", tuple(pids), sink, config, admin_url)


def _nginx_argv(directory: Path, port: int, upstream_url: str) -> list[str]:
    directory.mkdir()
    # As root, nginx's worker would run as "nobody" and could not use this temp dir.
    user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""
    text = (BENCH_DIR / "nginx.conf.template").read_text()
    fields = {
        "@USER@": user,
        "@DIR@": str(directory),
        "@PORT@": str(port),
        "@UPSTREAM_PORT@": upstream_url.rsplit(":", 1)[1],
    }
    for placeholder, value in fields.items():
        text = text.replace(placeholder, value)
    conf = directory / "nginx.conf"
    conf.write_text(text)
    error_log = str(directory / "error.log")
    return ["nginx", "-p", str(directory), "-c", str(conf), "-e", error_log]


def _telemetry_section(endpoint: str, ratio: float) -> str:
    return f'telemetry: {{otlp_endpoint: "{endpoint}", trace_sample_ratio: {ratio:g}}}\n'


def _write_canary_config(
    directory: Path,
    port: int,
    admin_port: int,
    backend_url: str,
    telemetry: str = "",
    *,
    defaults: bool = False,
) -> Path:
    """One route, stable and canary both the fake backend, 50/50 by x-user-id (salt
    given, so the harness can compute who is in the canary); then `telemetry`, a config
    section (empty: no OTLP export; metrics are recorded anyway). `defaults`: weight
    10 and the backends' settings left at their defaults (rule 6)."""
    config = directory / "canary.yaml"
    pool = "" if defaults else f", max_connections: {_CANARY_MAX_CONNECTIONS}"
    weight = _HOT_WEIGHT if defaults else CANARY_WEIGHT
    config.write_text(
        f"""# Written by tests/bench/run.py: one route, both variants on one fake backend.
listen: 127.0.0.1:{port}
admin: {{listen: "127.0.0.1:{admin_port}"}}
backends:
  stable: {{url: "{backend_url}"{pool}}}
  canary: {{url: "{backend_url}"{pool}}}
routes:
  - name: {CANARY_ROUTE}
    match: {{path_prefix: /}}
    stable: stable
    canary: canary
    sticky: {{keys: ["header:x-user-id"], salt: {CANARY_SALT}}}
    rollout: {{weight: {weight:g}}}
state: {{store: sqlite, path: "{directory / "canary-state.db"}"}}
{telemetry}"""
    )
    return config


def rewrite_weight(config: Path, weight: float) -> None:
    """Rewrite the route's weight in place, as an operator's edit would.

    The file is written over, not replaced (same inode). When the new text is as long as
    the old (10 ↔ 60), one write() over the old bytes, without truncating first, so the
    proxy's watcher can never catch the file empty or half written."""
    old = config.read_bytes()
    new, count = _WEIGHT_LINE.subn(rf"\g<1>{weight:g}\g<3>", old.decode())
    if count != 1:
        raise RuntimeError(f"{config}: expected one `rollout: {{weight: N}}` line, found {count}")
    data = new.encode()
    flags = os.O_WRONLY if len(data) == len(old) else os.O_WRONLY | os.O_TRUNC
    fd = os.open(config, flags)
    try:
        written = os.write(fd, data)
    finally:
        os.close(fd)
    if written != len(data):
        raise OSError(f"{config}: wrote {written} of {len(data)} bytes")


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
