"""The proxy process: the public server, its upstreams, and their lifecycle.

Rules:
1. The public port is aiohttp's low-level server: every path goes to the
   `Forwarder`; there is no router, no middleware and no access log on the hot path.
2. A client that disconnects cancels its handler at once (`handler_cancellation`),
   which closes the backend connection, so the model server stops generating.
3. Request bodies are not decompressed on the way in; what the client sent is what
   the backend gets.
4. Stopping closes the listener first, lets in-flight requests finish within the
   grace period, then closes the upstream sessions.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Final

from aiohttp import web

from proxy.config.model import Config
from proxy.deadlines import Deadlines
from proxy.forwarding import Forwarder
from proxy.routing import RouteTable
from proxy.upstreams import Upstreams

__all__ = ["ProxyServer", "serve"]

log = logging.getLogger("proxy.app")

_STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


class ProxyServer:
    """A running proxy for one config. `start()` binds and returns the port."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.upstreams: Upstreams | None = None
        self.forwarder: Forwarder | None = None
        self.deadlines: Deadlines | None = None
        self._runner: web.ServerRunner | None = None
        self.port: int | None = None

    async def start(self) -> int:
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> int:
        config = self.config
        self.upstreams = Upstreams(config.backends)
        self.deadlines = Deadlines()
        self.deadlines.start()
        self.forwarder = Forwarder(RouteTable.build(config), self.upstreams, self.deadlines)
        server = web.Server(
            self.forwarder,
            handler_cancellation=True,
            auto_decompress=False,
            access_log=None,
        )
        self._runner = web.ServerRunner(server, shutdown_timeout=config.shutdown_grace_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, config.listen.host, config.listen.port)
        await site.start()
        self.port = _bound_port(self._runner)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.upstreams is not None:
            await self.upstreams.close()
            self.upstreams = None
        if self.deadlines is not None:
            await self.deadlines.stop()
            self.deadlines = None


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
        "canary-proxy listening on http://%s:%d (config %s from %s, %d route%s)",
        config.listen.host,
        port,
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
