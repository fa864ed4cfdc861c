"""The idle timeout inside a response body, at the cost of one timer per idle period.

Re-arming a timer for every chunk (what `asyncio.timeout` rescheduling or aiohttp's
`sock_read` do) costs a heap push and a cancelled handle per chunk. A stream that
sends 50 chunks a second for minutes needs neither: this watchdog records the time
the proxy began waiting, and its single timer, when it fires, re-arms itself for the
remaining time if the backend spoke in between. Only a real silence expires it.

Rules:
1. Time spent writing to the client is not backend silence: `writing()` suspends the
   clock and `waiting()` restarts it.
2. Expiry fires the `asyncio.Timeout` it guards, so the awaiting code gets a
   `TimeoutError` at its `async with` and an outside cancellation stays a cancellation.
"""

from __future__ import annotations

import asyncio

__all__ = ["IdleWatchdog"]

# The event loop may run a timer up to its clock resolution early.
_TIMER_SLACK_S = 0.001


class IdleWatchdog:
    __slots__ = ("_handle", "_idle_s", "_loop", "_timeout", "_waiting_since", "expired")

    def __init__(self, timeout: asyncio.Timeout, idle_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._idle_s = idle_s
        self._waiting_since: float | None = self._loop.time()
        self._handle = self._loop.call_at(self._waiting_since + idle_s, self._check)
        self.expired = False

    def waiting(self) -> None:
        """The proxy starts waiting for the backend's next bytes."""
        self._waiting_since = self._loop.time()

    def writing(self) -> None:
        """The proxy is busy with the client; backend silence does not count."""
        self._waiting_since = None

    def cancel(self) -> None:
        self._handle.cancel()

    def _check(self) -> None:
        now = self._loop.time()
        since = self._waiting_since
        if since is None:
            self._handle = self._loop.call_at(now + self._idle_s, self._check)
        elif now - since >= self._idle_s - _TIMER_SLACK_S:
            self.expired = True
            self._timeout.reschedule(now)
        else:
            self._handle = self._loop.call_at(since + self._idle_s, self._check)
