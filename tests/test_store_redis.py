"""What only the Redis store does, on a real redis-server: its keys and their expiry,
long windows read in one go, and outages (a stopped or a hung server) that fail fast
and heal without re-creating the store. The behaviours every store shares are in
test_store.py, run against both."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions

from proxy.config.model import StateConfig, StateStoreKind
from proxy.store import open_store
from proxy.store.redis import PREFIX, TIMEOUT_S, RedisStore, stats_key
from tests.redis_server import RedisServer
from tests.test_store import TTL_S, route_state, variant_stats

# A failing call gives up within its timeout, plus room for a slow machine.
FAIL_WITHIN_S = TIMEOUT_S + 1.0


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    opened = RedisStore(redis_server.url)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client, to look at the keys the store wrote."""
    client = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


def every_call(store: RedisStore) -> dict[str, Callable[[], Awaitable[Any]]]:
    one_slice = [("chat", "canary", 1, variant_stats(1, 0, 0.1))]
    return {
        "load_states": store.load_states,
        "compare_and_set": lambda: store.compare_and_set(route_state(), 0),
        "acquire_lease": lambda: store.acquire_lease("a", TTL_S),
        "release_lease": lambda: store.release_lease("a"),
        "publish_stats": lambda: store.publish_stats("worker-1", one_slice, TTL_S),
        "read_stats": lambda: store.read_stats("chat", "canary", 0, 10),
        "heartbeat": lambda: store.heartbeat("host:1", {"config_version": "aaa"}, TTL_S),
        "processes": store.processes,
    }


async def assert_fails_fast(
    call: Callable[[], Awaitable[Any]], error: type[redis.exceptions.RedisError]
) -> None:
    started = time.monotonic()
    with pytest.raises(error):
        await asyncio.wait_for(call(), FAIL_WITHIN_S + 1.0)
    assert time.monotonic() - started < FAIL_WITHIN_S


# --- keys -------------------------------------------------------------------------------


async def test_every_key_is_under_the_prefix_and_the_shared_ones_expire(
    store: RedisStore, raw: redis.asyncio.Redis
) -> None:
    assert await store.compare_and_set(route_state(), 0) is not None
    assert await store.acquire_lease("a", 30.0)
    await store.publish_stats("worker-1", [("chat", "canary", 7, variant_stats(3, 0, 0.1))], 20.0)
    await store.heartbeat("host:1", {"config_version": "aaa"}, 10.0)
    keys = set(await raw.keys("*"))
    slice_key = stats_key("chat", "canary", 7)
    assert slice_key == f"{PREFIX}stats:chat:canary:7"
    assert keys == {f"{PREFIX}states", f"{PREFIX}lease", f"{PREFIX}processes", slice_key}
    assert await raw.pttl(f"{PREFIX}states") == -1  # route state never expires
    assert 29_000 < await raw.pttl(f"{PREFIX}lease") <= 30_000
    assert 19_000 < await raw.pttl(slice_key) <= 20_000
    assert 9_000 < await raw.pttl(f"{PREFIX}processes") <= 10_000


async def test_a_slice_key_lives_as_long_as_its_longest_lived_source(
    store: RedisStore, raw: redis.asyncio.Redis
) -> None:
    key = stats_key("chat", "canary", 1)
    await store.publish_stats("worker-1", [("chat", "canary", 1, variant_stats(1, 0, 0.1))], 30.0)
    await store.publish_stats("worker-2", [("chat", "canary", 1, variant_stats(1, 0, 0.1))], 0.1)
    assert await raw.pttl(key) > 29_000  # the shorter write did not cut the longer one
    assert set(await raw.hkeys(key)) == {"worker-1", "worker-2"}


async def test_a_heartbeat_deletes_the_expired_ones(
    store: RedisStore, raw: redis.asyncio.Redis
) -> None:
    await store.heartbeat("host:1", {"config_version": "aaa"}, TTL_S)
    await store.heartbeat("host:gone", {"config_version": "aaa"}, 0.05)
    await asyncio.sleep(0.1)
    # Expired: not listed, but still stored until the next beat of anyone.
    assert [info["source"] for info in await store.processes()] == ["host:1"]
    assert sorted(await raw.hkeys(f"{PREFIX}processes")) == ["host:1", "host:gone"]
    await store.heartbeat("host:1", {"config_version": "aaa"}, TTL_S)
    assert await raw.hkeys(f"{PREFIX}processes") == ["host:1"]


async def test_a_window_of_hundreds_of_slices_is_read_at_once(store: RedisStore) -> None:
    # Ten minutes of one-second slices from three workers.
    for worker in ("worker-1", "worker-2", "worker-3"):
        slices = [("chat", "canary", index, variant_stats(2, 1, 0.1)) for index in range(600)]
        await store.publish_stats(worker, slices, TTL_S)
    started = time.monotonic()
    window = await store.read_stats("chat", "canary", 0, 599)
    assert time.monotonic() - started < 1.0
    assert (window.requests, window.errors, window.latency.count) == (3600, 1800, 3600)


async def test_open_store_picks_redis_and_does_not_connect_yet(
    redis_server: RedisServer,
) -> None:
    redis_server.stop()  # a process may start while Redis is down
    store = open_store(StateConfig(StateStoreKind.REDIS, url=redis_server.url))
    try:
        assert isinstance(store, RedisStore)
        redis_server.start()
        assert await store.acquire_lease("a", TTL_S)
    finally:
        await store.close()


# --- outages ----------------------------------------------------------------------------


async def test_a_stopped_redis_fails_every_call_at_once_then_the_store_heals(
    store: RedisStore, redis_server: RedisServer
) -> None:
    first = await store.compare_and_set(route_state(), 0)
    assert first is not None
    assert await store.acquire_lease("a", TTL_S)
    redis_server.stop()
    for call in every_call(store).values():
        await assert_fails_fast(call, redis.exceptions.ConnectionError)
    redis_server.start()  # same port, empty (no persistence)
    assert await store.load_states() == {}
    for call in every_call(store).values():
        await call()  # the same store object works again
    assert (await store.load_states())["chat"] == first


async def test_a_hung_redis_times_out_then_the_store_heals(
    store: RedisStore, redis_server: RedisServer
) -> None:
    assert await store.acquire_lease("a", TTL_S)
    redis_server.pause()
    try:
        await assert_fails_fast(store.load_states, redis.exceptions.TimeoutError)
        await assert_fails_fast(
            lambda: store.acquire_lease("a", TTL_S), redis.exceptions.TimeoutError
        )
    finally:
        redis_server.resume()
    assert await store.acquire_lease("a", TTL_S)
    assert await store.load_states() == {}
