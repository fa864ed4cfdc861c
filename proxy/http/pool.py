"""Connections to one backend: opened on demand, kept alive, reused, and capped.

Rules:
1. At most `max_connections` are open at once; a request past the cap waits for one
   to be released, first come first served, for at most the backend's pool timeout:
   then `PoolTimeout`. A wait in the queue is the proxy's capacity, not the backend's
   time: the first-byte timeout starts once a connection is in hand.
2. The most recently used idle connection is reused first (it is the least likely
   to have been closed by the backend), and none that has idled `KEEPALIVE_S` or
   longer: uvicorn, which vLLM and TGI's router run on, closes idle connections after
   5 s, and a request must not be sent down a connection the backend is closing.
3. A connection the backend closes while idle leaves the pool at once.
4. Only a connection whose exchange completed cleanly comes back (`release`);
   anything else is closed (`discard`).
5. A connection handed out says how long its taker queued for it (`waited_s`) and
   how many were queued ahead of it then (`queued_ahead`); 0 for both when it did not
   queue. The queue's length now is `queued`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from typing import Final
from urllib.parse import urlsplit

from proxy.config.model import Backend
from proxy.http.http1 import Connection

__all__ = ["KEEPALIVE_S", "BackendPool", "ConnectFailed", "ConnectTimeout", "PoolTimeout"]

KEEPALIVE_S: Final = 4.0


class ConnectFailed(Exception):
    """The backend could not be connected to (refused, unreachable, DNS, TLS)."""


class ConnectTimeout(ConnectFailed):
    """Connecting took longer than the backend's connect timeout."""


class PoolTimeout(Exception):
    """Every connection stayed busy for the backend's pool timeout (rule 1)."""

    def __init__(self, message: str, waited_s: float, queued_ahead: int) -> None:
        super().__init__(message)
        self.waited_s = waited_s
        self.queued_ahead = queued_ahead


class BackendPool:
    """The connection pool of one backend, in one process."""

    def __init__(self, backend: Backend, keepalive_s: float = KEEPALIVE_S) -> None:
        parts = urlsplit(backend.origin)
        assert parts.hostname is not None
        self.backend = backend
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        # The Host header as the config wrote the URL (no default port added).
        self.host_header = urlsplit(backend.url).netloc.encode()
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._keepalive_s = keepalive_s
        self._idle: list[Connection] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._queued = 0  # takers waiting now (cancelled futures may linger in _waiters)
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def queued(self) -> int:
        """Takers waiting for a connection now."""
        return self._queued

    async def acquire(self, *, fresh: bool = False) -> Connection:
        """A connection ready for one exchange; `fresh` skips the idle ones.

        Raises:
            ConnectFailed: a new connection could not be made.
            PoolTimeout: every connection stayed busy for the pool timeout.
        """
        loop = asyncio.get_running_loop()
        if not fresh:
            connection = self._reuse(loop.time())
            if connection is not None:
                connection.waited_s = 0.0
                connection.queued_ahead = 0
                return connection
        if self._open < self.backend.max_connections:
            connection = await self._connect(loop)
            connection.waited_s = 0.0
            connection.queued_ahead = 0
            return connection
        return await self._wait(loop, fresh)

    async def _wait(self, loop: asyncio.AbstractEventLoop, fresh: bool) -> Connection:
        """Queue for a connection (rule 1): the slow path, with its own timer."""
        started = loop.time()
        ahead = self._queued
        timeout_s = self.backend.timeouts.pool_s
        deadline = started + timeout_s
        first = True
        self._queued += 1
        try:
            while True:
                waiter: asyncio.Future[Connection | None] = loop.create_future()
                if first:
                    self._waiters.append(waiter)
                else:
                    # Woken for a free place that someone else took first: keep our turn.
                    self._waiters.appendleft(waiter)
                first = False
                timer = loop.call_at(deadline, _expire, waiter)
                try:
                    handed = await waiter
                except asyncio.CancelledError:
                    handed = _handed(waiter)  # given a connection, then cancelled
                    if handed is not None:
                        self.release(handed)
                    raise
                finally:
                    timer.cancel()
                if handed is None:
                    handed = None if fresh else self._reuse(loop.time())
                    if handed is None and self._open < self.backend.max_connections:
                        handed = await self._connect(loop)
                if handed is not None:
                    handed.waited_s = loop.time() - started
                    handed.queued_ahead = ahead
                    return handed
        except _Expired:
            waited_s = loop.time() - started
            raise PoolTimeout(
                f"all {self.backend.max_connections} connections to backend "
                f"{self.backend.name} stayed busy for {timeout_s:g}s",
                waited_s,
                ahead,
            ) from None
        finally:
            self._queued -= 1

    def release(self, connection: Connection) -> None:
        """Take back a connection after a complete exchange; it is reused or closed."""
        if self._closed or not connection.reusable:
            self.discard(connection)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        connection.idle_since = asyncio.get_running_loop().time()
        self._idle.append(connection)

    def discard(self, connection: Connection) -> None:
        """Close a connection after an incomplete exchange (it is never reused)."""
        connection.close()

    async def close(self) -> None:
        self._closed = True
        for connection in self._idle:
            connection.close()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.cancel()

    def _reuse(self, now: float) -> Connection | None:
        idle = self._idle
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < self._keepalive_s:
                return connection
            connection.close()
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> Connection:
        self._open += 1
        timeout_s = self.backend.timeouts.connect_s
        try:
            async with asyncio.timeout(timeout_s):
                _, connection = await loop.create_connection(
                    lambda: Connection(loop, self._forget),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                )
        except TimeoutError as exc:
            self._opened_none()
            raise ConnectTimeout(
                f"could not connect to backend {self.backend.name} within {timeout_s:g}s"
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            self._opened_none()
            reason = exc.strerror or exc.__class__.__name__
            raise ConnectFailed(f"cannot connect to backend {self.backend.name}: {reason}") from exc
        except BaseException:
            self._opened_none()
            raise
        return connection

    def _opened_none(self) -> None:
        """A connection attempt failed: free its place, and let a waiter try."""
        self._open -= 1
        self._wake_one()

    def _forget(self, connection: Connection) -> None:
        """A connection closed (called once by it): free its place."""
        self._open -= 1
        if connection in self._idle:
            self._idle.remove(connection)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # try again: there is room for a new connection
                return


class _Expired(Exception):
    """A queued taker's pool timeout passed (set on its future by its timer)."""


def _handed(waiter: asyncio.Future[Connection | None]) -> Connection | None:
    """The connection a waiter's future holds, if it holds one."""
    done = waiter.done() and not waiter.cancelled() and waiter.exception() is None
    return waiter.result() if done else None


def _expire(waiter: asyncio.Future[Connection | None]) -> None:
    # The waiter may have been given a connection in this same turn of the loop, before
    # its task could cancel this timer: then it keeps the connection.
    with contextlib.suppress(asyncio.InvalidStateError):
        waiter.set_exception(_Expired())
