"""What the fake backend remembers: the last requests it received, and its counters.

Rule 1: only API traffic counts; the `/fake/*` introspection paths are neither
        recorded nor counted.
Rule 2: a counted request ends exactly once, as `completed` (its response was fully
        written), `aborted` (the server broke the connection on purpose: a reset, cut or
        garbage hook) or `cancelled` (the client left first). So at any moment
        requests = completed + aborted + cancelled + in_flight.
Rule 3: `errors` counts the requests that ended (not cancelled) with an error status or
        a deliberately broken response.

Recording is O(1) and keeps raw bytes; decoding to JSON happens only when asked.
"""

from __future__ import annotations

import enum
import json
from collections import deque
from dataclasses import dataclass

__all__ = ["Outcome", "RecordedRequest", "RequestJournal", "ServerStats"]

JOURNAL_CAPACITY = 200
BODY_LIMIT_BYTES = 64 * 1024


class Outcome(enum.Enum):
    """How a counted request ended (Rule 2)."""

    COMPLETED = "completed"
    ABORTED = "aborted"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as received: `raw_headers` keep their order, case and duplicates."""

    method: str
    raw_path: str
    raw_headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    received_at: float

    def to_json_object(self) -> dict[str, object]:
        return {
            "method": self.method,
            "path": self.raw_path,
            "headers": [
                [name.decode("utf-8", "replace"), value.decode("utf-8", "replace")]
                for name, value in self.raw_headers
            ],
            "body": self.body[:BODY_LIMIT_BYTES].decode("utf-8", "replace"),
            "received_at": self.received_at,
        }


class RequestJournal:
    """The last `capacity` requests, oldest first."""

    __slots__ = ("_entries",)

    def __init__(self, capacity: int = JOURNAL_CAPACITY) -> None:
        self._entries: deque[RecordedRequest] = deque(maxlen=capacity)

    def record(self, entry: RecordedRequest) -> None:
        self._entries.append(entry)

    def clear(self) -> int:
        """Forget every entry; returns how many there were."""
        count = len(self._entries)
        self._entries.clear()
        return count

    def to_json(self) -> bytes:
        return json.dumps([entry.to_json_object() for entry in self._entries]).encode()


class ServerStats:
    """The request counters of Rules 2 and 3; mutated only from the event loop."""

    __slots__ = ("aborted", "cancelled", "completed", "errors", "in_flight", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.completed = 0
        self.aborted = 0
        self.cancelled = 0
        self.errors = 0
        self.in_flight = 0

    def begin(self) -> None:
        self.requests += 1
        self.in_flight += 1

    def end(self, outcome: Outcome, is_fault: bool) -> None:
        self.in_flight -= 1
        if outcome is Outcome.COMPLETED:
            self.completed += 1
        elif outcome is Outcome.ABORTED:
            self.aborted += 1
        else:
            self.cancelled += 1
            return
        if is_fault:
            self.errors += 1

    def to_json(self) -> bytes:
        return json.dumps({name: getattr(self, name) for name in sorted(self.__slots__)}).encode()
