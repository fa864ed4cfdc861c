"""A fleet of replicas sharing `state.store: redis` (SPEC §10), with a real redis-server
and a real three-node Redis Cluster.

Three `canary-proxy run` processes, as three pods would run, share one config file
(ports 0) and one Redis; traffic goes through all three. One controller decides for
them all, every replica serves its decisions within 2 s, a dead leader's lease passes
on, and a Redis outage costs no request. On a cluster, two replicas roll back one
route and keep rolling out another, each route's keys in one slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.store.redis import PREFIX
from tests.conftest import Backends
from tests.harness import (
    BackendProcess,
    auto_rollout,
    eventually,
    proxy_yaml,
    start_backend,
    sticky,
)
from tests.proxy_process import CHAT, ProxyProcess, proxy_processes, send
from tests.redis_server import RedisClusterNodes, RedisServer

pytestmark = pytest.mark.timeout(90)

LEASE_S = 5.0  # proxy.server.controller.LEASE_S


@pytest.fixture
def faulty_pair() -> Iterator[tuple[BackendProcess, BackendProcess]]:
    stable = start_backend("m-stable")
    canary = start_backend("m-canary", "--error-rate", "0.5")
    yield stable, canary
    stable.stop()
    canary.stop()


def fleet_config(
    path: Path,
    stable: str,
    canary: str,
    redis_url: str,
    *,
    weight: float = 20,
    pass_intervals: int = 1000,
    comment: str = "",
    steps: str = "[20, 50, 100]",
    listen: tuple[int, int] = (0, 0),
) -> Path:
    path.write_text(
        proxy_yaml(
            stable,
            canary,
            route=sticky("fleet")
            + auto_rollout(weight, steps=steps, pass_intervals=pass_intervals),
            top=f"# {comment}\nstate: {{store: redis, url: '{redis_url}'}}",
            listen=f"127.0.0.1:{listen[0]}",
            admin=f"{{listen: 127.0.0.1:{listen[1]}}}",
        )
    )
    return path


@contextlib.asynccontextmanager
async def traffic(replicas: list[ProxyProcess]) -> AsyncIterator[list[tuple[int, float]]]:
    """Requests from many users, round robin over the replicas, until the block ends.

    Yields (status, seconds) per request; a request that fails to connect is status 0.
    """
    answers: list[tuple[int, float]] = []
    stop = asyncio.Event()

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            n = 0
            while not stop.is_set() and n < 20_000:
                n += 1
                proxy = replicas[n % len(replicas)]
                started = time.monotonic()
                try:
                    code, _ = await send(session, proxy.url, f"user-{n}", new_connection=False)
                except aiohttp.ClientError:
                    code = 0
                answers.append((code, time.monotonic() - started))
                await asyncio.sleep(0.003)

    task = asyncio.create_task(run())
    try:
        yield answers
    finally:
        stop.set()
        await task


async def the_leader(replicas: list[ProxyProcess], timeout_s: float = 10.0) -> int:
    """Wait until exactly one replica holds the lease; its position."""
    held = await eventually(
        "one leader",
        lambda: leaders(replicas),
        holds=lambda held: len(held) == 1,
        timeout_s=timeout_s,
        interval_s=0.1,
    )
    return held[0]


async def leaders(replicas: list[ProxyProcess]) -> list[int]:
    """Which replicas (by position) hold the lease, by their own account."""
    documents = await statuses(replicas)
    return [n for n, d in enumerate(documents) if d["controller"]["leader"]]


async def statuses(replicas: list[ProxyProcess]) -> list[dict[str, Any]]:
    """Each replica's /api/status document."""
    return list(await asyncio.gather(*(r.status() for r in replicas)))


async def until_replicas(
    replicas: list[ProxyProcess],
    what: str,
    each: Callable[[dict[str, Any]], object],
    *,
    timeout_s: float,
    every: Callable[[Iterable[object]], bool] = all,
) -> list[dict[str, Any]]:
    """Wait until `each` holds for every replica's status (or for some, `every=any`)."""
    return await eventually(
        what,
        lambda: statuses(replicas),
        holds=lambda documents: every(each(d) for d in documents),
        timeout_s=timeout_s,
        interval_s=0.1,
    )


