"""Where a proxy's CPU goes under load (a) or (c): a py-spy profile, summarised.

It owns the profiling recipe, so the proxy's author can rerun it after a change:
start the fake backend and one target exactly as `run.py` does (same cores, same
config), drive scenario (a) with wrk or (c) with `stream_client.py`, sample the target
with `py-spy record` meanwhile, then print the top functions by own time (the leaf
frame of each sample) and by total time (anywhere on the stack), and the total time
spent in each file of `proxy/`. Every proxy target of `run.py` can be profiled; a
telemetry target (`canary-proxy-otel-0.01`, `canary-proxy-otel-1`) gets its OTLP sink
on the load core as in `run.py`, so the export is part of the profile.

py-spy is not a dependency of the project; install it into the venv first:

    .venv/bin/pip install py-spy
    .venv/bin/python tests/bench/pyspy_profile.py --target canary-proxy --scenario a
    .venv/bin/python tests/bench/pyspy_profile.py --target canary-proxy-otel-1 --scenario a

py-spy pauses the target for each sample (exact stacks; the target runs a little
slower). With `--nonblocking` it reads the target's memory while it runs, which is
cheaper but lands samples on the wrong frame often enough to mislead (in scenario (c)
it moved the SSE end scan's time onto the next line). Do not compare figures taken
under a profiler with `run.py`'s.
Time spent in C (uvloop, aiohttp's parser, the kernel) counts against the Python
frame that called it.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from scenarios import FULL, THROUGHPUT_CONNECTIONS
from system import Children
from targets import BENCH_DIR, LOAD_CORE, TARGETS, TELEMETRY_RATIOS, start_backend, start_target

__all__ = ["main", "summarise"]

_RATE_HZ: Final = 200
_FRAME: Final = re.compile(r"^(?P<function>.*?) \((?P<path>[^()]*?)(?::(?P<line>\d+))?\)$")
_SITE_PACKAGES: Final = re.compile(r".*/(?:site|dist)-packages/")


def _parts(frame: str) -> tuple[str, str, str]:
    """`readany (/…/site-packages/aiohttp/streams.py:123)` → (`readany`, `aiohttp/streams.py`,
    `123`)."""
    match = _FRAME.match(frame)
    if match is None:
        return frame, "", ""
    path, line = match["path"], match["line"] or ""
    path = _SITE_PACKAGES.sub("", path)
    path = re.sub(r".*/lib/python3\.\d+/", "", path)
    path = re.sub(r".*/(proxy|tests)/", r"\1/", path)
    return match["function"], path, line


def _package(path: str) -> str:
    if not path:
        return "(native)"
    head = path.split("/", 1)[0]
    return head.removesuffix(".py") if "/" in path or head.endswith(".py") else head


def summarise(raw: str, top: int) -> str:
    """The top functions of a py-spy `--format raw` profile: by own samples, by package,
    by line inside the project (`proxy/`), by total samples, and the total samples of
    each file of the project."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    project_lines: collections.Counter[str] = collections.Counter()
    project_total: collections.Counter[str] = collections.Counter()
    project_files: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_parts(frame) for frame in stack.split(";")]
        samples += count
        function, path, number = frames[-1]
        own[f"{function} ({path})"] += count
        packages[_package(path)] += count
        if path.startswith("proxy/"):
            project_lines[f"{path}:{number} in {function}"] += count
        for name in {f"{f} ({p})" for f, p, _ in frames}:
            total[name] += count
            if "(proxy/" in name and "(proxy/cli.py)" not in name:
                project_total[name] += count
        for path in {p for _, p, _ in frames if p.startswith("proxy/") and p != "proxy/cli.py"}:
            project_files[path] += count
    if not samples:
        return "no samples (was the target busy? is py-spy allowed to read it?)"

    def block(title: str, counter: collections.Counter[str], n: int) -> list[str]:
        rows = [f"  {count / samples:6.1%}  {name}" for name, count in counter.most_common(n)]
        return ["", title, *rows]

    lines = [f"{samples} samples at {_RATE_HZ} Hz (idle time excluded)"]
    lines += block(f"top {top} by own time:", own, top)
    lines += block("own time by package:", packages, 10)
    lines += block("own time by line, in proxy/:", project_lines, 10)
    lines += block("total time of the functions in proxy/ (inclusive):", project_total, top)
    lines += block("total time by file, in proxy/ (inclusive):", project_files, top)
    lines += block(f"top {top} by total time (inclusive; coroutine stacks may be cut):", total, top)
    return "\n".join(lines)


