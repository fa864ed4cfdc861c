"""The fleet's state store: one Redis (a server, or a Redis Cluster / Valkey cluster)
shared by every replica and worker.

Keys (all under `canary-proxy:`); each route's keys carry the route's name in braces,
their hash tag (`canary-proxy:{chat}:state`), so on a cluster they all live in one slot:
    {<route>}:state                  string: JSON of the route's RouteState (with "version")
    {<route>}:stats:<variant>:<n>    hash per time slice: source -> {"expires_at_ms", "data"}
    routes                           set: the names of the routes with a stored state
    lease                            string: the controller lease's holder, with a PX expiry
    processes                        hash: source -> {"expires_at_ms", "data"} (its heartbeat)
    states                           the previous layout's hash of route states (read once)

Rules:
1. Every write (compare-and-set, the lease, slices, a heartbeat) is one Lua script,
   atomic on the server (a compare-and-set first adds the route to `routes`, a command
   of its own), and every script and every command touches keys of one slot only: one
   route's keys, or one of the keys tied to no route (`routes`, `lease`, `processes`).
   A write for several routes is one script call per route. So the same keys work on
   one server and on a cluster, where a script over several slots fails.
2. Field expiries are judged on the Redis server's clock (TIME), read by the script
   that reads or writes the fields, on the node that holds them, so replicas whose
   clocks disagree (and cluster nodes whose clocks disagree) still agree on what has
   expired. A slice key lives as long as its longest-lived field, then Redis deletes
   it; readers skip expired fields before that.
3. Reads are few round trips: a window of hundreds of slices is one script call, the
   heartbeats one, the route states two (the `routes` set, then one pipeline of their
   states).
4. Nothing here blocks for long: connecting and each reply are bounded by
   `TIMEOUT_S`, and a failure raises a `redis` error (`ConnectionError`,
   `TimeoutError`; on a cluster also `RedisClusterException` when no node answers) to
   the caller. A broken connection is retried once, on a fresh one, so the first
   call after Redis comes back works; the client reconnects by itself and the store
   is never re-created. On a cluster the retry first asks another node where the
   slot lives now, so a call there gives up within two timeouts.
5. A retried compare-and-set whose first try did land finds its own write and
   returns None: the caller reads the state again (as after any lost race) and
   sees it.
6. The first `load_states` of a store copies the route states of the previous layout
   (one `states` hash) to their own keys, each only if its new key is absent; the old
   hash is left as it was (a process of the previous version still reads it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError, NoScriptError, ResponseError

from proxy.judge.stats import Series, VariantStats
from proxy.rollout.machine import RouteState
from proxy.store.base import ProcessInfo, StatsSlice

__all__ = [
    "LEASE_KEY",
    "LEGACY_STATES_KEY",
    "PREFIX",
    "PROCESSES_KEY",
    "ROUTES_KEY",
    "TIMEOUT_S",
    "RedisStore",
    "state_key",
    "stats_key",
]

PREFIX: Final = "canary-proxy:"
TIMEOUT_S: Final = 1.0

ROUTES_KEY: Final = PREFIX + "routes"
LEASE_KEY: Final = PREFIX + "lease"
PROCESSES_KEY: Final = PREFIX + "processes"
LEGACY_STATES_KEY: Final = PREFIX + "states"

# KEYS[1] the route's state; ARGV: expected version, the new state's JSON.
_COMPARE_AND_SET: Final = """
local current = redis.call('GET', KEYS[1])
local version = 0
if current then version = cjson.decode(current)['version'] end
if version ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1] the lease; ARGV: holder, milliseconds. Take it if free, renew it if ours.
_ACQUIRE_LEASE: Final = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
return 0
"""

# KEYS[1] the lease; ARGV: holder.
_RELEASE_LEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: one hash per field written (all in one slot); ARGV: source, milliseconds to
# live, "prune" or "keep", then one JSON value per key. Each field gets its expiry on
# the server's clock, and each key lives at least as long as its longest-lived field.
# "prune" also deletes the keys' expired fields (heartbeats: a hash that live
# processes keep alive).
_WRITE_EXPIRING: Final = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl_ms = tonumber(ARGV[2])
local expires = string.format('%d', now_ms + ttl_ms)
for i, key in ipairs(KEYS) do
    local value = '{"expires_at_ms":' .. expires .. ',"data":' .. ARGV[i + 3] .. '}'
    redis.call('HSET', key, ARGV[1], value)
    if redis.call('PTTL', key) < ttl_ms then redis.call('PEXPIRE', key, ttl_ms) end
    if ARGV[3] == 'prune' then
        local fields = redis.call('HGETALL', key)
        for j = 1, #fields, 2 do
            if cjson.decode(fields[j + 1])['expires_at_ms'] < now_ms then
                redis.call('HDEL', key, fields[j])
            end
        end
    end
end
return 0
"""