def rollout_status(document: dict[str, Any]) -> str:
    return str(document["routes"][0]["rollout"]["status"])


async def served_weights(replicas: list[ProxyProcess]) -> list[float]:
    """`canary_weight_ratio` on every replica's /metrics."""
    return [value for r in replicas for _, value in await r.samples("canary_weight_ratio")]


async def test_one_rollback_decided_once_and_served_by_every_replica(
    tmp_path: Path, redis_server: RedisServer, faulty_pair: tuple[BackendProcess, BackendProcess]
) -> None:
    stable, canary = faulty_pair
    config = fleet_config(tmp_path / "proxy.yaml", stable.url, canary.url, redis_server.url)
    with proxy_processes(config, config, config) as replicas:
        async with traffic(replicas):
            await until_replicas(
                replicas,
                "a rollback on some replica",
                lambda d: rollout_status(d) == "rolled_back",
                every=any,
                timeout_s=30,
            )
            # From the first replica seen serving it, every replica within 2 s.
            seen = time.monotonic()
            await eventually(
                "weight 0 on every replica",
                lambda: served_weights(replicas),
                holds=lambda weights: weights == [0.0, 0.0, 0.0],
                timeout_s=5,
            )
            elapsed = time.monotonic() - seen
        documents = await statuses(replicas)
    assert elapsed <= 2.0, f"every replica served the rollback {elapsed:.2f}s after the first"
    rollbacks = [
        [d for d in doc["routes"][0]["rollout"]["decisions"] if d["action"] == "rollback"]
        for doc in documents
    ]
    assert [len(r) for r in rollbacks] == [1, 1, 1], "one decision, seen alike by all"
    assert rollbacks[0] == rollbacks[1] == rollbacks[2]
    assert "error rate" in rollbacks[0][0]["reason"]
    explained = [r for r in replicas if "route chat: " in r.log and "rolled back" in r.log]
    assert len(explained) == 1, "decided and explained by one controller, not three"


async def test_a_dead_leaders_lease_passes_on_within_the_lease_time(
    tmp_path: Path, redis_server: RedisServer, backends: Backends
) -> None:
    stable = backends.stable
    config = fleet_config(tmp_path / "proxy.yaml", stable.url, stable.url, redis_server.url)
    with proxy_processes(config, config, config) as replicas:
        leader = replicas[await the_leader(replicas)]
        rest = [r for r in replicas if r is not leader]
        os.kill(leader.pid, signal.SIGKILL)
        killed = time.monotonic()
        taken = await eventually(
            "a new leader", lambda: leaders(rest), timeout_s=LEASE_S + 3, interval_s=0.1
        )
        elapsed = time.monotonic() - killed
        assert len(taken) == 1
        assert elapsed <= LEASE_S + 2.0, f"the lease passed on after {elapsed:.1f}s"
        await asyncio.sleep(1.5)
        document = await rest[0].status()
        assert len(document["processes"]) == 2, "the dead replica dropped out of the list"


async def test_a_redis_outage_fails_no_request_and_decisions_resume(
    tmp_path: Path, redis_server: RedisServer, backends: Backends
) -> None:
    stable = backends.stable
    config = fleet_config(tmp_path / "proxy.yaml", stable.url, stable.url, redis_server.url)
    with proxy_processes(config, config, config) as replicas:
        async with traffic(replicas) as answers:
            await asyncio.sleep(1.5)
            before = len(answers)
            redis_server.stop()
            await until_replicas(
                replicas,
                "every replica seeing the store down",
                lambda d: d["controller"]["store_up"] is False,
                timeout_s=5,
            )
            await asyncio.sleep(2.0)
            during = answers[before:]
            up = [value for r in replicas for _, value in await r.samples("canary_state_store_up")]
            redis_server.start()
            await until_replicas(
                replicas,
                "every replica seeing the store up again",
                lambda d: d["controller"]["store_up"],
                timeout_s=8,
            )
            await eventually(
                "a leader again", lambda: leaders(replicas), timeout_s=8, interval_s=0.1
            )
        after = answers[before + len(during) :]
        # Decisions resume: an operator's action goes through and reaches every replica.
        code, answer = await replicas[0].admin("POST", "/api/routes/chat/pause")
        await until_replicas(
            replicas,
            "the pause on every replica",
            lambda d: rollout_status(d) == "paused",
            timeout_s=3,
        )
    assert len(during) > 50
    assert {code for code, _ in answers} == {200}, "no request failed"
    assert max(seconds for _, seconds in during) < 0.5, "no request waited on the store"
    assert up == [0.0, 0.0, 0.0]
    assert all("the state store is unreachable" in r.log for r in replicas)
    assert all("decisions pause" in r.log for r in replicas)
    assert all("the state store answers again" in r.log for r in replicas)
    assert after, "requests went on after Redis came back"
    assert code == 200, answer
    assert any("restored it from memory" in r.log for r in replicas), (
        "the Redis restarted empty; the state came back from the replicas"
    )


