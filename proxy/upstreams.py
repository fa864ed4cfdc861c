"""The backends of a config, each with its connection pool; made at start-up, closed at shutdown.

Rules:
1. One pool per backend per process (never a connection per request).
2. Nothing is changed on the way through: no cookie jar, no decompression, no
   redirects followed, no header the client did not send (see `proxy.headers`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from proxy.config.model import Backend
from proxy.pool import BackendPool

__all__ = ["Upstreams"]


class Upstreams:
    """The open pools by backend name."""

    def __init__(self, backends: Mapping[str, Backend]) -> None:
        self._by_name: Mapping[str, BackendPool] = MappingProxyType(
            {name: BackendPool(backend) for name, backend in backends.items()}
        )

    def __getitem__(self, name: str) -> BackendPool:
        return self._by_name[name]

    async def close(self) -> None:
        for pool in self._by_name.values():
            await pool.close()
