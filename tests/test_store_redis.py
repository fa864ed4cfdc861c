"""What only the Redis store does, on a real redis-server: its keys and their expiry,
long windows read in one go, and outages (a stopped or a hung server) that fail fast
and heal without re-creating the store. The behaviours every store shares are in
test_store.py, run against both."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions
from redis.exceptions import RedisClusterException

from proxy.config.model import StateConfig, StateStoreKind, Variant
from proxy.rollout.machine import RouteState
from proxy.store import StatsSlice, open_store
from proxy.store.redis import (
    LEASE_KEY,
    LEGACY_STATES_KEY,
    PREFIX,
    PROCESSES_KEY,
    ROUTES_KEY,
    TIMEOUT_S,
    RedisStore,
    state_key,
    stats_key,
)
from tests.redis_server import RedisClusterNodes, RedisServer, require_redis_server
from tests.test_store import TTL_S, route_state, variant_stats

# A failing call gives up within its timeout, plus room for a slow machine; on a
# cluster, within two (a retry after asking another node for the layout).
FAIL_WITHIN_S = TIMEOUT_S + 1.0
CLUSTER_FAIL_WITHIN_S = 2 * TIMEOUT_S + 1.0


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
    one_slice = [("chat", Variant.CANARY, 1, variant_stats(1, 0, 0.1))]
    return {
        "load_states": store.load_states,
        "compare_and_set": lambda: store.compare_and_set(route_state(), 0),
        "acquire_lease": lambda: store.acquire_lease("a", TTL_S),
        "release_lease": lambda: store.release_lease("a"),
        "publish_stats": lambda: store.publish_stats("worker-1", one_slice, TTL_S),
        "read_stats": lambda: store.read_stats("chat", Variant.CANARY, 0, 10),
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
    await store.publish_stats(
        "worker-1", [("chat", Variant.CANARY, 7, variant_stats(3, 0, 0.1))], 20.0
    )
    await store.heartbeat("host:1", {"config_version": "aaa"}, 10.0)
    keys = set(await raw.keys("*"))
    slice_key = stats_key("chat", Variant.CANARY, 7)
    assert slice_key == PREFIX + "{chat}:stats:canary:7"
    assert state_key("chat") == PREFIX + "{chat}:state"
    assert keys == {state_key("chat"), ROUTES_KEY, LEASE_KEY, PROCESSES_KEY, slice_key}
    assert await raw.smembers(ROUTES_KEY) == {"chat"}
    assert await raw.pttl(state_key("chat")) == -1  # route state never expires
    assert await raw.pttl(ROUTES_KEY) == -1
    assert 29_000 < await raw.pttl(LEASE_KEY) <= 30_000
    assert 19_000 < await raw.pttl(slice_key) <= 20_000
    assert 9_000 < await raw.pttl(PROCESSES_KEY) <= 10_000


async def test_on_a_cluster_the_keys_of_a_route_share_one_slot(
    redis_cluster: RedisClusterNodes,
) -> None:
    # "chat" and "search" hash to slots on different nodes; a write that put both
    # routes' keys in one script would fail there (CROSSSLOT).
    store = RedisStore(redis_cluster.url, cluster=True)
    try:
        for route in ("chat", "search"):
            assert await store.compare_and_set(route_state(route), 0) is not None
        slices: list[StatsSlice] = [
            (route, variant, index, variant_stats(2, 1, 0.1))
            for route in ("chat", "search")
            for variant in (Variant.STABLE, Variant.CANARY)
            for index in range(5)
        ]
        await store.publish_stats("worker-1", slices, TTL_S)
        await store.heartbeat("host:1", {"config_version": "aaa"}, TTL_S)
        assert await store.acquire_lease("a", TTL_S)
        assert set(await store.load_states()) == {"chat", "search"}
        assert (await store.read_stats("search", Variant.CANARY, 0, 4)).requests == 10
    finally:
        await store.close()
    held = await asyncio.to_thread(redis_cluster.keys)
    by_route: dict[str, set[str]] = {"chat": set(), "search": set()}
    for key in held:
        assert key.startswith(PREFIX), key
        owner = next((r for r in by_route if key.startswith(f"{PREFIX}{{{r}}}:")), None)
        if owner is None:
            assert key in {ROUTES_KEY, LEASE_KEY, PROCESSES_KEY}, key
        else:
            by_route[owner].add(key)
    for route, keys in by_route.items():
        assert len(keys) == 11, keys  # the state and ten slices
        slots = {await asyncio.to_thread(redis_cluster.keyslot, key) for key in keys}
        assert len(slots) == 1, f"{route}'s keys span slots {slots}"
    # And the cluster really holds them on more than one node.
    assert len({held[key] for keys in by_route.values() for key in keys}) == 2


async def test_a_cluster_node_used_as_one_server_names_the_setting(
    redis_cluster: RedisClusterNodes,
) -> None:
    # A node that does not hold the `routes` set answers MOVED for it.
    others = [n for n in redis_cluster.nodes if n is not redis_cluster.node_of(ROUTES_KEY)]
    store = RedisStore(others[0].url)
    try:
        with pytest.raises(redis.exceptions.ResponseError, match=r"set state\.cluster: true"):
            await store.load_states()
    finally:
        await store.close()


async def test_a_slice_key_lives_as_long_as_its_longest_lived_source(
    store: RedisStore, raw: redis.asyncio.Redis
) -> None:
    key = stats_key("chat", Variant.CANARY, 1)
    await store.publish_stats(
        "worker-1", [("chat", Variant.CANARY, 1, variant_stats(1, 0, 0.1))], 30.0
    )
    await store.publish_stats(
        "worker-2", [("chat", Variant.CANARY, 1, variant_stats(1, 0, 0.1))], 0.1
    )
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
    assert sorted(await raw.hkeys(PROCESSES_KEY)) == ["host:1", "host:gone"]
    await store.heartbeat("host:1", {"config_version": "aaa"}, TTL_S)
    assert await raw.hkeys(PROCESSES_KEY) == ["host:1"]


async def test_a_window_of_hundreds_of_slices_is_read_at_once(
    store: RedisStore, raw: redis.asyncio.Redis
) -> None:
    # Ten minutes of one-second slices from three workers.
    for worker in ("worker-1", "worker-2", "worker-3"):
        slices = [("chat", Variant.CANARY, index, variant_stats(2, 1, 0.1)) for index in range(600)]
        await store.publish_stats(worker, slices, TTL_S)
    await store.read_stats("chat", Variant.CANARY, 0, 0)  # the script is loaded once
    before = await commands_served(raw)
    window = await store.read_stats("chat", Variant.CANARY, 0, 599)
    # One round trip for 600 slice keys: a single script call (the server counts its
    # clock read and its reads too). Counted, not timed: a loaded machine cannot fail it.
    served = await commands_served(raw)
    changed = {name: served[name] - before.get(name, 0) for name in served}
    assert {name: n for name, n in changed.items() if n} == {"evalsha": 1, "time": 1, "hvals": 600}
    assert (window.requests, window.errors, window.latency.count) == (3600, 1800, 3600)


async def commands_served(raw: redis.asyncio.Redis) -> dict[str, int]:
    """Calls per command the server has run, this client's INFO calls left out."""
    stats = await raw.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name != "cmdstat_info" and int(value["calls"]) > 0
    }


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


