"""The backends of a config, each with its connection pool; made at start-up, closed at shutdown.

Rules:
1. One pool per backend per process (never a connection per request).
2. Nothing is changed on the way through: no cookie jar, no decompression, no
   redirects followed, no header the client did not send (see `proxy.http.headers`).
3. On a reload, a backend whose settings did not change keeps its pool; a retired
   pool is closed, and its connections still busy close when their exchange ends.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from proxy.config.model import Backend
from proxy.http.pool import BackendPool
from proxy.telemetry.metrics import PoolGauge

__all__ = ["Upstreams"]


class Upstreams:
    """The open pools by backend name."""

    def __init__(self, pools: Mapping[str, BackendPool]) -> None:
        self._by_name: Mapping[str, BackendPool] = MappingProxyType(dict(pools))

    @classmethod
    def open(cls, backends: Mapping[str, Backend]) -> Upstreams:
        return cls({name: BackendPool(backend) for name, backend in backends.items()})

    def rebuilt(self, backends: Mapping[str, Backend]) -> tuple[Upstreams, list[BackendPool]]:
        """Pools for a new config: a backend whose settings did not change keeps its pool
        (and its kept-alive connections). Also returns the pools no longer used, for the
        caller to close once the new ones serve."""
        pools = {}
        for name, backend in backends.items():
            current = self._by_name.get(name)
            pools[name] = (
                current
                if current is not None and current.backend == backend
                else (BackendPool(backend))
            )
        kept = {id(pool) for pool in pools.values()}
        retired = [pool for pool in self._by_name.values() if id(pool) not in kept]
        return Upstreams(pools), retired

    def __getitem__(self, name: str) -> BackendPool:
        return self._by_name[name]

    def gauges(self) -> tuple[PoolGauge, ...]:
        """Each pool as it is now, for the pool gauges of /metrics and OTLP."""
        return tuple(
            PoolGauge(
                name,
                pool.open_connections - pool.idle_connections,
                pool.idle_connections,
                pool.queued,
            )
            for name, pool in self._by_name.items()
        )

    async def close(self) -> None:
        for pool in self._by_name.values():
            await pool.close()
