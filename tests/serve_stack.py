"""A real ``loadwarden serve`` process and a real worker on loopback, shared by a test module."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from loadwarden.producer import failures
from loadwarden.producer.connection import redis_client
from loadwarden.producer.settings import RedisOptions
from tests.conftest import TEST_DB, TEST_LOADERS, WORKER_SCRIPT, call_until
from tests.safetensors_files import valid_model

#: The API token of the test server (any 16+ printable characters).
TOKEN = "test-token-0123456789abcdef"
ROOT = Path(__file__).parent.parent
#: Names a hostile producer could put in a file or a request.
HOSTILE = [
    "<script>window.__pwned = 1</script>",
    '"><img src=x onerror="window.__pwned=2">',
    "'; alert(3); '",
    "ctl\x07\x1b[31mred\u202eevil\x00",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def db_url(redis_base_url: str) -> str:
    """The tests' database on the session's Redis (the ``redis_url`` fixture flushes it)."""
    sep = "&" if "?" in redis_base_url else "?"
    return f"{redis_base_url.rstrip('/')}{sep}db={TEST_DB}"


@dataclass
class Stack:
    """Where the server listens, with what token, over which Redis."""

    url: str
    token: str
    redis_url: str
    log: Path
    #: The server's and the worker's process ids.
    pids: tuple[int, ...]

    def api(self, token: str | None = None) -> httpx.Client:
        """An HTTP client for /v1 carrying the bearer token (or the one given)."""
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token or self.token}"},
            timeout=30,
        )

    def finish(self, source: Path, labels: dict[str, str] | None = None) -> str:
        """Enqueue a load through the API, wait until it has finished, return its job id."""
        with self.api() as api:
            reply = api.post("/v1/loads", json={"source": str(source), "labels": labels or {}})
            assert reply.status_code == 202, reply.text
            job_id = str(reply.json()["job_id"])
            done = api.get(f"/v1/loads/{job_id}", params={"wait": 30}).json()
            assert done["state"] == "complete", done
        return job_id

    def defer(self, job_id: str, source: Path) -> None:
        """A job enqueued 10 minutes ahead: it stays deferred while a test watches it."""
        from loadwarden.producer.client import Client
        from loadwarden.worker.config import Settings

        async def put() -> None:
            async with Client(settings=Settings(redis_url=self.redis_url)) as client:
                pool = await client.redis()
                await pool.enqueue_job(
                    "load",
                    request={"source": str(source)},
                    _job_id=job_id,
                    _defer_by=600,
                    _queue_name=client.queue_name,
                )

        asyncio.run(put())

    @contextlib.contextmanager
    def console(self) -> Iterator[httpx.Client]:
        """A signed-in console session (cookie), as a browser would hold it."""
        with httpx.Client(base_url=self.url, timeout=30) as client:
            reply = client.post("/login", data={"token": self.token})
            assert reply.status_code == 303, reply.text
            yield client


def start_serve(
    redis_url: str, log: Path, *, token: str | None, host: str = "127.0.0.1", port: int = 0
) -> tuple[subprocess.Popen[bytes], str]:
    """``loadwarden serve`` in a subprocess; returns once /livez answers."""
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if k != "LOADWARDEN_API_TOKEN"}
    if token:
        env["LOADWARDEN_API_TOKEN"] = token
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loadwarden.worker.cli.main",
                "serve",
                "--redis",
                redis_url,
                "--host",
                host,
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
        )
    url = f"http://{host}:{port}"

    def answers() -> bool:
        if proc.poll() is not None:
            return True
        try:
            return httpx.get(url + "/livez", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    call_until(answers, timeout_s=30, interval_s=0.05)
    assert proc.poll() is None, log.read_text()
    return proc, url


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest, redis_base_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """serve (with a token) and one worker, both over the tests' db; the worker's safetensors
    loader is the module's ``WORKER_LOADER`` (tests/sandbox_loaders.py), else the real one."""
    loader = getattr(request.module, "WORKER_LOADER", "safetensors")
    logs = tmp_path_factory.mktemp("serve-logs")
    redis_url = db_url(redis_base_url)
    with (logs / "worker.log").open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER_SCRIPT, redis_url, loader, "{}", TEST_LOADERS],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
    server = None
    try:
        server, url = start_serve(redis_url, logs / "serve.log", token=TOKEN)  # meanwhile
        call_until(
            lambda: (
                b"worker_started" in (logs / "worker.log").read_bytes() or worker.poll() is not None
            ),
            30,
        )
        assert worker.poll() is None, (logs / "worker.log").read_text()
        yield Stack(
            url=url,
            token=TOKEN,
            redis_url=redis_url,
            log=logs / "serve.log",
            pids=(server.pid, worker.pid),
        )
    finally:
        stop(worker)
        if server is not None:
            stop(server)


def _trees(pids: list[int]) -> set[int]:
    """These processes and all their descendants, as they are now."""
    found = set(pids)
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found |= {p.pid for p in psutil.Process(pid).children(recursive=True)}
    return found


@pytest.fixture(autouse=True)
def no_leaked_processes(stack: Stack, request: pytest.FixtureRequest) -> Iterator[None]:
    """As conftest's check, but the module's server and worker, and what they start (the
    worker's load children and spares come and go by its own rules, tested elsewhere), are
    not the test's; nor is the browser's process tree in the browser tests."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    owners = list(stack.pids)
    if "browser" in request.fixturenames:
        owners.append(request.getfixturevalue("browser").service.process.pid)

    def leftovers() -> list[psutil.Process]:
        mine = before | _trees(owners)
        return [
            p
            for p in me.children(recursive=True)
            if p.pid not in mine and p.status() != psutil.STATUS_ZOMBIE
        ]

    with contextlib.suppress(AssertionError):
        call_until(lambda: not leftovers(), timeout_s=5)
    assert not leftovers()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder (inside the workers' allowed roots) of small model files."""
    folder = tmp_path_factory.mktemp("serve-models")
    rng = np.random.default_rng(1)
    valid_model(
        folder / "small.safetensors", {"w": rng.standard_normal((64, 64)).astype(np.float32)}
    )
    valid_model(
        folder / "hostile.safetensors",
        {name: np.arange(4, dtype=np.float32) for name in HOSTILE},
    )
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return folder


def remember_failure(redis_url: str, identity: str, source: str = "/models/m.safetensors") -> None:
    """Put one timeout of ``identity`` in the failure memory, refused at once (threshold 1)."""

    async def record() -> None:
        redis = redis_client(redis_url, RedisOptions())
        try:
            await failures.record(
                redis,
                identity,
                job_id="j1",
                source=source,
                outcome="timeout",
                error_code="deadline",
                threshold=1,
                window_s=60,
            )
        finally:
            await redis.aclose()

    asyncio.run(record())