async def test_a_replica_started_while_redis_is_down_serves_its_config_weights(
    tmp_path: Path, redis_server: RedisServer, backends: Backends
) -> None:
    stable, canary = backends.stable, backends.canary
    redis_server.stop()
    config = fleet_config(
        tmp_path / "proxy.yaml", stable.url, canary.url, redis_server.url, weight=100
    )
    with proxy_processes(config) as (replica,):
        async with aiohttp.ClientSession() as session:
            answers = [await send(session, replica.url, f"user-{n}") for n in range(20)]
        assert answers == [(200, "canary")] * 20
        document = await replica.status()
        assert document["controller"]["store_up"] is False
        assert document["controller"]["store_error"]
        assert "serving the config's weights" in replica.log
        shown = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "proxy", "status", "--admin", replica.admin_url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert shown.returncode == 0, shown.stderr
        assert "state store redis: DOWN since" in shown.stdout
        assert "decisions paused" in shown.stdout
        redis_server.start()
        await eventually(
            "the store up",
            replica.status,
            holds=lambda document: document["controller"]["store_up"],
            timeout_s=6,
            interval_s=0.1,
        )
        document = await eventually(
            "the rollout progressing",
            replica.status,
            holds=lambda document: document["routes"][0]["rollout"].get("status") == "progressing",
            timeout_s=3,
            interval_s=0.1,
        )
        assert document["routes"][0]["rollout"]["weight"] == 100


async def test_replicas_on_one_host_with_their_own_ports_promote_a_healthy_canary(
    tmp_path: Path, redis_server: RedisServer, backends: Backends
) -> None:
    """Two units on one host: their files differ in ports and comments, not in what
    the fleet shares, so they act as one and the rollout goes all the way."""
    stable = backends.stable
    args = (stable.url, stable.url, redis_server.url)
    first = fleet_config(
        tmp_path / "a.yaml", *args, pass_intervals=1, comment="unit a", listen=free_ports()
    )
    second = fleet_config(
        tmp_path / "b.yaml", *args, pass_intervals=1, comment="unit b", listen=free_ports()
    )
    with proxy_processes(first, second) as replicas:
        async with traffic(replicas):
            documents = await eventually(
                "the promotion on both replicas",
                lambda: statuses(replicas),
                holds=promoted_and_never_held,
                timeout_s=45,
                interval_s=0.2,
            )
    assert [d["routes"][0]["weight"] for d in documents] == [100, 100]
    assert len({d["config"]["version"] for d in documents}) == 2, "the files differ"
    assert len({d["config"]["fleet_version"] for d in documents}) == 1, "what they share agrees"
    assert len({p["fleet_version"] for p in documents[0]["processes"]}) == 1