def _record(pid: int, seconds: int, output: Path, *, blocking: bool) -> subprocess.Popen[bytes]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    argv = ["taskset", "-c", str(LOAD_CORE), py_spy, "record", "--pid", str(pid)]
    argv += ["--duration", str(seconds), "--rate", str(_RATE_HZ)]
    if not blocking:
        argv.append("--nonblocking")
    argv += ["--format", "raw", "--output", str(output)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _load(scenario: str, url: str, seconds: int) -> subprocess.Popen[bytes]:
    if scenario == "a":
        argv = ["wrk", "-t1", f"-c{THROUGHPUT_CONNECTIONS}", f"-d{seconds}s"]
        argv += ["-s", str(BENCH_DIR / "post.lua"), url]
    else:
        tokens = int((seconds + 4) * FULL.stream_tokens_per_s)
        argv = [sys.executable, str(BENCH_DIR / "stream_client.py"), "--url", url]
        argv += ["--streams", str(FULL.streams), "--tokens", str(tokens)]
    return subprocess.Popen(
        ["taskset", "-c", str(LOAD_CORE), *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def profile(target_name: str, scenario: str, seconds: int, top: int, *, blocking: bool) -> str:
    """Run the recipe and return the summary."""
    tokens_per_s = 0.0 if scenario == "a" else FULL.stream_tokens_per_s
    with tempfile.TemporaryDirectory(prefix="canary-profile-") as tmp, Children() as children:
        workdir = Path(tmp)
        backend = start_backend(children, workdir, tokens_per_s=tokens_per_s)
        target = start_target(target_name, children, workdir, backend)
        load = _load(scenario, target.url, seconds)
        try:
            # (a): let wrk connect; (c): let the streams ramp up (see stream_client.py).
            time.sleep(1.0 if scenario == "a" else 3.5)
            output = workdir / "profile.raw"
            recorder = _record(target.pids[-1], seconds - 2, output, blocking=blocking)
            _, errors = recorder.communicate(timeout=seconds + 30)
            if recorder.returncode != 0:
                raise RuntimeError(f"py-spy failed: {errors.decode(errors='replace')[-500:]}")
        finally:
            if load.poll() is None:
                load.terminate()
            load.wait(timeout=30)
        return summarise(output.read_text(), top)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Every Python proxy, the telemetry targets (canary-proxy with OTLP export) included.
    proxies = [name for name in TARGETS if name not in ("direct", "nginx")]
    assert set(TELEMETRY_RATIOS) <= set(proxies)
    parser.add_argument("--target", choices=proxies, default="canary-proxy")
    parser.add_argument("--scenario", choices=("a", "c"), default="a")
    parser.add_argument("--seconds", type=int, default=12, help="load duration (default 12)")
    parser.add_argument("--top", type=int, default=15, help="functions to list (default 15)")
    parser.add_argument(
        "--nonblocking",
        action="store_true",
        help="sample without pausing the target: cheaper, but samples can land on the wrong line",
    )
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {LOAD_CORE})
    print(f"{args.target}, scenario ({args.scenario}):")
    blocking = not args.nonblocking
    print(profile(args.target, args.scenario, args.seconds, args.top, blocking=blocking))
    return 0


if __name__ == "__main__":
    sys.exit(main())
