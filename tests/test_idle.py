"""The idle watchdog: only real backend silence expires it."""

from __future__ import annotations

import asyncio

import pytest

from proxy.idle import IdleWatchdog


async def test_silence_longer_than_idle_raises_timeout() -> None:
    watchdogs: list[IdleWatchdog] = []

    async def wait_in_silence() -> None:
        async with asyncio.timeout(None) as timeout:
            watchdogs.append(IdleWatchdog(timeout, 0.05))
            await asyncio.sleep(1)

    with pytest.raises(TimeoutError):
        await wait_in_silence()
    assert watchdogs[0].expired


async def test_activity_keeps_it_alive_past_idle() -> None:
    async with asyncio.timeout(None) as timeout:
        watchdog = IdleWatchdog(timeout, 0.1)
        for _ in range(10):  # 0.3 s in all, but never 0.1 s of silence
            await asyncio.sleep(0.03)
            watchdog.waiting()
        watchdog.cancel()
    assert not watchdog.expired


async def test_time_spent_writing_does_not_count() -> None:
    async with asyncio.timeout(None) as timeout:
        watchdog = IdleWatchdog(timeout, 0.05)
        watchdog.writing()
        await asyncio.sleep(0.2)
        watchdog.waiting()
        watchdog.cancel()
    assert not watchdog.expired


async def test_outside_cancellation_stays_a_cancellation() -> None:
    async def body() -> None:
        async with asyncio.timeout(None) as timeout:
            IdleWatchdog(timeout, 10)
            await asyncio.sleep(10)

    task = asyncio.create_task(body())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
