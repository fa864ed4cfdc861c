"""The fleet's state store: one Redis server shared by every replica and worker.

Keys (all under `canary-proxy:`):
    states                        hash: route -> JSON of its RouteState (with "version")
    lease                         string: the controller lease's holder, with a PX expiry
    stats:{route}:{variant}:{n}   hash per time slice: source -> {"expires_at_ms", "data"}
    processes                     hash: source -> {"expires_at_ms", "data"} (its heartbeat)

Rules:
1. Every write (compare-and-set, the lease, slices, a heartbeat) is one Lua script,
   atomic on the server; every read is one round trip (a window of hundreds of
   slices is one pipeline).
2. Field expiries are judged on the Redis server's clock (TIME), so replicas whose
   clocks disagree still agree on what has expired. A slice key lives as long as its
   longest-lived field, then Redis deletes it; readers skip expired fields before that.
3. Nothing here blocks for long: connecting and each reply are bounded by
   `TIMEOUT_S`, and a failure raises `redis.exceptions.ConnectionError` or
   `TimeoutError` to the caller. A broken connection is retried once, on a fresh
   one, so the first call after Redis comes back works; the client reconnects by
   itself and the store is never re-created.
4. A retried compare-and-set whose first try did land finds its own write and
   returns None: the caller reads the state again (as after any lost race) and
   sees it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.judge.stats import VariantStats
from proxy.rollout.machine import RouteState
from proxy.store.base import ProcessInfo, StatsSlice

__all__ = ["PREFIX", "TIMEOUT_S", "RedisStore", "stats_key"]

PREFIX: Final = "canary-proxy:"
TIMEOUT_S: Final = 1.0

_STATES: Final = PREFIX + "states"
_LEASE: Final = PREFIX + "lease"
_PROCESSES: Final = PREFIX + "processes"

# KEYS[1] the states hash; ARGV: route, expected version, the new state's JSON.
_COMPARE_AND_SET: Final = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
local version = 0
if current then version = cjson.decode(current)['version'] end
if version ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
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

# KEYS: one hash per field written; ARGV: source, milliseconds to live, "prune" or
# "keep", then one JSON value per key. Each field gets its expiry on the server's
# clock, and each key lives at least as long as its longest-lived field. "prune" also
# deletes the keys' expired fields (heartbeats: a hash that live processes keep alive).
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


def stats_key(route: str, variant: str, index: int) -> str:
    """The hash of one route's variant's time slice."""
    return f"{PREFIX}stats:{route}:{variant}:{index}"


class RedisStore:
    """A `StateStore` on a Redis server, from a `redis://host:port/db` URL.

    Making one does not connect: the first call does, so a process that starts while
    Redis is down still starts (and its calls fail until Redis is back).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._redis: Redis = Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=TIMEOUT_S,
            socket_timeout=TIMEOUT_S,
            retry=Retry(NoBackoff(), 1, (RedisConnectionError,)),
        )
        self._compare_and_set = self._redis.register_script(_COMPARE_AND_SET)
        self._acquire_lease = self._redis.register_script(_ACQUIRE_LEASE)
        self._release_lease = self._redis.register_script(_RELEASE_LEASE)
        self._write_expiring = self._redis.register_script(_WRITE_EXPIRING)

    async def load_states(self) -> Mapping[str, RouteState]:
        stored = await self._redis.hgetall(_STATES)
        states = (RouteState.from_mapping(json.loads(text)) for text in stored.values())
        return {state.route: state for state in states}

    async def compare_and_set(self, state: RouteState, expected_version: int) -> RouteState | None:
        stored = RouteState.from_mapping({**state.to_mapping(), "version": expected_version + 1})
        text = json.dumps(stored.to_mapping())
        written = await self._compare_and_set(
            keys=[_STATES], args=[state.route, expected_version, text]
        )
        return stored if written == 1 else None

    async def acquire_lease(self, holder: str, ttl_s: float) -> bool:
        held = await self._acquire_lease(keys=[_LEASE], args=[holder, _milliseconds(ttl_s)])
        return bool(held == 1)

    async def release_lease(self, holder: str) -> None:
        await self._release_lease(keys=[_LEASE], args=[holder])

    async def publish_stats(self, source: str, slices: Iterable[StatsSlice], ttl_s: float) -> None:
        keys: list[str] = []
        values: list[str] = []
        for route, variant, index, stats in slices:
            keys.append(stats_key(route, variant, index))
            values.append(json.dumps(stats.to_mapping()))
        if keys:
            args: list[str | int] = [source, _milliseconds(ttl_s), "keep", *values]
            await self._write_expiring(keys=keys, args=args)

    async def read_stats(
        self, route: str, variant: str, first_slice: int, last_slice: int
    ) -> VariantStats:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.time()
            for index in range(first_slice, last_slice + 1):
                pipe.hgetall(stats_key(route, variant, index))
            now, *slices = await pipe.execute()
        total = VariantStats()
        for data in _live_values(now, [value for fields in slices for value in fields.values()]):
            total.merge(VariantStats.from_mapping(data))
        return total

    async def heartbeat(self, source: str, info: ProcessInfo, ttl_s: float) -> None:
        text = json.dumps({**info, "source": source})
        args: list[str | int] = [source, _milliseconds(ttl_s), "prune", text]
        await self._write_expiring(keys=[_PROCESSES], args=args)

    async def processes(self) -> list[ProcessInfo]:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.hgetall(_PROCESSES)
            now, beats = await pipe.execute()
        live = _live_values(now, [beats[source] for source in sorted(beats)])
        return list(live)

    async def close(self) -> None:
        await self._redis.aclose()


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _live_values(now: tuple[int, int], texts: Sequence[str]) -> list[dict[str, object]]:
    """The "data" of the fields not yet expired at the server time `now` (s, µs)."""
    now_ms = now[0] * 1000 + now[1] // 1000
    live = []
    for text in texts:
        field = json.loads(text)
        if field["expires_at_ms"] >= now_ms:
            live.append(field["data"])
    return live
