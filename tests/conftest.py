"""Shared fixtures: a real Redis per session, a clean database per test, and no leaked processes."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psutil
import pytest
import redis
import structlog

from loadwarden.producer.connection import blocking_redis_client
from loadwarden.producer.contract import ModelFormat
from loadwarden.producer.settings import RedisOptions
from loadwarden.worker.config import Settings
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.ops.logs import configure_logging
from loadwarden.worker.queue._redis_server import RedisServer
from loadwarden.worker.queue.runner import WorkerRunner
from tests.safetensors_files import valid_model

T = TypeVar("T")

# No test may call the Hugging Face hub: huggingface_hub (a test dependency) and every
# process a test starts stay offline.
os.environ["HF_HUB_OFFLINE"] = "1"

#: The database the tests own on a shared Redis; flushed before every test.
TEST_DB = 9
#: Where a worker may read local model files (a JSON list).
ROOTS_ENV = "LOADWARDEN_SOURCES__ALLOW_ROOTS"
#: Test-only loaders live here; the fork server preloads it.
TEST_LOADERS = "tests.sandbox_loaders"


def call_until(
    predicate: Callable[[], object], timeout_s: float = 5.0, interval_s: float = 0.01
) -> object:
    """Poll ``predicate`` until it is truthy, on a monotonic bound (psutil's idiom)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


async def eventually(
    check: Callable[[], Awaitable[T] | T],
    timeout_s: float = 10.0,
    what: str = "condition",
    interval_s: float = 0.01,
) -> T:
    """Await until ``check()`` (sync or async) returns something truthy, on a monotonic bound.

    The one place the async tests poll: the state they wait on lives in another process
    (Redis, a worker, a child) with no event to await.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


def assert_pid_gone(pid: int, timeout_s: float = 5.0) -> None:
    """The process is gone (or a zombie about to be reaped by someone else)."""

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    call_until(gone, timeout_s)


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid``."""
    out = []
    for proc in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(proc.pid)
    return out


def _answers(url: str) -> bool:
    try:
        quick = RedisOptions(connect_timeout_s=1, socket_timeout_s=1, wait_timeout_s=0.5)
        client = blocking_redis_client(url, quick)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.exceptions.RedisError, OSError):
        return False


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer | None]:
    """A Redis that answers: LOADWARDEN_TEST_REDIS_URL or 127.0.0.1:6379, else one we start."""
    url = os.environ.get("LOADWARDEN_TEST_REDIS_URL", "redis://127.0.0.1:6379")
    if _answers(url):
        yield None
        return
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_base_url(redis_server: RedisServer | None) -> str:
    if redis_server is not None:
        return redis_server.url
    return os.environ.get("LOADWARDEN_TEST_REDIS_URL", "redis://127.0.0.1:6379")


@pytest.fixture
def redis_url(redis_base_url: str) -> Iterator[str]:
    """A URL of a freshly flushed database that this test owns."""
    sep = "&" if "?" in redis_base_url else "?"
    url = f"{redis_base_url.rstrip('/')}{sep}db={TEST_DB}"
    client = blocking_redis_client(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url)


@pytest.fixture(autouse=True, scope="session")
def _logging() -> None:
    configure_logging("debug", json=True)


