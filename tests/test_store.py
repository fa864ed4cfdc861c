"""Every state store, on real files, a real redis-server, a real three-node Redis
Cluster and in memory: compare-and-set state, the lease, shared stats, heartbeats. Each
behaviour runs against each store, Redis both ways; what only one of them does is
tested beside it (and in test_store_redis.py)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.config.model import StateConfig, StateStoreKind, Variant
from proxy.judge.analysis import CheckResult, Judgement, Verdict
from proxy.judge.histogram import LogHistogram
from proxy.judge.stats import VariantStats
from proxy.rollout.machine import Action, Cause, Decision, RouteState, Status
from proxy.store import STORES, StateStore, StatsSlice, open_store
from proxy.store.memory import MemoryStore
from proxy.store.sqlite import SqliteStore

NOW = 1_800_000_000.0
TTL_S = 60.0


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "state" / "canary-state.db")


# Opens one more client of the same store, as another process would.
Connect = Callable[[], AbstractAsyncContextManager[StateStore]]


# Every store kind, Redis both as one server and as a three-node Redis Cluster, and the
# store in memory (no kind of its own).
SETUPS = {
    "sqlite": StateStoreKind.SQLITE,
    "redis": StateStoreKind.REDIS,
    "redis-cluster": StateStoreKind.REDIS,
    "memory": None,
}


@pytest.fixture(params=list(SETUPS))
def connect(request: pytest.FixtureRequest, db_path: str) -> Connect:
    if request.param == "memory":  # one store in memory: every "process" opens the same
        shared = MemoryStore()

        @asynccontextmanager
        async def in_memory() -> AsyncIterator[StateStore]:
            yield shared

        return in_memory
    if request.param == "redis-cluster":
        url = request.getfixturevalue("redis_cluster").url
        config = StateConfig(StateStoreKind.REDIS, url=url, cluster=True)
    elif request.param == "redis":
        config = StateConfig(StateStoreKind.REDIS, url=request.getfixturevalue("redis_server").url)
    else:
        config = StateConfig(StateStoreKind.SQLITE, db_path)

    @asynccontextmanager
    async def opened() -> AsyncIterator[StateStore]:
        store = open_store(config)
        try:
            yield store
        finally:
            await store.close()

    return opened


def route_state(route: str = "chat", weight: float = 5.0, step: int = 1) -> RouteState:
    judgement = Judgement(
        Verdict.PASS,
        (CheckResult("error_rate", Verdict.PASS, 0.001, 0.002, 0.012, 800, 900, "within"),),
        800,
        900,
        "within",
    )
    decision = Decision(
        NOW,
        Cause.PASS,
        Action.ADVANCE,
        1.0,
        weight,
        Status.PROGRESSING,
        f"weight 1% → {weight:g}%: within",
        judgement.to_mapping(),
    )
    return RouteState(
        route,
        Status.PROGRESSING,
        weight,
        step,
        passes=1,
        failures=0,
        step_started_at=NOW,
        canary="abc123",
        config_weight=0.0,
        decisions=(decision,),
        verdict={**judgement.to_mapping(), "at": NOW},
    )


def variant_stats(requests: int, errors: int, latency_s: float) -> VariantStats:
    stats = VariantStats()
    for i in range(requests):
        stats.record(latency_s, latency_s / 4, "timeout" if i < errors else None, 10)
    return stats


def stored_rows(path: str) -> int:
    connection = sqlite3.connect(path)
    try:
        (count,) = connection.execute("SELECT COUNT(*) FROM stats").fetchone()
    finally:
        connection.close()
    assert isinstance(count, int)
    return count


# --- state: compare-and-set -------------------------------------------------------------


async def test_first_write_stores_version_one(connect: Connect) -> None:
    async with connect() as store:
        assert await store.load_states() == {}
        written = await store.compare_and_set(route_state(), 0)
        assert written is not None
        assert written.version == 1
        assert written == replace(route_state(), version=1)
        assert await store.load_states() == {"chat": written}


async def test_compare_and_set_bumps_the_version_and_refuses_stale_ones(connect: Connect) -> None:
    async with connect() as store:
        first = await store.compare_and_set(route_state(), 0)
        assert first is not None
        second = await store.compare_and_set(replace(first, weight=10.0, step=2), first.version)
        assert second is not None
        assert (second.version, second.weight) == (2, 10.0)
        # Both a write over the old version and a second "first" write lose.
        assert await store.compare_and_set(replace(first, weight=25.0), 1) is None
        assert await store.compare_and_set(replace(first, weight=25.0), 0) is None
        assert await store.compare_and_set(replace(first, weight=25.0), 3) is None
        assert (await store.load_states())["chat"] == second


async def test_routes_are_versioned_separately(connect: Connect) -> None:
    async with connect() as store:
        chat = await store.compare_and_set(route_state("chat"), 0)
        embed = await store.compare_and_set(route_state("embed", weight=1.0, step=0), 0)
        assert chat is not None
        assert embed is not None
        assert (chat.version, embed.version) == (1, 1)
        assert set(await store.load_states()) == {"chat", "embed"}


async def test_states_survive_a_restart(connect: Connect) -> None:
    async with connect() as store:
        first = await store.compare_and_set(route_state(), 0)
        assert first is not None
        rolled_back = replace(first, status=Status.ROLLED_BACK, weight=0.0, step=-1)
        written = await store.compare_and_set(rolled_back, first.version)
        other = await store.compare_and_set(route_state("embed"), 0)
    async with connect() as reopened:
        loaded = await reopened.load_states()
    assert loaded == {"chat": written, "embed": other}
    assert loaded["chat"].decisions == route_state().decisions
    assert loaded["chat"].verdict == route_state().verdict


async def test_only_one_of_two_processes_wins_a_compare_and_set(connect: Connect) -> None:
    async with connect() as one, connect() as two:
        base = await one.compare_and_set(route_state(), 0)
        assert base is not None
        seen_by_two = (await two.load_states())["chat"]
        results = await asyncio.gather(
            one.compare_and_set(replace(base, weight=10.0), base.version),
            two.compare_and_set(replace(seen_by_two, weight=0.0), seen_by_two.version),
        )
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        assert winners[0].version == 2
        assert (await one.load_states())["chat"] == winners[0]
        assert (await two.load_states())["chat"] == winners[0]


async def test_only_one_of_two_processes_wins_the_first_write(connect: Connect) -> None:
    async with connect() as one, connect() as two:
        results = await asyncio.gather(
            one.compare_and_set(route_state(weight=5.0), 0),
            two.compare_and_set(route_state(weight=1.0, step=0), 0),
        )
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        assert (await two.load_states())["chat"] == winners[0]


# --- the lease --------------------------------------------------------------------------


LEASE_S = 1.8


async def test_lease_is_held_by_one_holder_until_it_expires(connect: Connect) -> None:
    # The only timing this relies on: each check after a sleep runs within a third of a
    # lease (0.6 s) of that sleep's end; 0.6 s leases failed on a loaded machine.
    lease = LEASE_S
    async with connect() as one, connect() as two:
        assert await one.acquire_lease("a", lease)
        assert not await two.acquire_lease("b", lease)
        await asyncio.sleep(lease / 2)
        assert await one.acquire_lease("a", lease)  # renewed: good for another term
        await asyncio.sleep(lease * 2 / 3)
        assert not await two.acquire_lease("b", lease)  # past the first term, inside the renewal
        await asyncio.sleep(lease * 2 / 3)
        assert await two.acquire_lease("b", 10.0)  # expired: the other takes it
        assert not await one.acquire_lease("a", 10.0)


async def test_released_lease_can_be_taken_at_once(connect: Connect) -> None:
    async with connect() as one, connect() as two:
        assert await one.acquire_lease("a", 60.0)
        await two.release_lease("b")  # not the holder: nothing happens
        assert not await two.acquire_lease("b", 60.0)
        await one.release_lease("a")
        assert await two.acquire_lease("b", 60.0)
        assert not await one.acquire_lease("a", 60.0)


# --- stats ------------------------------------------------------------------------------


async def test_stats_from_two_sources_are_merged(connect: Connect) -> None:
    a_canary, b_canary = variant_stats(100, 3, 0.5), variant_stats(50, 2, 2.0)
    a_stable = variant_stats(400, 1, 0.4)
    async with connect() as one, connect() as two:
        await one.publish_stats(
            "worker-1",
            [("chat", Variant.CANARY, 10, a_canary), ("chat", Variant.STABLE, 10, a_stable)],
            TTL_S,
        )
        await two.publish_stats("worker-2", [("chat", Variant.CANARY, 10, b_canary)], TTL_S)
        canary = await one.read_stats("chat", Variant.CANARY, 10, 10)
        stable = await two.read_stats("chat", Variant.STABLE, 0, 100)
    assert (canary.requests, canary.errors) == (150, 5)
    assert canary.errors_by_type == {"timeout": 5}
    assert canary.output_tokens == 1500
    assert (
        canary.latency.buckets == LogHistogram.merged([a_canary.latency, b_canary.latency]).buckets
    )
    assert canary.latency.count == 150
    assert canary.latency.sum == pytest.approx(100 * 0.5 + 50 * 2.0)
    assert canary.ttft.count == 150
    assert (stable.requests, stable.errors, stable.latency.count) == (400, 1, 400)


async def test_republishing_a_slice_replaces_it(connect: Connect) -> None:
    async with connect() as store:
        await store.publish_stats(
            "worker-1", [("chat", Variant.CANARY, 7, variant_stats(10, 1, 1.0))], TTL_S
        )
        await store.publish_stats(
            "worker-1", [("chat", Variant.CANARY, 7, variant_stats(25, 4, 1.0))], TTL_S
        )
        merged = await store.read_stats("chat", Variant.CANARY, 7, 7)
    assert (merged.requests, merged.errors, merged.latency.count) == (25, 4, 25)


async def test_only_slices_in_range_and_of_the_variant_are_read(connect: Connect) -> None:
    slices: list[StatsSlice] = [
        ("chat", Variant.CANARY, index, variant_stats(10 * (index - 9), 0, 0.1))
        for index in range(10, 15)
    ]
    slices.append(("chat", Variant.STABLE, 12, variant_stats(1000, 0, 0.1)))
    slices.append(("embed", Variant.CANARY, 12, variant_stats(1000, 0, 0.1)))
    async with connect() as store:
        await store.publish_stats("worker-1", slices, TTL_S)
        # Slices 11, 12 and 13 hold 20 + 30 + 40 requests.
        window = await store.read_stats("chat", Variant.CANARY, 11, 13)
        assert window.requests == 90
        assert (await store.read_stats("chat", Variant.CANARY, 15, 20)).requests == 0
        assert (await store.read_stats("chat", Variant.CANARY, 14, 14)).requests == 50


async def test_expired_slices_are_not_read(connect: Connect) -> None:
    async with connect() as store:
        await store.publish_stats(
            "worker-1", [("chat", Variant.CANARY, 1, variant_stats(10, 0, 0.1))], 0.1
        )
        await store.publish_stats(
            "worker-2", [("chat", Variant.CANARY, 1, variant_stats(5, 0, 0.1))], TTL_S
        )
        assert (await store.read_stats("chat", Variant.CANARY, 1, 1)).requests == 15
        await asyncio.sleep(0.2)
        # Expired on its own: not read, even before anything else is written.
        assert (await store.read_stats("chat", Variant.CANARY, 1, 1)).requests == 5
        await store.publish_stats(
            "worker-2", [("chat", Variant.CANARY, 2, variant_stats(1, 0, 0.1))], TTL_S
        )
        assert (await store.read_stats("chat", Variant.CANARY, 1, 2)).requests == 6


async def test_sqlite_deletes_expired_slices_on_the_next_write(db_path: str) -> None:
    store = SqliteStore(db_path)
    try:
        one_slice = [("chat", Variant.CANARY, 1, variant_stats(1, 0, 0.1))]
        await store.publish_stats("worker-1", one_slice, 0.1)
        await store.publish_stats("worker-2", one_slice, TTL_S)
        await asyncio.sleep(0.2)
        assert stored_rows(db_path) == 2  # expired, not read, still in the file
        await store.publish_stats("worker-2", [("chat", Variant.CANARY, 2, one_slice[0][3])], TTL_S)
        assert stored_rows(db_path) == 2  # worker-1's went, worker-2's second came
    finally:
        await store.close()


async def test_heartbeats_list_live_processes_until_they_expire(connect: Connect) -> None:
    async with connect() as store, connect() as other:
        await store.heartbeat("host:1", {"config_version": "aaa", "leader": True}, TTL_S)
        await other.heartbeat("host:2", {"config_version": "bbb", "leader": False}, 0.1)
        assert await store.processes() == [
            {"config_version": "aaa", "leader": True, "source": "host:1"},
            {"config_version": "bbb", "leader": False, "source": "host:2"},
        ]
        # A second beat replaces the first.
        await store.heartbeat("host:1", {"config_version": "ccc", "leader": True}, TTL_S)
        await asyncio.sleep(0.2)
        assert await other.processes() == [
            {"config_version": "ccc", "leader": True, "source": "host:1"}
        ]


async def test_open_store_picks_sqlite_from_the_config(db_path: str) -> None:
    store = open_store(StateConfig(StateStoreKind.SQLITE, db_path))
    try:
        assert isinstance(store, SqliteStore)
        assert await asyncio.to_thread(Path(db_path).exists)
    finally:
        await store.close()


def test_every_store_kind_is_available_and_tested() -> None:
    assert set(STORES) == set(StateStoreKind)
    assert set(SETUPS.values()) - {None} == set(StateStoreKind)


def test_workers_opening_a_new_file_at_once_all_open_it(tmp_path: Path) -> None:
    # Workers of `run --workers N` start together; each opens the store at start.
    failures: list[Exception] = []
    for attempt in range(20):
        path = str(tmp_path / f"attempt-{attempt}" / "canary-state.db")
        barrier = threading.Barrier(4)
        opened: list[SqliteStore] = []

        def open_it(
            path: str = path,
            barrier: threading.Barrier = barrier,
            opened: list[SqliteStore] = opened,
        ) -> None:
            barrier.wait()
            try:
                opened.append(SqliteStore(path))
            except sqlite3.Error as exc:
                failures.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        for store in opened:
            asyncio.run(store.close())
    assert failures == []
    with sqlite3.connect(tmp_path / "attempt-0" / "canary-state.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
