"""An upgraded connection after its 101 (a WebSocket session): bytes both ways between
the client's connection and the backend's, unparsed, until either side ends it.

Both transports are handed to the tunnel whole (`asyncio` transports, each given a
protocol of the tunnel's), so a byte read from one side is written to the other in
the same callback: nothing is parsed, held back or copied on the way.

Rules:
1. Bytes go on as they arrive, both ways; no frame is parsed or waited for.
2. Flow control: each transport buffers at most `HIGH_WATER` unsent bytes; past that
   the other side stops being read, and is read again once the buffer drained below
   `LOW_WATER`, so a slow reader slows its writer instead of filling the proxy's memory.
3. A side that ends its sending (EOF) has the end passed on to the other (a
   half-close), which may still answer; where a transport cannot half-close (TLS),
   both close. A side that closes or fails closes the other, once what is buffered
   for it was sent.
4. A session silent both ways for `idle_s` is closed, and so is one the proxy ends
   (`close`, at a stop or a cancellation); both then drop what is still unsent.
5. How it ended (`End`) is what happened first; only `backend_reset`, the backend's
   connection failing mid-session, is the backend's fault.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from enum import StrEnum
from typing import Final

__all__ = ["HIGH_WATER", "LOW_WATER", "End", "Tunnel"]

HIGH_WATER: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024


class End(StrEnum):
    CLIENT_CLOSED = "client_closed"
    BACKEND_CLOSED = "backend_closed"
    BACKEND_RESET = "backend_reset"
    IDLE_TIMEOUT = "idle_timeout"
    SHUTDOWN = "shutdown"  # the proxy closed it (a stop, a cancellation)


class _Side(asyncio.Protocol):
    """One connection of the tunnel; what it reads goes to its `peer`'s transport."""

    __slots__ = ("closed_end", "eof", "lost", "peer", "received", "transport", "tunnel")

    peer: _Side

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport, closed_end: End) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.closed_end = closed_end  # what its closing means
        self.received = 0
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        tunnel = self.tunnel
        tunnel.last_activity = tunnel.time()
        peer = self.peer.transport
        # A peer that failed is closed before its end is told: what it would be sent is
        # lost with it either way.
        if not peer.is_closing():
            peer.write(data)

    def eof_received(self) -> bool:
        self.tunnel.ended(self.closed_end)
        peer = self.peer
        if peer.eof or not peer.transport.can_write_eof():
            return False  # this transport closes; then the other (Rule 3)
        self.eof = True
        peer.transport.write_eof()
        return True  # the other side may still answer through this one

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.tunnel.side_lost(self, exc)


class Tunnel:
    """One upgraded session between two transports (see the module's rules).

    `client_lost` and `backend_lost` are called once, when that side's transport closed
    (their former owners let go of them); `done` resolves with how the session ended
    once both are closed.
    """

    __slots__ = (
        "_backend_lost",
        "_client_lost",
        "_idle_s",
        "_loop",
        "_timer",
        "backend",
        "client",
        "done",
        "end",
        "last_activity",
        "time",
    )

    def __init__(
        self,
        client: asyncio.Transport,
        backend: asyncio.Transport,
        *,
        idle_s: float,
        client_lost: Callable[[Exception | None], None],
        backend_lost: Callable[[Exception | None], None],
    ) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self.time = loop.time
        self._idle_s = idle_s
        self._client_lost = client_lost
        self._backend_lost = backend_lost
        self.client = _Side(self, client, End.CLIENT_CLOSED)
        self.backend = _Side(self, backend, End.BACKEND_CLOSED)
        self.client.peer = self.backend
        self.backend.peer = self.client
        self.end: End | None = None
        self.done: asyncio.Future[End] = loop.create_future()
        self.last_activity = loop.time()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def to_backend(self) -> int:
        """Bytes relayed from the client to the backend."""
        return self.client.received

    @property
    def to_client(self) -> int:
        """Bytes relayed from the backend to the client (after the 101 head)."""
        return self.backend.received

    def start(self, to_client: bytes, to_backend: bytes) -> None:
        """Take both transports over and relay, first sending what each side already sent
        the other: the backend's bytes after its 101, the client's after its request."""
        for side in (self.client, self.backend):
            transport = side.transport
            transport.set_protocol(side)
            transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        if to_client:
            self.backend.data_received(to_client)
        if to_backend:
            self.client.data_received(to_backend)
        self._timer = self._loop.call_at(self.last_activity + self._idle_s, self._check_idle)
        for side in (self.client, self.backend):
            side.transport.resume_reading()  # as each was paused for the handover

    def ended(self, end: End) -> None:
        """Record how the session ended, unless it already ended another way."""
        if self.end is None:
            self.end = end

    def close(self, end: End = End.SHUTDOWN) -> None:
        """End the session now: both transports close, dropping what is unsent (Rule 4)."""
        self.ended(end)
        for side in (self.client, self.backend):
            side.transport.abort()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        if side is self.backend:
            self.ended(End.BACKEND_RESET if exc is not None else End.BACKEND_CLOSED)
            self._backend_lost(exc)
        else:
            self.ended(End.CLIENT_CLOSED)
            self._client_lost(exc)
        peer = side.peer
        if not peer.lost:
            peer.transport.close()  # after what is buffered for it (Rule 3)
            return
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
        if not self.done.done():
            assert self.end is not None
            self.done.set_result(self.end)

    def _check_idle(self) -> None:
        due = self.last_activity + self._idle_s
        if self.time() >= due:
            self._timer = None
            self.close(End.IDLE_TIMEOUT)
        else:
            self._timer = self._loop.call_at(due, self._check_idle)
