"""`canary-proxy run --workers N`: N proxy processes on one port, and one admin port.

One Python process serves one core. The supervisor binds the public address N times
with SO_REUSEPORT (the kernel spreads new connections over the N sockets) and one
private admin socket per worker on loopback, then starts a worker process for each
(`proxy.server.worker`), which inherits its two sockets. The workers agree through the state
store like replicas do: one controller decides, every worker serves its decision.

The supervisor's own admin port (`admin.listen`) answers for the set:
- `/healthz`: the supervisor runs; `/readyz`: every worker is ready;
- `/metrics`: every worker's series, each with a `worker` label (`proxy.telemetry.exposition`);
- `POST /api/reload`: every worker reloads; the answer says how each did;
- `/api/status`: one worker's (which sees every worker's stats and heartbeat through
  the store), with the supervisor's list of workers added;
- anything else (`/api/assign`, operator actions): one worker's answer, as it is.

Rules:
1. A worker that dies is started again (after 0.5 s, doubling to 10 s while it keeps
   dying young) on the same socket, which the supervisor holds open meanwhile, so
   connections waiting in its queue are served by the new worker.
2. SIGHUP is passed to every worker. SIGTERM and SIGINT drain: the supervisor closes
   its copies of the public sockets, /readyz turns 503, every worker gets SIGTERM and
   drains as it would alone; one still running `shutdown_grace` + 5 s later is killed.
3. A request to a worker's admin that fails answers 502 with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Final

import aiohttp
from aiohttp import web

from proxy.config.model import Config, ListenAddress
from proxy.http.serverlog import NetworkErrorLog, one_line_network_errors
from proxy.telemetry.exposition import WORKER_ACCEPT, merge_expositions

__all__ = ["Supervisor", "supervise"]

log = logging.getLogger("proxy.server.supervisor")

_RESTART_FIRST_S: Final = 0.5
_RESTART_MAX_S: Final = 10.0
_YOUNG_S: Final = 30.0  # a worker that dies younger than this restarts later each time
_KILL_AFTER_GRACE_S: Final = 5.0
_WORKER_TIMEOUT: Final = aiohttp.ClientTimeout(total=10.0)
_READY_TIMEOUT_S: Final = 30.0
# A worker's admin socket outlives the worker (rule 1): a probe must not wait long on it.
_PROBE_TIMEOUT_S: Final = 1.0
_FORWARDED_HEADERS: Final = ("Authorization", "Content-Type", "Accept")


@dataclass
class Worker:
    """One worker process and the two sockets it inherits."""

    index: int
    public: socket.socket
    admin: socket.socket
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = _RESTART_FIRST_S
    exits: list[int] = field(default_factory=list)

    @property
    def admin_url(self) -> str:
        host, port = self.admin.getsockname()[:2]
        return f"http://{host}:{port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def describe(self) -> dict[str, object]:
        return {
            "worker": self.index,
            "pid": self.process.pid if self.process is not None else None,
            "alive": self.alive,
            "restarts": self.restarts,
            "started_at": self.started_at,
            "admin": self.admin_url,
        }


class Supervisor:
    """Starts, watches and stops the workers; serves the admin port for them all."""

    def __init__(
        self, config: Config, workers: int, *, watch: bool = True, log_level: str = "info"
    ) -> None:
        self.config = config
        self.count = workers
        self.watch = watch
        self.log_level = log_level
        self.workers: list[Worker] = []
        self.port: int | None = None
        self.admin_port: int | None = None
        self.draining = False
        self._monitors: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    # --- start ----------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind, start every worker, wait until all are ready; the public port."""
        publics = _reuseport_sockets(self.config.listen, self.count)
        self.port = publics[0].getsockname()[1]
        for index, public in enumerate(publics):
            admin = socket.create_server(("127.0.0.1", 0))
            admin.set_inheritable(True)
            self.workers.append(Worker(index, public, admin))
        self._session = aiohttp.ClientSession(timeout=_WORKER_TIMEOUT)
        for worker in self.workers:
            await self._spawn(worker)
            self._monitors.append(asyncio.get_running_loop().create_task(self._monitor(worker)))
        await self._wait_ready()
        self._runner = web.AppRunner(self._admin_app(), access_log=None)
        await self._runner.setup()
        address = self.config.admin.listen
        site = web.TCPSite(self._runner, address.host, address.port)
        await site.start()
        self.admin_port = _bound_port(self._runner)
        return self.port

    async def _spawn(self, worker: Worker) -> None:
        argv = [
            sys.executable,
            "-m",
            "proxy.server.worker",
            self.config.source,
            "--index",
            str(worker.index),
            "--listen-fd",
            str(worker.public.fileno()),
            "--admin-fd",
            str(worker.admin.fileno()),
            "--log-level",
            self.log_level,
            *(() if self.watch else ("--no-watch",)),
        ]
        worker.process = await asyncio.create_subprocess_exec(
            *argv, pass_fds=(worker.public.fileno(), worker.admin.fileno())
        )
        worker.started_at = time.time()
        log.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    async def _monitor(self, worker: Worker) -> None:
        """Start the worker again whenever it exits, until the set drains (rule 1)."""
        while True:
            process = worker.process
            assert process is not None
            code = await process.wait()
            if self.draining:
                return
            worker.exits.append(code)
            lived_s = time.time() - worker.started_at
            if lived_s > _YOUNG_S:
                worker.backoff_s = _RESTART_FIRST_S
            delay = worker.backoff_s
            worker.backoff_s = min(delay * 2, _RESTART_MAX_S)
            log.warning(
                "worker %d (pid %d) exited with %s after %.1fs: starting it again in %.1fs",
                worker.index,
                process.pid,
                _exit_reason(code),
                lived_s,
                delay,
            )
            await asyncio.sleep(delay)
            if self._stopping():
                return
            worker.restarts += 1
            await self._spawn(worker)

    def _stopping(self) -> bool:
        return self.draining

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            for worker in self.workers:
                if worker.exits:
                    raise RuntimeError(
                        f"worker {worker.index} exited with {_exit_reason(worker.exits[0])} "
                        "before it was ready (its log is above)"
                    )
            if all(await asyncio.gather(*(self._ready(w) for w in self.workers))):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"the workers were not ready within {_READY_TIMEOUT_S:g}s")

    async def _ready(self, worker: Worker) -> bool:
        if not worker.alive:
            return False
        try:
            status, _, _ = await asyncio.wait_for(
                self._call(worker, "GET", "/readyz"), _PROBE_TIMEOUT_S
            )
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False
        return status == 200

    # --- signals and stop -----------------------------------------------------------------

    def hangup(self) -> None:
        """Pass SIGHUP on to every worker (each reloads its config)."""
        for worker in self.workers:
            if worker.alive and worker.process is not None:
                worker.process.send_signal(signal.SIGHUP)

    async def stop(self) -> None:
        """Drain every worker (rule 2), then close everything."""
        self.draining = True
        for worker in self.workers:
            worker.public.close()  # the workers' copies keep accepting until they drain
        for worker in self.workers:
            if worker.alive and worker.process is not None:
                worker.process.send_signal(signal.SIGTERM)
        grace = self.config.shutdown_grace_s + _KILL_AFTER_GRACE_S
        for worker in self.workers:
            if worker.process is None:
                continue
            try:
                await asyncio.wait_for(worker.process.wait(), grace)
            except TimeoutError:
                log.warning("worker %d did not stop within %gs: killing it", worker.index, grace)
                worker.process.kill()
                await worker.process.wait()
        for task in self._monitors:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        for worker in self.workers:
            worker.admin.close()

    # --- the admin port -----------------------------------------------------------------

    async def _call(
        self,
        worker: Worker,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> tuple[int, bytes, str]:
        assert self._session is not None
        async with self._session.request(
            method, worker.admin_url + path, headers=headers, data=body
        ) as response:
            return response.status, await response.read(), response.content_type

    def _any_worker(self) -> Worker | None:
        alive = [w for w in self.workers if w.alive]
        return alive[0] if alive else None

    def _admin_app(self) -> web.Application:
        # Bad HTTP and clients gone mid-exchange: one line each (proxy.http.serverlog).
        app = web.Application(
            middlewares=[one_line_network_errors(log)],
            handler_args={"logger": NetworkErrorLog(log)},
        )
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/status", self._status)
        app.router.add_post("/api/reload", self._reload)
        app.router.add_route("*", "/{tail:.*}", self._relay)
        return app

    async def _healthz(self, _: web.Request) -> web.Response:
        alive = sum(w.alive for w in self.workers)
        return web.json_response({"status": "ok", "workers": self.count, "alive": alive})

    async def _readyz(self, _: web.Request) -> web.Response:
        ready = not self.draining and all(
            await asyncio.gather(*(self._ready(w) for w in self.workers))
        )
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        alive = [w for w in self.workers if w.alive]
        answers = await asyncio.gather(
            *(self._call(w, "GET", "/metrics", {"Accept": WORKER_ACCEPT}) for w in alive),
            return_exceptions=True,
        )
        texts = []
        for worker, answer in zip(alive, answers, strict=True):
            if isinstance(answer, BaseException):
                continue  # a worker restarting: its series come back with it
            status, body, _type = answer
            if status != 200:
                return web.Response(status=status, body=body)
            texts.append((str(worker.index), body.decode()))
        body, content_type = merge_expositions(texts, request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _status(self, request: web.Request) -> web.Response:
        answer = await self._ask_one(request)
        if isinstance(answer, web.Response):
            return answer
        worker, status, body, content_type = answer
        if status != 200:
            return web.Response(status=status, body=body, content_type=content_type)
        document = json.loads(body)
        document["workers"] = [w.describe() for w in self.workers]
        document["answered_by_worker"] = worker.index
        document["ready"] = document.get("ready", False) and not self.draining
        return web.json_response(document, dumps=lambda d: json.dumps(d, indent=2))

    async def _reload(self, request: web.Request) -> web.Response:
        headers = _forwarded(request)
        alive = [w for w in self.workers if w.alive]
        answers = await asyncio.gather(
            *(self._call(w, "POST", "/api/reload", headers) for w in alive),
            return_exceptions=True,
        )
        outcomes: list[dict[str, object]] = []
        worst = 200
        first: dict[str, object] | None = None
        for worker, answer in zip(alive, answers, strict=True):
            if isinstance(answer, BaseException):
                outcomes.append({"worker": worker.index, "error": repr(answer)})
                worst = max(worst, 502)
                continue
            status, body, content_type = answer
            if status in (401, 403):
                return web.Response(status=status, body=body, content_type=content_type)
            document = json.loads(body)
            first = first or document
            outcomes.append({"worker": worker.index, **document})
            worst = max(worst, status)
        result = {**(first or {"outcome": "failed"}), "workers": outcomes}
        return web.json_response(result, status=worst, dumps=lambda d: json.dumps(d, indent=2))

    async def _relay(self, request: web.Request) -> web.Response:
        answer = await self._ask_one(request)
        if isinstance(answer, web.Response):
            return answer
        _, status, body, content_type = answer
        return web.Response(status=status, body=body, content_type=content_type)

    async def _ask_one(self, request: web.Request) -> tuple[Worker, int, bytes, str] | web.Response:
        """`request` as one live worker answers it, or the supervisor's error (rule 3)."""
        worker = self._any_worker()
        if worker is None:
            return _error(503, "no worker is running")
        try:
            status, body, content_type = await self._call(
                worker, request.method, request.path_qs, _forwarded(request), await request.read()
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return _error(502, f"worker {worker.index} did not answer: {exc!r}")
        return worker, status, body, content_type


def _forwarded(request: web.Request) -> dict[str, str]:
    return {name: request.headers[name] for name in _FORWARDED_HEADERS if name in request.headers}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _reuseport_sockets(address: ListenAddress, count: int) -> list[socket.socket]:
    """`count` listening sockets on one address, the first choosing the port if it is 0."""
    family, _, _, _, sockaddr = socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(sockaddr)
            sock.listen(1024)
            sock.set_inheritable(True)
            sockaddr = (sockaddr[0], sock.getsockname()[1], *sockaddr[2:])
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bound_port(runner: web.BaseRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("the admin server is not listening on a TCP port")


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


async def supervise(config: Config, workers: int, *, watch: bool, log_level: str) -> None:
    """Run `workers` workers until SIGINT or SIGTERM; pass SIGHUP on."""
    supervisor = Supervisor(config, workers, watch=watch, log_level=log_level)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, supervisor.hangup)
    try:
        port = await supervisor.start()
        log.info(
            "canary-proxy listening on http://%s:%d with %d workers (pids %s), admin on "
            "http://%s:%d (config %s from %s)",
            config.listen.host,
            port,
            workers,
            ", ".join(str(w.process.pid) for w in supervisor.workers if w.process is not None),
            config.admin.listen.host,
            supervisor.admin_port,
            config.version,
            config.source,
        )
        await stop.wait()
        log.info(
            "stopping: the workers finish requests in flight (up to %gs)", config.shutdown_grace_s
        )
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await supervisor.stop()
