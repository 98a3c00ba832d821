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
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import structlog
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix

from loadwarden.producer import wire
from loadwarden.producer.connection import redis_client
from loadwarden.producer.errors import EmbeddedWorkerDied, LoadwardenError, describe
from loadwarden.worker._tasks import cancel_and_wait
from loadwarden.worker._xdg import xdg_dir
from loadwarden.worker.config import Settings
from loadwarden.worker.queue._redis_server import RedisServer
from loadwarden.worker.queue.runner import WorkerRunner

log = structlog.get_logger("loadwarden.embedded")


def default_state_dir() -> Path:
    """Where the embedded server keeps its data: $XDG_STATE_HOME/loadwarden/embedded (a
    relative $XDG_STATE_HOME is ignored, as the XDG rule says: ~/.local/state)."""
    return xdg_dir("XDG_STATE_HOME", ".local/state") / "loadwarden" / "embedded"


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


#: How many leftover jobs a notice names (the rest are counted).
LEFTOVERS_SHOWN = 5


@contextlib.asynccontextmanager
async def embedded(
    settings: Settings,
    *,
    state_dir: Path | None = None,
    drop_leftovers: bool = False,
    notice: Callable[[str], object] | None = None,
) -> AsyncIterator[Settings]:
    """Run a private server and an in-process worker; yield the settings that point at them.

    Jobs still queued in ``state_dir`` from an earlier run are named through
    ``notice`` and run first, or dropped unrun with ``drop_leftovers``. If the
    in-process worker stops while the body runs, the body is cancelled and
    ``EmbeddedWorkerDied`` says why (nothing else would ever answer its waits).
    """
    state = state_dir or default_state_dir()
    with _exclusive(state):
        server = RedisServer(data_dir=state / "data", appendonly=True)
        await asyncio.to_thread(server.start)
        try:
            local = settings.model_copy(update={"redis_url": server.url})
            await _leftovers(local, drop=drop_leftovers, notice=notice or log.warning)
            runner = WorkerRunner(local, handle_signals=False)
            task = asyncio.create_task(runner.run(), name="loadwarden-embedded-worker")
            started = asyncio.create_task(runner.started.wait())
            await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():  # it failed to start: say why
                await cancel_and_wait(started)
                task.result()
            log.info("embedded_started", server=server.binary, state_dir=str(state))
            body = asyncio.current_task()
            assert body is not None
            stopping = False

            def on_worker_end(done: asyncio.Task[None]) -> None:
                if not stopping:  # it ended while the body still needed it
                    body.cancel("embedded worker died")

            task.add_done_callback(on_worker_end)
            try:
                yield local
            except asyncio.CancelledError:
                if not task.done() or stopping:
                    raise
                body.uncancel()
                raise EmbeddedWorkerDied(
                    f"the in-process worker stopped: {_why(task)}; nothing would answer"
                ) from None
            finally:
                stopping = True
                runner.stop()
                runner.stop()  # twice: no grace here, the batch is over
                await asyncio.wait({task})
                if not task.cancelled() and task.exception() is not None:
                    task.exception()  # retrieved: reported above, or the body failed first
        finally:
            await asyncio.to_thread(server.close)


def _why(task: asyncio.Task[None]) -> str:
    if task.cancelled():
        return "it was cancelled"
    exc = task.exception()
    return describe(exc) if exc is not None else "it returned"


async def _leftovers(
    settings: Settings, *, drop: bool, notice: Callable[[str], object]
) -> list[str]:
    """Name (or drop) the jobs an earlier run left queued in this state folder."""
    queue = settings.queue_name
    redis = redis_client(settings.redis_url or "", settings.redis)
    try:
        ids = [i.decode() for i in await redis.zrange(queue, 0, -1)]
        if not ids:
            return ids
        raws = await redis.mget([job_key_prefix + i for i in ids])
        shown = ", ".join(
            f"{job_id} ({_source_of(raw)})"
            for job_id, raw in list(zip(ids, raws, strict=True))[:LEFTOVERS_SHOWN]
        )
        more = f" and {len(ids) - LEFTOVERS_SHOWN} more" if len(ids) > LEFTOVERS_SHOWN else ""
        if drop:
            async with redis.pipeline(transaction=True) as pipe:
                for job_id in ids:
                    pipe.delete(
                        job_key_prefix + job_id,
                        retry_key_prefix + job_id,
                        in_progress_key_prefix + job_id,
                    )
                pipe.zrem(queue, *ids)
                await pipe.execute()
            notice(f"dropped {len(ids)} job(s) an earlier run left queued: {shown}{more}")
        else:
            notice(
                f"{len(ids)} job(s) an earlier run left queued will run first: {shown}{more} "
                "(--drop-leftovers drops them unrun)"
            )
        return ids
    finally:
        await redis.aclose()


def _source_of(raw: bytes | None) -> str:
    """The source a leftover job names, for the notice (untrusted: shown as a repr, cut)."""
    try:
        document = wire.loads(raw or b"")
        source = document["k"]["request"]["source"]
    except (LoadwardenError, KeyError, TypeError):
        return "not a load request"
    return repr(source)[:120] if isinstance(source, str) else "no source"