async def test_replicas_with_different_steps_hold_and_say_which_setting_differs(
    tmp_path: Path, redis_server: RedisServer, backends: Backends
) -> None:
    stable = backends.stable
    args = (stable.url, stable.url, redis_server.url)
    first = fleet_config(tmp_path / "a.yaml", *args, pass_intervals=1)
    second = fleet_config(tmp_path / "b.yaml", *args, pass_intervals=1, steps="[20, 60, 100]")
    with proxy_processes(first, second) as replicas:
        async with traffic(replicas):
            await asyncio.sleep(5)
            documents = await statuses(replicas)
            held = [d["controller"]["held_because"] for d in documents if d["controller"]["leader"]]
            shown = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "proxy", "status", "--admin", replicas[0].admin_url],
                capture_output=True,
                text=True,
                timeout=30,
            )
            # The same steps everywhere: the rollout goes on (each replica reloads).
            fleet_config(second, *args, pass_intervals=1, comment="fixed")
            await eventually(
                "the rollout going on",
                replicas[1].status,
                holds=lambda document: document["routes"][0]["weight"] > 20,
                timeout_s=15,
                interval_s=0.2,
            )
    assert [d["routes"][0]["weight"] for d in documents] == [20, 20], "held at step one"
    assert held
    why = "the live processes do not share one config: routes.chat.rollout.auto.steps ("
    assert held[0].startswith(why), held[0]
    assert "[20.0, 50.0, 100.0] on " in held[0]
    assert "[20.0, 60.0, 100.0] on " in held[0]
    assert len({p["fleet_version"] for p in documents[0]["processes"]}) == 2
    assert f"steps held: {why}" in shown.stdout, shown.stdout
    assert any(f"rollout steps held: {why}" in r.log for r in replicas)
    assert any("share one config again" in r.log for r in replicas)


def promoted_and_never_held(documents: list[dict[str, Any]]) -> bool:
    assert not any(d["controller"]["held_because"] for d in documents), documents
    return all(d["routes"][0]["rollout"]["status"] == "promoted" for d in documents)


async def counted(proxy: ProxyProcess) -> int:
    """The requests /api/status counts on the route, both variants."""
    variants = (await proxy.status())["routes"][0]["variants"]
    return int(variants["stable"]["requests"] + variants["canary"]["requests"])


def free_ports() -> tuple[int, int]:
    """Two ports on 127.0.0.1 free right now, different: a proxy's and its admin's."""
    with socket.socket() as one, socket.socket() as two:
        one.bind(("127.0.0.1", 0))
        two.bind(("127.0.0.1", 0))
        return int(one.getsockname()[1]), int(two.getsockname()[1])


async def test_a_replica_that_drains_hands_on_its_lease_and_its_last_stats(
    tmp_path: Path, redis_server: RedisServer, backends: Backends
) -> None:
    stable = backends.stable
    config = fleet_config(tmp_path / "proxy.yaml", stable.url, stable.url, redis_server.url)
    with proxy_processes(config, config) as replicas:
        held = await the_leader(replicas)
        leaving, staying = replicas[held], replicas[1 - held]
        async with aiohttp.ClientSession() as session:
            answers = [await send(session, leaving.url, f"user-{n}") for n in range(40)]
        assert {code for code, _ in answers} == {200}
        stopped = time.monotonic()
        assert leaving.stop() == 0  # SIGTERM at once: the last slices are unpublished
        await eventually("the lease handed on", lambda: leaders([staying]), timeout_s=LEASE_S)
        handed_on = time.monotonic() - stopped
        assert handed_on < LEASE_S - 1, f"the lease expired ({handed_on:.1f}s), not released"
        # Every request of the replica that left is counted.
        await eventually(
            "the 40 requests counted",
            lambda: counted(staying),
            holds=lambda seen: seen == 40,
            timeout_s=4,
            interval_s=0.1,
        )


