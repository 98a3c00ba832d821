"""Zero-setup mode: a private Valkey/Redis server and an in-process worker, for one command's life.

The load path is the same as with a real Redis: the batch is enqueued through
the client, pulled by an arq worker, and run by the supervisor. Only where the
queue lives differs. State (stored reports) persists in ``state_dir`` so a
second run of the same batch is answered from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import structlog

from loadwarden.producer.errors import LoadwardenError
from loadwarden.producer.settings import Settings
from loadwarden.worker._redis_server import RedisServer
from loadwarden.worker._tasks import cancel_and_wait
from loadwarden.worker.app import WorkerRunner

log = structlog.get_logger("loadwarden.embedded")


def default_state_dir() -> Path:
    """Where the embedded server keeps its data: $XDG_STATE_HOME/loadwarden/embedded."""
    home = os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(os.environ.get("XDG_STATE_HOME") or home) / "loadwarden" / "embedded"


@contextlib.contextmanager
def _exclusive(state_dir: Path) -> Iterator[None]:
    """Hold the state folder for this process alone (two servers on one AOF would corrupt it)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LoadwardenError(f"another embedded loadwarden is using {state_dir}") from None
        yield


@contextlib.asynccontextmanager
async def embedded(settings: Settings, *, state_dir: Path | None = None) -> AsyncIterator[Settings]:
    """Run a private server and an in-process worker; yield the settings that point at them."""
    state = state_dir or default_state_dir()
    with _exclusive(state):
        server = RedisServer(data_dir=state / "data", appendonly=True)
        await asyncio.to_thread(server.start)
        try:
            local = settings.model_copy(update={"redis_url": server.url})
            runner = WorkerRunner(local, handle_signals=False)
            task = asyncio.create_task(runner.run(), name="loadwarden-embedded-worker")
            started = asyncio.create_task(runner.started.wait())
            await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():  # it failed to start: say why
                await cancel_and_wait(started)
                task.result()
            log.info("embedded_started", server=server.binary, state_dir=str(state))
            try:
                yield local
            finally:
                runner.stop()
                runner.stop()  # twice: no grace here, the batch is over
                await asyncio.wait({task})
        finally:
            await asyncio.to_thread(server.close)
