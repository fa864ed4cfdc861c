"""The proxy process: the public server, the admin server, the backends, and their lifecycle.

Rules:
1. The public port is aiohttp's low-level server: every path goes to the
   `Forwarder`; there is no router, no middleware and no access log on the hot path.
2. A client that disconnects cancels its handler at once (`handler_cancellation`),
   which closes the backend connection, so the model server stops generating.
3. Request bodies are not decompressed on the way in; what the client sent is what
   the backend gets.
4. Starting binds the admin port first, then the public port; a failure half-way
   undoes what was started.
5. Stopping closes the listener first, lets in-flight requests finish within the
   grace period, then closes the backends and flushes telemetry.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Final

from aiohttp import web

from proxy.admin import build_admin_app
from proxy.config.model import Config, ListenAddress
from proxy.deadlines import Deadlines
from proxy.exporter import OtlpExporter
from proxy.forwarding import Forwarder
from proxy.metrics import Gauges
from proxy.routing import RouteTable
from proxy.telemetry import Telemetry
from proxy.upstreams import Upstreams

__all__ = ["ProxyServer", "serve"]

log = logging.getLogger("proxy.app")

_STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


class ProxyServer:
    """A running proxy for one config. `start()` binds and returns the public port."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.telemetry = Telemetry(config)
        self.loaded_at = time.time()
        self.last_reload_error: str | None = None
        self.port: int | None = None
        self.admin_port: int | None = None
        self._forwarder: Forwarder | None = None
        self._upstreams: Upstreams | None = None
        self._deadlines: Deadlines | None = None
        self._exporter: OtlpExporter | None = None
        self._runners: list[web.BaseRunner] = []
        self._draining = False

    # --- what the admin port reads (proxy.admin.AdminView) --------------------------------

    @property
    def table(self) -> RouteTable:
        assert self._forwarder is not None
        return self._forwarder.table

    @property
    def ready(self) -> bool:
        return self._forwarder is not None and not self._draining

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def gauges(self) -> Gauges:
        return self.telemetry.gauges(self.table.weights)

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> int:
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> int:
        config = self.config
        self._upstreams = Upstreams(config.backends)
        self._deadlines = Deadlines()
        self._deadlines.start()
        self._forwarder = Forwarder(
            RouteTable.build(config), self._upstreams, self._deadlines, self.telemetry
        )
        if config.telemetry.otlp_endpoint is not None:
            self._exporter = OtlpExporter(
                config.telemetry.otlp_endpoint, self.telemetry, self.gauges
            )
            self._exporter.start()
        admin = web.AppRunner(build_admin_app(self), access_log=None)
        self.admin_port = await self._listen(admin, config.admin.listen)
        public = web.ServerRunner(
            web.Server(
                self._forwarder,
                handler_cancellation=True,
                auto_decompress=False,
                access_log=None,
            ),
            shutdown_timeout=config.shutdown_grace_s,
        )
        self.port = await self._listen(public, config.listen)
        return self.port

    async def _listen(self, runner: web.BaseRunner, address: ListenAddress) -> int:
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, address.host, address.port)
        await site.start()
        return _bound_port(runner)

    async def stop(self) -> None:
        self._draining = True
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self._upstreams is not None:
            await self._upstreams.close()
            self._upstreams = None
        if self._deadlines is not None:
            await self._deadlines.stop()
            self._deadlines = None
        if self._exporter is not None:
            await self._exporter.stop()
            self._exporter = None


def _bound_port(runner: web.BaseRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("the proxy is not listening on a TCP port")


async def serve(config: Config) -> None:
    """Run the proxy until SIGINT or SIGTERM."""
    server = ProxyServer(config)
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
    try:
        await stop.wait()
        log.info("stopping: finishing requests in flight (up to %gs)", config.shutdown_grace_s)
    finally:
        for sig in _STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        await server.stop()
