"""The benchmark's view of the machine: child processes, /proc readings, ports, versions.

Rules:
1. Every process the benchmark starts goes through `Children`, which kills them all
   (their whole process group) when it exits, whether by return, exception or Ctrl-C.
2. CPU time is utime + stime of a process and its descendants, read from
   /proc/PID/stat (all threads included); memory is the sum of their VmRSS.
3. Ports are free ports on 127.0.0.1, asked of the kernel just before use.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = [
    "CLOCK_TICKS_PER_S",
    "Children",
    "CoreTimes",
    "cpu_seconds",
    "free_port",
    "machine_info",
    "positive_int",
    "process_tree",
    "rss_kib",
    "scrub_paths",
    "wait_for_port",
    "wait_until_quiet",
]

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
_STOP_GRACE_S = 3.0
_QUIET_BUSY = 0.25  # a core busier than this in a second is running other work
_PATH = re.compile(r"(?<![\w.])/[^\s:;,)]+")


# --- processes ---------------------------------------------------------------------------


class Children:
    """The processes started by the benchmark; all are killed when the context exits."""

    def __init__(self) -> None:
        self._running: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def start(
        self, argv: Sequence[str], *, core: int, log: Path, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `argv` pinned to `core`, its output to `log`, in its own process group."""
        with log.open("ab") as sink:
            process = subprocess.Popen(
                ["taskset", "-c", str(core), *argv],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
            )
        self._running.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after a grace period."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=_STOP_GRACE_S)
        # The group may outlive its leader (nginx's worker); kill it by its id either way.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=_STOP_GRACE_S)
        if process in self._running:
            self._running.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self._running)):
            self.stop(process)


def install_signal_exit() -> None:
    """Make SIGTERM and SIGHUP unwind like Ctrl-C, so every `finally` runs."""

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise)


def run_in_workdir(prefix: str, work: Callable[[Path], T]) -> Timed[T] | None:
    """Run `work` in a fresh temporary folder, with SIGTERM/SIGHUP unwinding like Ctrl-C;
    None when interrupted (every process the benchmark started is stopped by then)."""
    install_signal_exit()
    started = datetime.now().astimezone()
    clock = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            value = work(Path(tmp))
    except KeyboardInterrupt:
        print("\ninterrupted: every process the benchmark started has been stopped")
        return None
    return Timed(value, started, time.monotonic() - clock)


@dataclass(frozen=True)
class Timed(Generic[T]):
    """What a benchmark's work returned, when it began, and how long it took."""

    value: T
    started: datetime
    elapsed_s: float


def output_argument(parser: argparse.ArgumentParser, default: Path) -> None:
    """`--output PATH`: the page to write into (`default` after a full run; nothing after
    --quick unless given). Read it with `output_of`."""
    parser.add_argument(
        "--output",
        type=Path,
        help=f"put the section into this page (default: {default.name} after a full run; "
        "nothing after --quick)",
    )


def output_of(args: argparse.Namespace, default: Path) -> Path | None:
    return args.output if args.output is not None or args.quick else default


# --- /proc -------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and all its live descendants (found by parent id: this kernel may lack
    /proc/PID/task/TID/children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            parent = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found = [pid]
    index = 0
    while index < len(found):
        found.extend(children.get(found[index], ()))
        index += 1
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of `pids`, in seconds; a process that is gone counts 0."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            # Fields after the ")" that closes the command name: state is field 3,
            # utime field 14 and stime field 15 (proc(5)).
            fields = stat[stat.rindex(")") + 2 :].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS_PER_S


def rss_kib(pids: Sequence[int]) -> int:
    """The sum of VmRSS of `pids`, in KiB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


@dataclass(frozen=True, slots=True)
class CoreTimes:
    """Busy and total jiffies per core, from /proc/stat; subtract two to get a window."""

    busy: tuple[int, ...]
    total: tuple[int, ...]

    @classmethod
    def now(cls) -> CoreTimes:
        busy: list[int] = []
        total: list[int] = []
        for line in Path("/proc/stat").read_text().splitlines():
            if re.match(r"cpu\d+ ", line):
                values = [int(v) for v in line.split()[1:]]
                idle = values[3] + values[4]  # idle + iowait
                busy.append(sum(values[:8]) - idle)
                total.append(sum(values[:8]))
        return cls(tuple(busy), tuple(total))

    def busy_since(self, earlier: CoreTimes) -> tuple[float, ...]:
        """The share of time each core was busy since `earlier` (with anyone's work)."""
        return tuple(
            (b1 - b0) / max(t1 - t0, 1)
            for b0, b1, t0, t1 in zip(
                earlier.busy, self.busy, earlier.total, self.total, strict=True
            )
        )


# --- ports -------------------------------------------------------------------------------


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], *, timeout_s: float = 15.0) -> None:
    """Return once 127.0.0.1:`port` accepts connections; raise if `process` dies first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{_command(process)} exited with status {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{_command(process)} did not listen on port {port} within {timeout_s:g}s")


def _command(process: subprocess.Popen[bytes]) -> str:
    args = process.args
    return shlex.join(map(str, args)) if isinstance(args, list | tuple) else str(args)


# --- versions ----------------------------------------------------------------------------


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _command_version(argv: Sequence[str], pattern: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except OSError:
        return "not found"
    match = re.search(pattern, (done.stdout + done.stderr).decode(errors="replace"))
    return match.group(1) if match else "unknown"


def machine_info() -> dict[str, str]:
    """What the figures were measured on, for the report."""
    return {
        "CPU": _cpu_model(),
        "cores": str(os.cpu_count()),
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": sys.version.split()[0],
        "aiohttp": metadata.version("aiohttp"),
        "uvloop": metadata.version("uvloop"),
        "nginx": _command_version(["nginx", "-v"], r"nginx/(\S+)"),
        "wrk": _command_version(["wrk", "-v"], r"wrk (\S+)"),
    }


@contextlib.contextmanager
def pinned_to(core: int) -> Iterator[None]:
    """Run the calling process on `core` only, for the duration of the block."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# --- shared by the benchmark scripts ---------------------------------------------------------


def wait_until_quiet(wait_s: float) -> tuple[float, ...]:
    """Wait up to `wait_s` for other people's work to leave the cores (the machine is
    shared); each core's busy share in the last second waited."""
    deadline = time.monotonic() + wait_s
    while True:
        before = CoreTimes.now()
        time.sleep(1.0)
        busy = CoreTimes.now().busy_since(before)
        if max(busy) < _QUIET_BUSY:
            return busy
        if time.monotonic() > deadline:
            shares = "/".join(f"{share:.0%}" for share in busy)
            print(f"  (the cores are busy with other work: {shares}; measuring anyway)")
            return busy


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def scrub_paths(text: str) -> str:
    """One line, with every absolute path cut to its last part (the pages name no
    machine's directories)."""
    return _PATH.sub(lambda match: Path(match.group(0)).name, " ".join(text.split()))
