"""The proxy process: the public server, the admin server, the backends, and their lifecycle.

Rules:
1. The public port is the proxy's own connection protocol around aiohttp's request
   parser (`proxy.http.inbound`: head timeout, bad HTTP refused): every path goes to
   the `Forwarder`; there is no router, no middleware, and no access log unless
   `telemetry.access_log` asks for a share of requests.
2. A client that disconnects cancels its handler at once, which closes the backend
   connection, so the model server stops generating.
3. Request bodies are not decompressed on the way in; what the client sent is what
   the backend gets.
4. Starting binds the admin port first, then the public port; a failure half-way
   undoes what was started. The listen backlog takes a burst of a thousand new
   connections (aiohttp's default, 128, makes the rest retry their SYN a second later),
   and the open-files limit is raised to its hard limit: each stream holds two sockets.
5. Stopping hands the rollout lease on and closes the listener first, lets in-flight
   requests finish within the grace period, publishes their stats to the state store,
   then closes the backends and flushes telemetry.
6. A reload (file change, SIGHUP, `POST /api/reload`) parses and validates the new
   config whole, then swaps it in with one assignment (`Forwarder.snapshot`):
   requests in flight finish on the snapshot they started with, streams run to their
   end on their connections, unchanged backends keep their pools. An invalid config
   changes nothing; its error goes to the log, `/api/status` and
   `canary.config.reloads{result="failure"}` until a valid one replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Final

from aiohttp import web

from proxy.config import ConfigError, content_version, load_config
from proxy.config.model import Config, ListenAddress
from proxy.http.deadlines import Deadlines
from proxy.http.forwarding import Forwarder, Snapshot
from proxy.http.inbound import PublicServer
from proxy.http.upstreams import Upstreams
from proxy.judge.analysis import Verdict
from proxy.judge.stats import WindowStats
from proxy.rollout.machine import Decision
from proxy.routing.assignment import RouteTable
from proxy.server.admin import build_admin_app
from proxy.server.controller import Controller
from proxy.server.notify import Notifier
from proxy.server.reload import ConfigWatcher, ReloadOutcome, ReloadResult, changes_needing_restart
from proxy.telemetry.export import ExportStatus, OtelExport
from proxy.telemetry.logs import install_trace_ids, set_format
from proxy.telemetry.metrics import Gauges
from proxy.telemetry.metrics import Snapshot as MetricsSnapshot
from proxy.telemetry.recorder import Recorder
from proxy.telemetry.settings import resolve

__all__ = ["ProxyServer", "serve"]

log = logging.getLogger("proxy.server.app")

_STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
_BACKLOG: Final = 1024  # as the workers' shared sockets (proxy.server.supervisor)


class ProxyServer:
    """A running proxy for one config. `start()` binds and returns the public port.

    With `watch=True` and a config read from a file, the file is watched for changes.
    A worker of `run --workers N` (`worker` is its number) listens on the sockets its
    supervisor hands it, and always meets the other workers in the state store.
    """

    def __init__(
        self,
        config: Config,
        *,
        watch: bool = False,
        worker: int | None = None,
        sockets: tuple[socket.socket, socket.socket] | None = None,
    ) -> None:
        self.config = config
        self.worker = worker
        self._sockets = sockets
        self.telemetry = Recorder(config)
        install_trace_ids()
        self.loaded_at = time.time()
        self.last_reload_error: str | None = None
        self.last_reload_at: float | None = None
        self.port: int | None = None
        self.admin_port: int | None = None
        self._watch = watch
        self._watcher: ConfigWatcher | None = None
        self._forwarder: Forwarder | None = None
        self._deadlines: Deadlines | None = None
        self.telemetry_settings = resolve(config.telemetry, os.environ)
        self._export: OtelExport | None = None
        self._export_status: ExportStatus | None = None  # the newest export's, kept after it
        self._runners: list[web.BaseRunner] = []
        self._public: PublicServer | None = None
        self._draining = False
        self._reloading = asyncio.Lock()
        self.controller = Controller(self, shared=worker is not None)
        self.notifier = Notifier(self.telemetry.metrics.record_notification)

    # --- what the admin port reads (proxy.server.admin.AdminView) --------------------------------

    @property
    def table(self) -> RouteTable:
        assert self._forwarder is not None
        return self._forwarder.table

    @property
    def ready(self) -> bool:
        return self._forwarder is not None and not self._draining

    def now(self) -> float:
        """Wall-clock seconds, the clock of the window stats and of the rollout state."""
        return time.time()

    @property
    def admin_token(self) -> str | None:
        return self.config.admin.token

    def set_weights(
        self, weights: Mapping[str, float], shadowing: frozenset[str] = frozenset()
    ) -> None:
        """Serve these weights, and shadow these routes, from the next request on (the
        controller's decisions)."""
        forwarder = self._forwarder
        if forwarder is None:
            return
        snapshot = forwarder.snapshot
        table = snapshot.table
        current = table.weights
        if (
            all(current.get(name) == weight for name, weight in weights.items())
            and table.shadowing == shadowing
        ):
            return
        forwarder.snapshot = Snapshot(table.with_weights(weights, shadowing), snapshot.upstreams)

    def gauges(self) -> Gauges:
        controller = self.controller
        assert self._forwarder is not None
        return self.telemetry.gauges(
            self.table.weights,
            controller.store_up,
            controller.leader,
            self._forwarder.snapshot.upstreams.gauges(),
        )

    # --- what the rollout controller needs (proxy.server.controller.ControllerHost) ------

    @property
    def stats(self) -> WindowStats:
        return self.telemetry.stats

    def record_judgement(self, route: str, verdict: Verdict | None) -> None:
        self.telemetry.record_judgement(route, verdict)

    def record_decision(self, route: str, decision: Decision) -> None:
        self.telemetry.record_decision(route, decision)
        config = self.config
        routed = config.route(route)
        if routed is not None and routed.notify:
            # Only here, where the decision was made and stored: one message per decision.
            self.notifier.notify(
                route, routed.notify, decision, config.version, self.controller.source
            )

    # --- what the admin port reads of telemetry ------------------------------------------

    def metrics_snapshot(self) -> MetricsSnapshot:
        return self.telemetry.snapshot(self.gauges())

    def telemetry_status(self) -> dict[str, object]:
        """The status page's `telemetry` section: what is exported where, and how it goes."""
        settings = self.telemetry_settings
        status = self._export_status
        signal = settings.traces or settings.metrics
        return {
            "sdk_disabled": settings.disabled,
            "service_name": settings.service_name,
            "traces_endpoint": settings.traces.shown if settings.traces else None,
            "metrics_endpoint": settings.metrics.shown if settings.metrics else None,
            "protocol": signal.protocol.value if signal is not None else None,
            "trace_sample_ratio": settings.sampling.ratio if settings.traces else 0.0,
            "parent_based": settings.sampling.parent_based,
            "spans_exported": status.spans_exported if status else 0,
            "spans_dropped": status.spans_dropped if status else 0,
            "spans_queued": status.spans_queued if status else 0,
            "export_failures": status.export_failures if status else 0,
            "last_export_error": status.last_export_error if status else None,
            "metrics_taken": status.metrics_taken if status else None,
        }

    def describe(self) -> dict[str, object]:
        """What this process says of itself to the others (its heartbeat)."""
        return {"port": self.port, "admin_port": self.admin_port, "worker": self.worker}

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> int:
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> int:
        config = self.config
        set_format(config.telemetry.log_format)
        _raise_open_files_limit()
        self._deadlines = Deadlines()
        self._deadlines.start()
        snapshot = Snapshot(RouteTable.build(config), Upstreams.open(config.backends))
        self._forwarder = Forwarder(snapshot, self._deadlines, self.telemetry)
        await self.notifier.start()
        await self.controller.start()
        await self._start_export(config)
        admin = web.AppRunner(build_admin_app(self), access_log=None)
        inherited = self._sockets or (None, None)
        self.admin_port = await self._listen(admin, config.admin.listen, inherited[1])
        public = PublicServer(self._forwarder)
        self.port = await public.start(config.listen, inherited[0])
        self._public = public  # listening: from now on, stopping stops it
        if self._watch:
            self._watcher = ConfigWatcher(config.source, config.version, self._file_changed)
            self._watcher.start()
        return self.port

    async def _start_export(self, config: Config) -> None:
        """Export as the config and the OTEL_* variables say, replacing any export before."""
        await self._stop_export()
        settings = self.telemetry_settings = resolve(config.telemetry, os.environ)
        for problem in settings.problems:
            log.warning("telemetry: %s", problem)
        if settings.traces is None and settings.metrics is None:
            self.telemetry.trace_to(None, settings.sampling)
            return
        export = self._export = OtelExport(settings, self.metrics_snapshot)
        self._export_status = export.status
        export.start()
        self.telemetry.trace_to(export if export.tracing else None, settings.sampling)

    async def _stop_export(self) -> None:
        export, self._export = self._export, None
        self.telemetry.trace_to(None, self.telemetry_settings.sampling)
        if export is not None:
            await export.stop()

    async def _listen(
        self, runner: web.BaseRunner, address: ListenAddress, sock: socket.socket | None
    ) -> int:
        await runner.setup()
        self._runners.append(runner)
        site: web.BaseSite = (
            web.TCPSite(runner, address.host, address.port, backlog=_BACKLOG)
            if sock is None
            else web.SockSite(runner, sock)
        )
        await site.start()
        return _bound_port(runner)

    async def stop(self) -> None:
        self._draining = True
        if self._forwarder is not None:
            self._forwarder.draining = True  # from now on: 503 draining, connection closed
        if self._watcher is not None:
            await self._watcher.stop()
            self._watcher = None
        await self.controller.step_down()  # another process decides from now on
        public, self._public = self._public, None
        if public is not None:
            await public.stop(self.config.shutdown_grace_s)
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        await self.controller.stop()  # after the requests in flight: their stats count
        await self.notifier.stop()  # the last decisions' messages get a moment to go out
        if self._forwarder is not None:
            await self._forwarder.shadows.close()
            await self._forwarder.snapshot.upstreams.close()
        if self._deadlines is not None:
            await self._deadlines.stop()
            self._deadlines = None
        await self._stop_export()

    # --- reload -------------------------------------------------------------------------

    async def reload(self, reason: str) -> ReloadResult:
        """Read the config file again and apply it whole, or change nothing."""
        async with self._reloading:
            current = self.config
            path = current.source
            try:
                new = load_config(path)
            except ConfigError as error:
                self._remember_file(path)
                return self._reload_failed(reason, error.problems)
            if self._watcher is not None:
                self._watcher.seen(new.version)
            if new.version == current.version:
                self.last_reload_error = None
                return ReloadResult(ReloadOutcome.UNCHANGED, current.version)
            problems = changes_needing_restart(current, new)
            if problems:
                return self._reload_failed(reason, problems)
            await self._apply(new)
            log.info(
                "config reloaded (%s): version %s -> %s; weights %s",
                reason,
                current.version,
                new.version,
                ", ".join(f"{name} {weight:g}%" for name, weight in self.table.weights.items()),
            )
            return ReloadResult(ReloadOutcome.APPLIED, new.version)

    async def _apply(self, new: Config) -> None:
        forwarder = self._forwarder
        assert forwarder is not None
        old = forwarder.snapshot
        upstreams, retired = old.upstreams.rebuilt(new.backends)
        table = RouteTable.build(new, *await self.controller.config_changed(new))
        telemetry_changed = new.telemetry != self.config.telemetry
        if new.telemetry.log_format != self.config.telemetry.log_format:
            set_format(new.telemetry.log_format)
        self.telemetry.reconfigure(new)
        forwarder.snapshot = Snapshot(table, upstreams)  # the swap: requests from now on
        self.config = new
        self.notifier.keep({hook for route in new.routes for hook in route.notify})
        self.loaded_at = self.last_reload_at = time.time()
        self.last_reload_error = None
        self.telemetry.metrics.record_reload("success")
        for pool in retired:
            await pool.close()  # busy connections close when their exchange ends
        if telemetry_changed:
            await self._start_export(new)

    def _reload_failed(self, reason: str, problems: Sequence[str]) -> ReloadResult:
        self.last_reload_error = "; ".join(problems)
        self.last_reload_at = time.time()
        self.telemetry.metrics.record_reload("failure")
        log.error(
            "config reload (%s) failed; the config in force (version %s) keeps serving:\n  %s",
            reason,
            self.config.version,
            "\n  ".join(problems),
        )
        return ReloadResult(ReloadOutcome.FAILED, self.config.version, tuple(problems))

    def _remember_file(self, path: str) -> None:
        """Tell the watcher the file's current content was seen (and rejected)."""
        if self._watcher is None:
            return
        try:
            with open(path, "rb") as file:
                self._watcher.seen(content_version(file.read()))
        except OSError:
            pass

    async def _file_changed(self) -> None:
        await self.reload("file changed")


def _raise_open_files_limit() -> None:
    """The soft limit of open files up to the hard one (rule 4): a default soft limit of
    1024 would stop the proxy near 500 streams."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            log.debug("could not raise the open-files limit from %d", soft)


def _bound_port(runner: web.BaseRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("the proxy is not listening on a TCP port")


async def serve(
    config: Config,
    *,
    watch: bool = True,
    worker: int | None = None,
    sockets: tuple[socket.socket, socket.socket] | None = None,
) -> None:
    """Run the proxy until SIGINT or SIGTERM; reload on SIGHUP (and file changes if `watch`).

    A worker of `run --workers N` serves on the `sockets` (public, admin) it inherited.
    """
    server = ProxyServer(config, watch=watch, worker=worker, sockets=sockets)
    port = await server.start()
    log.info(
        "canary-proxy listening on http://%s:%d, admin on http://%s:%d (config %s from %s, "
        "%d route%s)",
        config.listen.host,
        port,
        config.admin.listen.host,
        server.admin_port,
        config.version,
        config.source,
        len(config.routes),
        "" if len(config.routes) == 1 else "s",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[ReloadResult]] = set()

    def on_hangup() -> None:
        task = loop.create_task(server.reload("SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await stop.wait()
        log.info("stopping: finishing requests in flight (up to %gs)", config.shutdown_grace_s)
    finally:
        for sig in (*_STOP_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await server.stop()