# KEYS: hashes of expiring fields (all in one slot). The server's TIME, then the values
# of every field of every key: the caller keeps those not yet expired at that time. The
# clock is the one of the node holding the keys (a pipeline's TIME on a cluster would
# ask some other node).
_READ_EXPIRING: Final = """
local values = {}
for _, key in ipairs(KEYS) do
    local fields = redis.call('HVALS', key)
    for j = 1, #fields do values[#values + 1] = fields[j] end
end
return {redis.call('TIME'), values}
"""


def route_key(route: str, *parts: str | int) -> str:
    """A key of one route's: `canary-proxy:{route}:...`.

    The braces make the route's name the key's hash tag, so a cluster puts every key of
    a route in one slot and one script may touch them together. Route names are
    letters, digits, '.', '_' and '-' (`proxy.config.grammar.is_name`): never a brace,
    so the tag is always the whole name.
    """
    return ":".join((f"{PREFIX}{{{route}}}", *map(str, parts)))


def state_key(route: str) -> str:
    """The route's state."""
    return route_key(route, "state")


def stats_key(route: str, variant: Series, index: int) -> str:
    """The hash of one route's variant's time slice."""
    return route_key(route, "stats", variant, index)


class RedisStore:
    """A `StateStore` on Redis, from a `redis://host:port/db` URL.

    With `cluster`, the URL names any node of a Redis Cluster (or Valkey in cluster
    mode); the client asks it for the others and sends each command to the node that
    holds its slot. Making one does not connect: the first call does, so a process that
    starts while Redis is down still starts (and its calls fail until Redis is back).
    """

    def __init__(self, url: str, *, cluster: bool = False) -> None:
        self.url = url
        self.cluster = cluster
        retry = Retry(NoBackoff(), 1, (RedisConnectionError,))
        self._redis: Redis | RedisCluster
        if cluster:
            self._redis = RedisCluster.from_url(
                url,
                decode_responses=True,
                socket_connect_timeout=TIMEOUT_S,
                socket_timeout=TIMEOUT_S,
                retry=retry,
            )
        else:
            self._redis = Redis.from_url(
                url,
                decode_responses=True,
                socket_connect_timeout=TIMEOUT_S,
                socket_timeout=TIMEOUT_S,
                retry=retry,
            )
        self._compare_and_set = _Script(self._redis, _COMPARE_AND_SET)
        self._acquire_lease = _Script(self._redis, _ACQUIRE_LEASE)
        self._release_lease = _Script(self._redis, _RELEASE_LEASE)
        self._write_expiring = _Script(self._redis, _WRITE_EXPIRING)
        self._read_expiring = _Script(self._redis, _READ_EXPIRING)
        self._adopted_legacy = False

    async def load_states(self) -> Mapping[str, RouteState]:
        async with self._explained():
            if not self._adopted_legacy:
                await self._adopt_legacy_states()
                self._adopted_legacy = True
            routes = sorted(await self._redis.smembers(ROUTES_KEY))
            if not routes:
                return {}
            # One GET per route: a cluster pipeline sends each to its own node.
            async with self._redis.pipeline(transaction=False) as pipe:
                for route in routes:
                    pipe.get(state_key(str(route)))
                texts = await pipe.execute()
        # A route in the set may have no state yet: its first write lost, or failed
        # between the set and the state.
        states = (RouteState.from_mapping(json.loads(text)) for text in texts if text)
        return {state.route: state for state in states}

    async def compare_and_set(self, state: RouteState, expected_version: int) -> RouteState | None:
        stored = RouteState.from_mapping({**state.to_mapping(), "version": expected_version + 1})
        text = json.dumps(stored.to_mapping())
        async with self._explained():
            # Listed first, so a state is never stored where `load_states` cannot find it.
            await self._redis.sadd(ROUTES_KEY, state.route)
            written = await self._compare_and_set(
                [state_key(state.route)], [expected_version, text]
            )
        return stored if written == 1 else None

    async def acquire_lease(self, holder: str, ttl_s: float) -> bool:
        async with self._explained():
            held = await self._acquire_lease([LEASE_KEY], [holder, _milliseconds(ttl_s)])
        return bool(held == 1)

    async def release_lease(self, holder: str) -> None:
        async with self._explained():
            await self._release_lease([LEASE_KEY], [holder])

    async def publish_stats(self, source: str, slices: Iterable[StatsSlice], ttl_s: float) -> None:
        by_route: dict[str, tuple[list[str], list[str]]] = {}
        for route, variant, index, stats in slices:
            keys, values = by_route.setdefault(route, ([], []))
            keys.append(stats_key(route, variant, index))
            values.append(json.dumps(stats.to_mapping()))
        milliseconds = _milliseconds(ttl_s)
        async with self._explained():
            # One script per route (one slot each), all at once: a slow or hung Redis
            # costs one timeout, not one per route.
            await asyncio.gather(
                *(
                    self._write_expiring(keys, [source, milliseconds, "keep", *values])
                    for keys, values in by_route.values()
                )
            )

    async def read_stats(
        self, route: str, variant: Series, first_slice: int, last_slice: int
    ) -> VariantStats:
        keys = [stats_key(route, variant, index) for index in range(first_slice, last_slice + 1)]
        total = VariantStats()
        if not keys:
            return total
        async with self._explained():
            now, texts = await self._read_expiring(keys)
        for data in _live_values(now, texts):
            total.merge(VariantStats.from_mapping(data))
        return total

    async def heartbeat(self, source: str, info: ProcessInfo, ttl_s: float) -> None:
        text = json.dumps({**info, "source": source})
        args: list[str | int] = [source, _milliseconds(ttl_s), "prune", text]
        async with self._explained():
            await self._write_expiring([PROCESSES_KEY], args)

    async def processes(self) -> list[ProcessInfo]:
        async with self._explained():
            now, texts = await self._read_expiring([PROCESSES_KEY])
        live = _live_values(now, texts)
        return sorted(live, key=lambda info: str(info["source"]))

    async def close(self) -> None:
        await self._redis.aclose()

    async def _adopt_legacy_states(self) -> None:
        """Copy each route state of the previous layout whose new key is absent."""
        legacy = await self._redis.hgetall(LEGACY_STATES_KEY)
        for route, text in sorted(legacy.items()):
            await self._redis.sadd(ROUTES_KEY, route)
            await self._redis.set(state_key(str(route)), text, nx=True)

    @asynccontextmanager
    async def _explained(self) -> AsyncIterator[None]:
        """Name the likely mistake when a cluster node is used as one server."""
        try:
            yield
        except MovedError as error:
            raise ResponseError(
                f"{self.url} is a node of a Redis Cluster, which moved a key elsewhere "
                f"({error}): set state.cluster: true"
            ) from error


class _Script:
    """A Lua script run by its SHA1, sent whole (EVAL) to a node that lacks it.

    Not redis-py's `register_script`: on a cluster that loads a missing script into
    every primary at once, so while any node is down (or after a failover to a
    replica that never saw the script) every script call would fail, even on the
    nodes that answer. EVAL goes to the one node that holds the keys, and caches the
    script there.
    """

    __slots__ = ("_redis", "_sha", "_source")

    def __init__(self, client: Redis | RedisCluster, source: str) -> None:
        self._redis = client
        self._source = source
        self._sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: Sequence[str], args: Sequence[str | int] = ()) -> Any:
        try:
            return await self._redis.evalsha(self._sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self._redis.eval(self._source, len(keys), *keys, *args)


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _live_values(now: Sequence[str | int], texts: Sequence[str]) -> list[dict[str, object]]:
    """The "data" of the fields not yet expired at the server time `now` (s, µs)."""
    now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
    live = []
    for text in texts:
        field = json.loads(text)
        if field["expires_at_ms"] >= now_ms:
            live.append(field["data"])
    return live