def cluster_config(path: Path, faulty: str, healthy: str, cluster: RedisClusterNodes) -> Path:
    """Two routes whose keys live on different cluster nodes: `chat` ramps a faulty
    canary, `completions` a healthy one (which needs many passes to advance)."""
    auto = (
        "      auto:\n"
        "        steps: [20, 50, 100]\n"
        "        interval: 1s\n"
        "        min_requests: 30\n"
        "        pass_intervals: 1000\n"
        "        failure_limit: 1\n"
        "        checks: {error_rate: {max: 0.2, max_increase: 0.05}}\n"
    )
    path.write_text(
        "listen: 127.0.0.1:0\n"
        "admin: {listen: 127.0.0.1:0}\n"
        "backends:\n"
        f"  v1: {{url: '{healthy}'}}\n"
        f"  v2: {{url: '{faulty}'}}\n"
        "routes:\n"
        "  - name: chat\n"
        "    match: {path_prefix: /v1/chat/}\n"
        "    stable: v1\n"
        "    canary: v2\n"
        "    rollout:\n"
        "      weight: 20\n"
        f"{auto}"
        "  - name: completions\n"
        "    match: {path_prefix: /v1/completions}\n"
        "    stable: v1\n"
        "    canary: v1\n"
        "    rollout:\n"
        "      weight: 20\n"
        f"{auto}"
        f"state: {{store: redis, url: '{cluster.url}', cluster: true}}\n"
    )
    return path


async def post(session: aiohttp.ClientSession, url: str, body: object, user: str) -> int:
    async with session.post(url, json=body, headers={"x-user-id": user}) as answer:
        await answer.read()
        return answer.status


async def test_two_replicas_on_a_redis_cluster_roll_back_one_route_and_not_the_other(
    tmp_path: Path,
    redis_cluster: RedisClusterNodes,
    faulty_pair: tuple[BackendProcess, BackendProcess],
) -> None:
    stable, canary = faulty_pair
    config = cluster_config(tmp_path / "proxy.yaml", canary.url, stable.url, redis_cluster)
    completion = {"model": "m", "prompt": "hi", "max_tokens": 2}
    with proxy_processes(config, config) as replicas:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            rollouts: list[dict[str, Any]] = []
            for n in range(1, 5001):
                replica = replicas[n % 2]
                user = f"user-{n}"
                await post(session, f"{replica.url}/v1/chat/completions", CHAT, user)
                status = await post(session, f"{replica.url}/v1/completions", completion, user)
                assert status == 200, "the healthy route's requests all succeed"
                if n % 20 == 0:
                    documents = await asyncio.gather(*(r.status() for r in replicas))
                    rollouts = [{r["name"]: r["rollout"] for r in d["routes"]} for d in documents]
                    if all(r["chat"]["status"] == "rolled_back" for r in rollouts):
                        break
                assert time.monotonic() < deadline, rollouts
                await asyncio.sleep(0.003)
            else:
                raise AssertionError(f"no rollback after 5000 requests: {rollouts}")
        documents = await asyncio.gather(*(r.status() for r in replicas))
    for document in documents:
        assert document["controller"]["store_up"] is True, document["controller"]
        assert len(document["processes"]) == 2
        routes = {r["name"]: r for r in document["routes"]}
        assert routes["chat"]["weight"] == 0
        assert routes["completions"]["rollout"]["status"] == "progressing"
        assert routes["completions"]["weight"] == 20
    rollbacks = [
        [d for d in routes["chat"]["rollout"]["decisions"] if d["action"] == "rollback"]
        for routes in ({r["name"]: r for r in doc["routes"]} for doc in documents)
    ]
    assert [len(r) for r in rollbacks] == [1, 1], "one decision, seen alike by both"
    assert rollbacks[0] == rollbacks[1]
    explained = [r for r in replicas if "route chat: " in r.log and "rolled back" in r.log]
    assert len(explained) == 1, "decided and explained by one controller, not two"
    assert all("the state store is unreachable" not in r.log for r in replicas)
    # What the replicas wrote: each route's keys in one slot, the two routes on two nodes.
    held = await asyncio.to_thread(redis_cluster.keys)
    for route in ("chat", "completions"):
        keys = [key for key in held if key.startswith(f"{PREFIX}{{{route}}}:")]
        assert f"{PREFIX}{{{route}}}:state" in keys
        assert any(":stats:canary:" in key for key in keys), keys
        slots = {await asyncio.to_thread(redis_cluster.keyslot, key) for key in keys}
        assert len(slots) == 1, f"{route}: {slots}"
    nodes = {held[f"{PREFIX}{{{route}}}:state"] for route in ("chat", "completions")}
    assert len(nodes) == 2
