"""A primary, replicas and three Sentinels on loopback: failover tests and bench/failover.py.

Every server is a ``redis-server`` (``--sentinel`` for the Sentinels) on a free
high port of 127.0.0.1, in a temp folder of its own, started with
``--daemonize no`` and PR_SET_PDEATHSIG so none outlives us, and killed on exit.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import redis

from loadwarden.worker.sandbox import _linux

T = TypeVar("T")

#: The service name the Sentinels monitor.
SERVICE = "mymaster"
#: Sentinel's default is 30 s; 1 s makes a drill take seconds (measured: promotion 2-6 s later).
DOWN_AFTER_MS = 1000
#: How long the topology may take to come up (replication linked, Sentinels know each other).
READY_TIMEOUT_S = 30.0


def free_port() -> int:
    """A free TCP port on loopback (the kernel picks from the high ephemeral range)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)


def _wait(check: Callable[[], object], what: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(redis.RedisError, OSError):
            if check():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(0.05)  # servers in other processes: nothing to wait on but time


class Node:
    """One redis-server process (a data node or a Sentinel)."""

    def __init__(self, folder: Path, args: list[str]) -> None:
        self.port = free_port()
        self.folder = folder
        folder.mkdir(parents=True)
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Node:
        common = ["--port", str(self.port), "--bind", "127.0.0.1", "--daemonize", "no"]
        log = ["--logfile", str(self.folder / "server.log")]
        self.process = subprocess.Popen(
            ["redis-server", *self.args, *common, *log, "--dir", str(self.folder)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (prctl only)
        )
        _wait(lambda: self.ask(lambda c: c.ping()), f"redis-server on {self.port}")
        return self

    def ask(self, question: Callable[[redis.Redis], T]) -> T:
        """Ask this server one thing over a connection of its own (closed after)."""
        with redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2) as client:
            return question(client)

    def kill(self) -> None:
        """SIGKILL: the way a node dies when its machine does."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return (self.folder / "server.log").read_text(errors="replace")


class SentinelTopology:
    """A primary, ``replicas`` replicas and ``sentinels`` Sentinels, all ready on ``start()``."""

    def __init__(self, *, replicas: int = 1, sentinels: int = 3) -> None:
        if shutil.which("redis-server") is None:
            raise FileNotFoundError("redis-server is not on PATH")
        self.root = Path(tempfile.mkdtemp(prefix="loadwarden-ha-"))
        data = ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
        self.primary = Node(self.root / "primary", data)
        self.replicas = [
            Node(self.root / f"replica{i}", [*data, "--replicaof", "127.0.0.1", "0"])
            for i in range(replicas)
        ]
        self.sentinels: list[Node] = []
        self._sentinel_count = sentinels

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self) -> SentinelTopology:
        self.primary.start()
        for replica in self.replicas:
            replica.args[-1] = str(self.primary.port)
            replica.start()
        _wait(
            lambda: all(
                r.ask(lambda c: c.info("replication"))["master_link_status"] == "up"
                for r in self.replicas
            ),
            "replicas in sync",
        )
        quorum = self._sentinel_count // 2 + 1
        for i in range(self._sentinel_count):
            folder = self.root / f"sentinel{i}"
            folder.mkdir()
            conf = folder / "sentinel.conf"  # Sentinel rewrites its own config file
            conf.write_text(
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} {quorum}\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
            )
            node = Node(folder / "run", [str(conf), "--sentinel"])
            self.sentinels.append(node.start())
        others = self._sentinel_count - 1
        _wait(
            lambda: all(
                len(s.ask(lambda c: c.sentinel_sentinels(SERVICE))) == others
                and len(s.ask(lambda c: c.sentinel_slaves(SERVICE))) == len(self.replicas)
                for s in self.sentinels
            ),
            "Sentinels know each other and the replicas",
        )
        return self

    def primary_port(self) -> int:
        """The primary's port as the Sentinels see it now."""
        _, port = self.sentinels[0].ask(lambda c: c.sentinel_get_master_addr_by_name(SERVICE))
        return int(port)

    def wait_for_failover(self, old_port: int, timeout_s: float = 30.0) -> int:
        """Block until the Sentinels name a primary other than ``old_port``; return its port."""
        _wait(lambda: self.primary_port() != old_port, "failover", timeout_s)
        return self.primary_port()

    def close(self) -> None:
        for node in [*self.sentinels, *self.replicas, self.primary]:
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SentinelTopology:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
