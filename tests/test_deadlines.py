"""Backend timeouts from one ticker: only a real silence expires a watch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.http.deadlines import Deadlines, Watch


@pytest.fixture
async def deadlines() -> AsyncIterator[Deadlines]:
    ticker = Deadlines(tick_s=0.02)
    ticker.start()
    yield ticker
    await ticker.stop()


async def guarded(deadlines: Deadlines, watch: Watch, work: asyncio.Future[None] | float) -> str:
    """Await `work` under `watch`; what happened: done, expired or cancelled."""
    try:
        if isinstance(work, float):
            await asyncio.sleep(work)
        else:
            await work
    except asyncio.CancelledError:
        if watch.expired_here():
            return "expired"
        raise
    finally:
        deadlines.unwatch(watch)
    return "done"


async def test_first_byte_deadline_expires_a_silent_attempt(deadlines: Deadlines) -> None:
    async def attempt() -> str:
        return await guarded(deadlines, deadlines.watch(0.1), 5.0)

    started = asyncio.get_running_loop().time()
    assert await attempt() == "expired"
    assert 0.1 <= asyncio.get_running_loop().time() - started < 1.0


async def test_work_done_in_time_is_not_expired(deadlines: Deadlines) -> None:
    async def attempt() -> str:
        return await guarded(deadlines, deadlines.watch(1.0), 0.05)

    assert await attempt() == "done"


async def test_progress_keeps_an_idle_watch_alive(deadlines: Deadlines) -> None:
    async def stream() -> str:
        watch = deadlines.watch(1.0)
        watch.idle(0.1, deadlines.now())
        try:
            for _ in range(10):  # 0.4 s in all, never 0.1 s without progress
                await asyncio.sleep(0.04)
                watch.progress += 1
        except asyncio.CancelledError:
            if watch.expired_here():
                return "expired"
            raise
        finally:
            deadlines.unwatch(watch)
        return "done"

    assert await stream() == "done"


async def test_silence_past_idle_expires_the_watch(deadlines: Deadlines) -> None:
    async def stream() -> str:
        watch = deadlines.watch(1.0)
        watch.idle(0.1, deadlines.now())
        return await guarded(deadlines, watch, 2.0)

    assert await stream() == "expired"


async def test_busy_time_writing_to_the_client_does_not_count(deadlines: Deadlines) -> None:
    async def stream() -> str:
        watch = deadlines.watch(1.0)
        watch.idle(0.05, deadlines.now())
        watch.busy = True
        return await guarded(deadlines, watch, 0.3)

    assert await stream() == "done"


async def test_an_outside_cancellation_stays_a_cancellation(deadlines: Deadlines) -> None:
    started = asyncio.Event()

    async def attempt() -> str:
        watch = deadlines.watch(5.0)
        started.set()
        return await guarded(deadlines, watch, 5.0)

    task = asyncio.create_task(attempt())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_expiry_and_outside_cancellation_together_stay_a_cancellation(
    deadlines: Deadlines,
) -> None:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    watches: list[Watch] = []

    async def attempt() -> str:
        watch = deadlines.watch(60)
        watches.append(watch)
        return await guarded(deadlines, watch, future)

    task = asyncio.create_task(attempt())
    await asyncio.sleep(0)  # the attempt starts and waits
    # What the ticker does on expiry, and the client leaving in the same instant:
    watches[0].expired = True
    task.cancel()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_stop_ends_the_ticker() -> None:
    ticker = Deadlines(tick_s=0.01)
    ticker.start()
    running = [ticker.running]
    await ticker.stop()
    running.append(ticker.running)
    assert running == [True, False]
    await ticker.stop()  # twice is harmless