@pytest.fixture(autouse=True, scope="session")
def _allowed_roots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Workers and supervisors of the tests (and their subprocesses) may read the test folders."""
    base = str(tmp_path_factory.getbasetemp().resolve())
    old = os.environ.get(ROOTS_ENV)
    os.environ[ROOTS_ENV] = json.dumps([base])
    yield
    if old is None:
        del os.environ[ROOTS_ENV]
    else:
        os.environ[ROOTS_ENV] = old


@pytest.fixture(autouse=True)
def no_leaked_processes(redis_server: RedisServer | None) -> Iterator[None]:
    """Every child process a test starts is gone when it ends (the session's Redis excepted)."""
    me = psutil.Process()
    allowed = {redis_server.pid} if redis_server and redis_server.pid else set()
    before = {p.pid for p in me.children(recursive=True)} | allowed
    yield

    def leftovers() -> list[psutil.Process]:
        return [
            p
            for p in me.children(recursive=True)
            if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE
        ]

    with contextlib.suppress(AssertionError):
        call_until(lambda: not leftovers(), timeout_s=5)
    left = leftovers()
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not left, f"processes left behind: {[(p.pid, p.cmdline()) for p in left]}"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    """A valid multi-dtype safetensors model of about 1 MB."""
    path = tmp_path / "small.safetensors"
    rng = np.random.default_rng(0)
    valid_model(
        path,
        {
            "embed.weight": rng.standard_normal((256, 512)).astype(np.float32),
            "head.weight": rng.standard_normal((64, 512)).astype(np.float16),
            "head.bias": np.arange(64, dtype=np.int64),
            "mask": np.array([True, False, True]),
            "scale": np.array(0.5, dtype=np.float64),
            "empty": np.zeros((0, 4), dtype=np.uint8),
        },
    )
    return path


def require_facility(present: bool, reason: str) -> None:
    """Skip a test whose kernel facility is absent, with the precise reason.

    Where the facility must be present (CI on our machines: LOADWARDEN_TEST_REQUIRE_CONFINEMENT=1,
    set by .ci/run), its absence fails the test instead, so a regression cannot hide as a skip.
    """
    if present:
        return
    if os.environ.get("LOADWARDEN_TEST_REQUIRE_CONFINEMENT") == "1":
        pytest.fail(f"{reason} (LOADWARDEN_TEST_REQUIRE_CONFINEMENT=1)")
    pytest.skip(reason)


def require_cgroups(sup: Supervisor) -> None:
    require_facility(
        sup.cgroups is not None,
        f"needs cgroups this worker may create (v2 delegated subtree with the memory "
        f"controller, or a writable v1 memory cgroup): {sup.cgroups_note}",
    )


def require_landlock(sup: Supervisor, abi: int = 4) -> None:
    require_facility(
        sup.landlock_abi >= abi,
        f"needs Landlock ABI >= {abi} (TCP rules); this kernel offers "
        f"{sup.landlock_abi or 'no Landlock'}",
    )


@pytest.fixture
async def supervisor() -> AsyncIterator[Supervisor]:
    async with Supervisor(Settings(), preload=[TEST_LOADERS]) as sup:
        yield sup


@pytest.fixture
def make_supervisor() -> Callable[..., Supervisor]:
    """Build a supervisor whose safetensors loader is one of tests/sandbox_loaders.py."""

    def make(loader: str = "safetensors", settings: Settings | None = None) -> Supervisor:
        return Supervisor(
            settings or Settings(),
            preload=[TEST_LOADERS],
            loaders={ModelFormat.SAFETENSORS: loader},
        )

    return make


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, **options: Any) -> AsyncIterator[WorkerRunner]:
    """A worker (arq + supervisor + bookkeeping) running in this event loop, stopped after
    (its fork server preloads the test loaders unless ``preload`` says otherwise)."""
    options.setdefault("preload", [TEST_LOADERS])
    runner = WorkerRunner(settings, handle_signals=False, **options)
    task = asyncio.create_task(runner.run())
    started = asyncio.create_task(runner.started.wait())
    await asyncio.wait({task, started}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        task.result()
    try:
        yield runner
    finally:
        runner.stop()
        runner.stop()
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def worker_runner(settings: Settings) -> AsyncIterator[WorkerRunner]:
    async with running_worker(settings) as runner:
        yield runner


@pytest.fixture
def captured_events() -> Iterator[list[structlog.typing.EventDict]]:
    with structlog.testing.capture_logs() as events:
        yield events


#: A worker process with test loaders: argv = redis URL, loader, JSON settings overrides.
WORKER_SCRIPT = """
import asyncio, json, sys
from loadwarden.producer.contract import ModelFormat
from loadwarden.producer.connection import blocking_redis_client
from loadwarden.producer.settings import RedisOptions
from loadwarden.worker.config import Settings
from loadwarden.worker.queue.runner import run_worker
from loadwarden.worker.ops.logs import configure_logging
configure_logging("info", json=True)
settings = Settings(redis_url=sys.argv[1], **json.loads(sys.argv[3]))
loaders = {ModelFormat.SAFETENSORS: sys.argv[2]}
asyncio.run(run_worker(settings, loaders=loaders, preload=[sys.argv[4]]))
"""

StartWorker = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[StartWorker]:
    """Start ``loadwarden`` worker processes (test loaders available); all stopped at the end.

    ``start(redis_url, loader="safetensors", **settings)`` returns once the worker has
    logged ``worker_started``.
    """
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        redis_url: str, loader: str = "safetensors", **overrides: object
    ) -> subprocess.Popen[bytes]:
        log = tmp_path / f"worker-{len(procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    WORKER_SCRIPT,
                    redis_url,
                    loader,
                    json.dumps(overrides),
                    TEST_LOADERS,
                ],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                cwd=Path(__file__).parent.parent,
            )
        procs.append(proc)
        call_until(lambda: b"worker_started" in log.read_bytes() or proc.poll() is not None, 30)
        assert proc.poll() is None, log.read_text()
        proc.log_path = log  # type: ignore[attr-defined]  # where its JSON log lines go
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(30)


def sandbox_processes(supervisor_pid: int) -> list[int]:
    """Fork servers and load children of one supervisor, wherever they have been reparented."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "loadwarden.worker.sandbox._forkserver" in cmd and str(supervisor_pid) in cmd:
            found.append(proc.pid)
    return found
