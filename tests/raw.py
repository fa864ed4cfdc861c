"""Raw HTTP/1.1 over a socket, for requests an HTTP client would refuse to send."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

_STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3})", re.MULTILINE)


@dataclass
class RawAnswer:
    """What came back on a connection: its bytes, and whether the proxy closed it."""

    data: bytes
    closed: bool

    @property
    def statuses(self) -> list[int]:
        return [int(code) for code in _STATUS.findall(self.data)]

    @property
    def body(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[2]

    def json(self) -> Any:
        return json.loads(self.body)


async def read_answer(reader: asyncio.StreamReader, quiet_s: float = 0.5) -> RawAnswer:
    """Everything the peer sends until it closes, or until `quiet_s` passes in silence."""
    data = b""
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), quiet_s)
        except TimeoutError:
            return RawAnswer(data, closed=False)
        except ConnectionError:
            return RawAnswer(data, closed=True)
        if not chunk:
            return RawAnswer(data, closed=True)
        data += chunk


async def send_raw(
    port: int, *parts: bytes, pause_s: float = 0.0, quiet_s: float = 0.5
) -> RawAnswer:
    """Send `parts` on one new connection (`pause_s` apart) and read the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for index, part in enumerate(parts):
            if index and pause_s:
                await asyncio.sleep(pause_s)
            writer.write(part)
            await writer.drain()
        return await read_answer(reader, quiet_s)
    finally:
        writer.close()
