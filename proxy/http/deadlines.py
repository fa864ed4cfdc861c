"""Backend timeouts (first byte, then idle gaps) checked by one ticker, not a timer per request.

A timer per request costs a heap push and a cancelled handle (more with
`asyncio.timeout`), and re-arming one per streamed chunk costs that per chunk. Here a
request registers a `Watch` (one set insertion), a chunk bumps a counter, and a single
task per process wakes every `TICK_S` to expire what is overdue.

Rules:
1. A watch starts with an absolute deadline for the first byte. `idle(idle_s)` turns
   it into an idle limit: it expires only after `idle_s` without progress.
2. While `busy` (the proxy is writing to a slow client), backend silence does not count.
   While `client_turn` (the proxy waits for the client's request body), an expiry is
   the client's fault, not the backend's: the watched code tells them apart.
3. Precision is one tick (0.1 s): nothing beside timeouts measured in seconds.
4. Expiry cancels the watched task, the way `asyncio.timeout` does; the code that
   catches the `CancelledError` asks `Watch.expired_here()` whether it was this
   expiry (then it is a timeout) or an outside cancellation (then it goes on up).
5. A watch is only ever expired while its task is suspended inside the watched code:
   the code unwatches synchronously before it leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

__all__ = ["TICK_S", "Deadlines", "Watch"]

TICK_S: Final = 0.1


class Watch:
    """One backend attempt under watch."""

    __slots__ = (
        "_idle_s",
        "_seen",
        "busy",
        "client_turn",
        "deadline",
        "expired",
        "first_byte_s",
        "progress",
        "task",
    )

    def __init__(self, task: asyncio.Task[object], deadline: float, first_byte_s: float) -> None:
        self.task = task
        self.deadline = deadline
        self.first_byte_s = first_byte_s
        self.expired = False
        self.progress = 0  # bumped by the watched code for every chunk
        self.busy = False
        self.client_turn = False
        self._idle_s: float | None = None
        self._seen = 0

    def idle(self, idle_s: float, now: float) -> None:
        """From now on, expire after `idle_s` without progress."""
        self._idle_s = idle_s
        self._seen = self.progress
        self.deadline = now + idle_s

    def overdue(self, now: float) -> bool:
        if self.client_turn:
            return False
        idle_s = self._idle_s
        if idle_s is not None and (self.busy or self.progress != self._seen):
            self._seen = self.progress
            self.deadline = now + idle_s
            return False
        return now >= self.deadline

    def expired_here(self) -> bool:
        """After a CancelledError: True when it was this watch's expiry alone."""
        return self.expired and self.task.uncancel() == 0


class Deadlines:
    """The process's ticker. `start()` in the event loop, `stop()` at shutdown."""

    def __init__(self, tick_s: float = TICK_S) -> None:
        self._tick_s = tick_s
        self._watches: set[Watch] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ticker = self._loop.create_task(self._tick(), name="canary-proxy deadlines")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    @property
    def running(self) -> bool:
        return self._ticker is not None and not self._ticker.done()

    def now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def watch(self, first_byte_s: float) -> Watch:
        """Watch the current task: it must make its first progress within `first_byte_s`."""
        task = asyncio.current_task()
        assert task is not None
        assert self._loop is not None
        watch = Watch(task, self._loop.time() + first_byte_s, first_byte_s)
        self._watches.add(watch)
        return watch

    def unwatch(self, watch: Watch) -> None:
        self._watches.discard(watch)

    async def _tick(self) -> None:
        assert self._loop is not None
        while True:
            await asyncio.sleep(self._tick_s)
            if not self._watches:
                continue
            now = self._loop.time()
            overdue = [watch for watch in self._watches if watch.overdue(now)]
            for watch in overdue:
                self._watches.discard(watch)
                watch.expired = True
                watch.task.cancel()
