"""`canary-proxy run` as a process of its own, as a user starts it: for the tests of
several workers and of a fleet of replicas, where processes are killed and signalled.

The ports come from the log line the proxy writes once it listens (the config says
port 0), and the log is kept for the test to read.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

_READY = re.compile(
    r"listening on http://([\d.]+):(\d+)(?P<workers> with \d+ workers)?.*admin on http://([\d.]+):(\d+)"
)
_START_TIMEOUT_S = 20.0
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


class ProxyProcess:
    """A running `canary-proxy run -c CONFIG [--workers N]`."""

    def __init__(
        self, config: Path, *flags: str, workers: int = 1, env: dict[str, str] | None = None
    ) -> None:
        argv = [sys.executable, "-m", "proxy", "run", "-c", str(config), *flags]
        if workers != 1:
            argv += ["--workers", str(workers)]
        self.workers = workers
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.port = self.admin_port = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            self.kill()
            raise RuntimeError("the proxy did not start:\n" + self.log)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            match = _READY.search(line)
            # With workers, the supervisor's line (not a worker's) gives the admin port.
            if match and (self.workers == 1) == (match.group("workers") is None):
                self.port, self.admin_port = int(match.group(2)), int(match.group(5))
                self._ready.set()
        self._ready.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM, then wait; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._close()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self._close()

    def _close(self) -> None:
        self._reader.join(timeout=5)
        if self.process.stderr is not None:
            self.process.stderr.close()

    # --- the admin port -------------------------------------------------------------------

    async def admin(self, method: str, path: str, token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, self.admin_url + path, headers=headers) as response,
        ):
            body = await response.read()
            is_json = response.content_type == "application/json"
            return response.status, json.loads(body) if is_json else body.decode()

    async def status(self) -> dict[str, Any]:
        code, document = await self.admin("GET", "/api/status")
        assert code == 200, document
        return document  # type: ignore[no-any-return]

    async def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Every sample of the metric `name` on /metrics, with its labels."""
        code, text = await self.admin("GET", "/metrics")
        assert code == 200, text
        return [
            (sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        ]


@contextmanager
def proxy_processes(*configs: Path, workers: int = 1) -> Iterator[list[ProxyProcess]]:
    """Start one proxy per config; every one is killed at the end, whatever happened."""
    started: list[ProxyProcess] = []
    try:
        for config in configs:
            started.append(ProxyProcess(config, workers=workers))
        yield started
    finally:
        for proxy in started:
            proxy.kill()


async def send(
    session: aiohttp.ClientSession, url: str, user: str, *, new_connection: bool = True
) -> tuple[int, str]:
    """One chat request as `user`; its status and the variant that served it."""
    headers = {"x-user-id": user}
    if new_connection:
        headers["Connection"] = "close"  # a new connection: the kernel picks the worker
    async with session.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers) as r:
        await r.read()
        return r.status, r.headers.get("x-canary-variant", "?")