# --- the previous key layout -----------------------------------------------------------


async def test_route_states_of_the_previous_layout_are_carried_over_once(
    store: RedisStore, raw: redis.asyncio.Redis
) -> None:
    # What the previous version stored: one hash of every route's state.
    chat = RouteState.from_mapping({**route_state("chat").to_mapping(), "version": 7})
    embed = RouteState.from_mapping({**route_state("embed", weight=1.0).to_mapping(), "version": 2})
    await raw.hset(
        LEGACY_STATES_KEY,
        mapping={s.route: json.dumps(s.to_mapping()) for s in (chat, embed)},
    )
    assert await store.load_states() == {"chat": chat, "embed": embed}
    # Now under their own keys, versions kept: a compare-and-set goes on from them.
    stored = await raw.get(state_key("chat"))
    assert stored is not None
    assert json.loads(stored)["version"] == 7
    advanced = await store.compare_and_set(replace(chat, weight=25.0), 7)
    assert advanced is not None
    assert advanced.version == 8
    # The old hash is left alone, and never read over a newer state.
    assert set(await raw.hkeys(LEGACY_STATES_KEY)) == {"chat", "embed"}
    reopened = RedisStore(store.url)
    try:
        assert (await reopened.load_states())["chat"] == advanced
    finally:
        await reopened.close()


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


async def test_a_cluster_node_that_stops_fails_its_slots_fast_then_the_store_heals(
    tmp_path: Path,
) -> None:
    cluster = RedisClusterNodes(require_redis_server(), tmp_path / "cluster")
    # Made before the cluster runs: opening connects to nothing.
    store = open_store(StateConfig(StateStoreKind.REDIS, url=cluster.url, cluster=True))
    assert isinstance(store, RedisStore)
    try:
        await asyncio.to_thread(cluster.start)
        first = await store.compare_and_set(route_state(), 0)
        assert first is not None
        down = cluster.node_of(state_key("chat"))
        assert down is not cluster.node_of(LEASE_KEY)
        down.stop()
        # A call on its slots fails at once; one on another node's slots goes on.
        await assert_fails_fast(store.load_states, redis.exceptions.ConnectionError)
        assert await store.acquire_lease("a", TTL_S)
        await asyncio.to_thread(cluster.start)  # it rejoins, empty
        assert await store.load_states() == {}
        for call in every_call(store).values():
            await call()  # the same store object works again
        assert (await store.load_states())["chat"] == first
        cluster.stop()
        for name, call in every_call(store).items():
            # No node answers: the client says so at once, whichever the call.
            started = time.monotonic()
            with pytest.raises((redis.exceptions.RedisError, RedisClusterException)):
                await asyncio.wait_for(call(), CLUSTER_FAIL_WITHIN_S + 1.0)
            assert time.monotonic() - started < CLUSTER_FAIL_WITHIN_S, name
    finally:
        await store.close()
        cluster.stop()


async def test_a_hung_cluster_node_times_out_within_two_timeouts(
    redis_cluster: RedisClusterNodes,
) -> None:
    store = RedisStore(redis_cluster.url, cluster=True)
    hung = redis_cluster.node_of(state_key("chat"))
    try:
        assert await store.compare_and_set(route_state(), 0) is not None
        hung.pause()
        try:
            # The client asks another node where the slot went, and tries once more.
            started = time.monotonic()
            with pytest.raises(redis.exceptions.TimeoutError):
                await asyncio.wait_for(store.load_states(), CLUSTER_FAIL_WITHIN_S + 1.0)
            assert time.monotonic() - started < CLUSTER_FAIL_WITHIN_S
        finally:
            hung.resume()
        assert set(await store.load_states()) == {"chat"}
    finally:
        await store.close()
