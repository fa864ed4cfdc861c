"""The tunnel of an upgraded session on real loopback connections, for the moments the
tests through the HTTP port cannot time: the ends of both sides, and bytes that arrive
for a side already closing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from proxy.http.tunnel import End, Tunnel

pytestmark = pytest.mark.timeout(10)


@dataclass
class Peer:
    """The far end of one of the tunnel's connections: what it read, and its writer."""

    writer: asyncio.StreamWriter
    reader: asyncio.StreamReader


@dataclass
class Rig:
    tunnel: Tunnel
    client: Peer
    backend: Peer
    lost: list[tuple[str, Exception | None]] = field(default_factory=list)


@asynccontextmanager
async def rig(idle_s: float = 5.0) -> AsyncIterator[Rig]:
    """A tunnel between two loopback connections, each to a peer of the test's."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Queue[Peer] = asyncio.Queue()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(Peer(writer, reader))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ends = []
    for _ in range(2):
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        ends.append((transport, await accepted.get()))
    (client, client_peer), (backend, backend_peer) = ends
    lost: list[tuple[str, Exception | None]] = []
    tunnel = Tunnel(
        client,
        backend,
        idle_s=idle_s,
        client_lost=lambda exc: lost.append(("client", exc)),
        backend_lost=lambda exc: lost.append(("backend", exc)),
    )
    try:
        yield Rig(tunnel, client_peer, backend_peer, lost)
    finally:
        for peer in (client_peer, backend_peer):
            peer.writer.close()
        server.close()
        await server.wait_closed()


async def test_what_each_side_sent_first_goes_out_before_the_relay() -> None:
    async with rig() as r:
        r.tunnel.start(b"after the 101", b"after the request")
        assert await r.client.reader.readexactly(13) == b"after the 101"
        assert await r.backend.reader.readexactly(17) == b"after the request"
        r.client.writer.write(b"ping")
        assert await r.backend.reader.readexactly(4) == b"ping"
        assert (r.tunnel.to_backend, r.tunnel.to_client) == (21, 13)


async def test_an_end_of_sending_is_passed_on_and_the_other_side_may_still_answer() -> None:
    async with rig() as r:
        r.tunnel.start(b"", b"")
        r.client.writer.write(b"bye")
        r.client.writer.write_eof()
        assert await r.backend.reader.read() == b"bye"  # up to the passed-on end
        r.backend.writer.write(b"bye to you")
        r.backend.writer.close()
        assert await r.client.reader.read() == b"bye to you"
        assert await asyncio.wait_for(r.tunnel.done, 5) is End.CLIENT_CLOSED
    assert sorted(side for side, _ in r.lost) == ["backend", "client"]


async def test_bytes_for_a_side_already_closing_are_dropped() -> None:
    async with rig() as r:
        r.tunnel.start(b"", b"")
        r.tunnel.client.transport.close()
        # The backend's bytes arrive before the client's end is told: they are counted,
        # and lost with the client, rather than written to a closing transport.
        r.tunnel.backend.data_received(b"late")
        assert await asyncio.wait_for(r.tunnel.done, 5) is End.CLIENT_CLOSED
        assert r.tunnel.to_client == 4
        assert await r.backend.reader.read() == b""


async def test_a_silent_session_is_closed_at_its_idle_limit() -> None:
    async with rig(idle_s=0.2) as r:
        r.tunnel.start(b"", b"")
        assert await asyncio.wait_for(r.tunnel.done, 5) is End.IDLE_TIMEOUT
        assert await r.client.reader.read() == b""
