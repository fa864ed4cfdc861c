"""The embedded state store: one SQLite file, shared by the processes of one machine.

Rules:
1. Every write is one transaction (WAL journal): a crash or SIGKILL leaves the last
   committed state, never a torn one.
2. SQLite calls block, so they run in a worker thread, one at a time.
3. Times in the file are wall-clock epoch seconds, comparable between processes.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Final, TypeVar

from proxy.judge.stats import Series, VariantStats
from proxy.rollout.machine import RouteState
from proxy.store.base import ProcessInfo, StatsSlice

__all__ = ["SqliteStore"]

_LEASE: Final = "controller"
_BUSY_S: Final = 5.0  # how long a write waits for another process's
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS route_state (
    route TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS lease (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS stats (
    source TEXT NOT NULL,
    route TEXT NOT NULL,
    variant TEXT NOT NULL,
    slice INTEGER NOT NULL,
    data TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (source, route, variant, slice)
);
CREATE TABLE IF NOT EXISTS process (
    source TEXT PRIMARY KEY,
    info TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""

T = TypeVar("T")


def _switch_to_wal(connection: sqlite3.Connection) -> None:
    """Put the file in WAL mode, waiting for other processes opening it at the same time.

    SQLite does not call its busy handler for this switch, so workers that open a new
    file together would see "database is locked"; they try again instead.
    """
    deadline = time.monotonic() + _BUSY_S
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class SqliteStore:
    """A `StateStore` in a SQLite file."""

    def __init__(self, path: str) -> None:
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._connection = sqlite3.connect(
            path, timeout=_BUSY_S, check_same_thread=False, isolation_level=None
        )
        self._lock = threading.Lock()
        with self._lock:
            _switch_to_wal(self._connection)
            self._connection.execute("PRAGMA synchronous=NORMAL")
            self._connection.executescript(_SCHEMA)

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return work(self._connection)

        return await asyncio.to_thread(locked)

    async def load_states(self) -> Mapping[str, RouteState]:
        rows = await self._run(
            lambda db: db.execute("SELECT state, version FROM route_state").fetchall()
        )
        states = {}
        for text, version in rows:
            state = RouteState.from_mapping({**json.loads(text), "version": version})
            states[state.route] = state
        return states

    async def compare_and_set(self, state: RouteState, expected_version: int) -> RouteState | None:
        stored = RouteState.from_mapping({**state.to_mapping(), "version": expected_version + 1})
        text = json.dumps(stored.to_mapping())
        now = time.time()

        def write(db: sqlite3.Connection) -> bool:
            db.execute("BEGIN IMMEDIATE")
            try:
                if expected_version == 0:
                    cursor = db.execute(
                        "INSERT OR IGNORE INTO route_state VALUES (?, 1, ?, ?)",
                        (state.route, text, now),
                    )
                else:
                    cursor = db.execute(
                        "UPDATE route_state SET version = ?, state = ?, updated_at = ? "
                        "WHERE route = ? AND version = ?",
                        (expected_version + 1, text, now, state.route, expected_version),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return cursor.rowcount == 1

        return stored if await self._run(write) else None

    async def acquire_lease(self, holder: str, ttl_s: float) -> bool:
        def take(db: sqlite3.Connection) -> bool:
            now = time.time()
            db.execute(
                "INSERT INTO lease VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "holder = excluded.holder, expires_at = excluded.expires_at "
                "WHERE lease.holder = excluded.holder OR lease.expires_at < ?",
                (_LEASE, holder, now + ttl_s, now),
            )
            row = db.execute("SELECT holder FROM lease WHERE name = ?", (_LEASE,)).fetchone()
            return row is not None and row[0] == holder

        return await self._run(take)

    async def release_lease(self, holder: str) -> None:
        await self._run(
            lambda db: db.execute(
                "DELETE FROM lease WHERE name = ? AND holder = ?", (_LEASE, holder)
            )
        )

    async def publish_stats(self, source: str, slices: Iterable[StatsSlice], ttl_s: float) -> None:
        expires_at = time.time() + ttl_s
        rows = [
            (source, route, variant, index, json.dumps(stats.to_mapping()), expires_at)
            for route, variant, index, stats in slices
        ]

        def write(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT OR REPLACE INTO stats VALUES (?, ?, ?, ?, ?, ?)", rows)
                db.execute("DELETE FROM stats WHERE expires_at < ?", (time.time(),))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._run(write)

    async def read_stats(
        self, route: str, variant: Series, first_slice: int, last_slice: int
    ) -> VariantStats:
        # Expired slices are deleted only on the next publish: skip them here, so a
        # source that stopped publishing drops out when its slices expire (rule 3).
        rows = await self._run(
            lambda db: db.execute(
                "SELECT data FROM stats WHERE route = ? AND variant = ? "
                "AND slice BETWEEN ? AND ? AND expires_at >= ?",
                (route, variant, first_slice, last_slice, time.time()),
            ).fetchall()
        )
        total = VariantStats()
        for (text,) in rows:
            total.merge(VariantStats.from_mapping(json.loads(text)))
        return total

    async def heartbeat(self, source: str, info: ProcessInfo, ttl_s: float) -> None:
        text = json.dumps({**info, "source": source})

        def write(db: sqlite3.Connection) -> None:
            now = time.time()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT OR REPLACE INTO process VALUES (?, ?, ?)", (source, text, now + ttl_s)
                )
                db.execute("DELETE FROM process WHERE expires_at < ?", (now,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._run(write)

    async def processes(self) -> list[ProcessInfo]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT info FROM process WHERE expires_at >= ? ORDER BY source", (time.time(),)
            ).fetchall()
        )
        return [json.loads(text) for (text,) in rows]

    async def close(self) -> None:
        await self._run(lambda db: db.close())
