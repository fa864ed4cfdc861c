"""Live config reload: noticing that the file changed, and what a new config may change live.

Rules:
1. The file is watched by polling: `os.stat` (which follows symlinks, so a Kubernetes
   ConfigMap's `..data` swap and an editor's write-and-rename both change the inode)
   every `POLL_S`, and its content hash when the stat changes or every `REHASH_S`
   anyway. A change is reported once per new content, so an invalid file is not
   retried until it changes again.
2. A reload is all or nothing: a new config is parsed and validated whole before
   anything is swapped (`proxy.server.app.ProxyServer.reload`). What cannot change without a
   restart (the addresses the proxy listens on) makes the reload fail, not apply in
   part.
3. Content equal to what is serving is no change: the same version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final

from proxy.config import Config, content_version

__all__ = [
    "POLL_S",
    "ConfigWatcher",
    "ReloadOutcome",
    "ReloadResult",
    "changes_needing_restart",
]

log = logging.getLogger("proxy.server.reload")

POLL_S: Final = 0.5
REHASH_S: Final = 5.0


class ReloadOutcome(StrEnum):
    APPLIED = "applied"
    UNCHANGED = "unchanged"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ReloadResult:
    outcome: ReloadOutcome
    version: str  # the version serving after the reload
    problems: tuple[str, ...] = ()


def changes_needing_restart(current: Config, new: Config) -> list[str]:
    """What `new` changes that a running proxy cannot change in place, one line each."""
    problems = []
    if new.listen != current.listen:
        problems.append(f"listen: changing {current.listen} to {new.listen} needs a restart")
    if new.state != current.state:
        problems.append("state: changing where the rollout state lives needs a restart")
    if new.admin.listen != current.admin.listen:
        problems.append(
            f"admin.listen: changing {current.admin.listen} to {new.admin.listen} needs a restart"
        )
    return problems


class ConfigWatcher:
    """Calls `changed()` when the content of the file at `path` changes."""

    def __init__(
        self,
        path: str,
        version: str,
        changed: Callable[[], Awaitable[object]],
        poll_s: float = POLL_S,
    ) -> None:
        self._path = path
        self._version = version
        self._changed = changed
        self._poll_s = poll_s
        self._signature = self._stat()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="config watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def seen(self, version: str) -> None:
        """The proxy now serves (or has rejected) this content; do not report it again."""
        self._version = version

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_rehash = loop.time() + REHASH_S
        while True:
            await asyncio.sleep(self._poll_s)
            signature = self._stat()
            if signature == self._signature and loop.time() < next_rehash:
                continue
            self._signature = signature
            next_rehash = loop.time() + REHASH_S
            try:
                data = await asyncio.to_thread(Path(self._path).read_bytes)
            except OSError as exc:
                # Mid-swap, or gone: the config in force keeps serving; look again later.
                log.debug("config file %s unreadable: %s", self._path, exc)
                continue
            version = content_version(data)
            if version == self._version:
                continue
            self._version = version
            try:
                await self._changed()
            except Exception:
                log.exception("config reload after a file change failed")

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
