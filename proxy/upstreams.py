"""One pooled HTTP client per backend, made at start-up and closed at shutdown.

Rules:
1. One `ClientSession` per backend per process (never one per request), with explicit
   timeouts: connect from the config, no total cap (generations can be long); the
   first-byte and idle timeouts are enforced by the forwarding code per attempt.
2. The session changes nothing on the way through: no cookie jar (one user's cookies
   must never reach another's request), no automatic decompression, no default
   Accept/Accept-Encoding/User-Agent/Content-Type, no redirects followed.
3. Idle keep-alive connections are dropped before the usual server keep-alive
   (uvicorn, which vLLM and TGI's router use, closes them after 5 s), so a request is
   not sent down a connection the backend is closing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import aiohttp

from proxy.config.model import Backend

__all__ = ["Upstream", "Upstreams"]

_KEEPALIVE_S: Final = 4.0
_SKIP_AUTO_HEADERS: Final = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


@dataclass(frozen=True, slots=True)
class Upstream:
    """A backend and the client session that talks to it."""

    backend: Backend
    session: aiohttp.ClientSession

    @classmethod
    def open(cls, backend: Backend) -> Upstream:
        connector = aiohttp.TCPConnector(
            limit=backend.max_connections,
            limit_per_host=0,
            keepalive_timeout=_KEEPALIVE_S,
            ttl_dns_cache=10,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=backend.timeouts.connect_s, sock_read=None
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            trust_env=False,
        )
        return cls(backend, session)

    def url_for(self, raw_path: str) -> str:
        """The backend URL for a client's raw path and query."""
        return f"{self.backend.origin}{self.backend.base_path}{raw_path}"


class Upstreams:
    """The open upstreams by backend name."""

    def __init__(self, backends: Mapping[str, Backend]) -> None:
        self._by_name: Mapping[str, Upstream] = MappingProxyType(
            {name: Upstream.open(backend) for name, backend in backends.items()}
        )

    def __getitem__(self, name: str) -> Upstream:
        return self._by_name[name]

    async def close(self) -> None:
        for upstream in self._by_name.values():
            await upstream.session.close()
