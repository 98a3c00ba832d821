"""What Redis knows of a model before it loads (failure memory, history), in one round trip."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from structlog.typing import FilteringBoundLogger

from loadwarden.producer import failures as store
from loadwarden.producer.contract import FailingModel
from loadwarden.producer.errors import describe
from loadwarden.worker.load.failures import FailureMemory
from loadwarden.worker.load.history import History
from loadwarden.worker.load.limits import HistoryStats

if TYPE_CHECKING:  # annotations only: `loadwarden load` runs without Redis and its import (~170 ms)
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline


class FirstWrites(Protocol):
    """Writes that must be in Redis before the model is inspected or loaded (a job's lease:
    ``JobBook.lease``): they ride in the look-up's transaction when it shares their client."""

    @property
    def redis(self) -> Redis:
        """The client they go through."""

    def queue(self, pipe: Pipeline) -> int:
        """Queue the writes on ``pipe``; how many commands they are."""

    async def send(self) -> None:
        """Write them now, in a round trip of their own."""


class FirstWritesFailed(Exception):
    """The first writes did not reach Redis: ``error`` says why; the load must not go on."""

    def __init__(self, error: Exception) -> None:
        super().__init__(describe(error))
        self.error = error


class Once:
    """``first`` (None: none), given out once: sent on its own, or taken to ride along."""

    def __init__(self, first: FirstWrites | None) -> None:
        self._first = first

    def take(self) -> FirstWrites | None:
        first, self._first = self._first, None
        return first

    async def send(self) -> None:
        if (first := self.take()) is not None:
            await send_first(first)


async def look_up(
    identity: str,
    failures: FailureMemory | None,
    history: History | None,
    log: FilteringBoundLogger,
    first: FirstWrites | None = None,
) -> tuple[FailingModel | None, HistoryStats | None]:
    """What the failure memory holds for the model and its history's stats (each None when
    there is none or Redis cannot say); raises ``RepeatedlyFailing`` when it is refused.

    One transaction when both live on one connection pool: a tiny load's round trips are
    most of its cost in the supervisor (bench/tiny.py). ``first`` rides in it too, when it
    shares the client, else it goes first on its own; its failure raises ``FirstWritesFailed``.
    """
    shared = None
    if failures is not None and history is not None and failures.redis is history.redis:
        shared = failures.redis
    if first is not None and first.redis is not shared:
        await send_first(first)
        first = None
    if failures is None or history is None or shared is None:
        remembered = await failures.admit(identity, log) if failures is not None else None
        stats = await _stats(history, identity, log) if history is not None else None
        return remembered, stats
    from redis.exceptions import RedisError  # loaded with the client: no cost here

    try:
        async with shared.pipeline(transaction=True) as pipe:
            ahead = first.queue(pipe) if first is not None else 0
            # Samples recorded since the last round trip ride along, first (History.record).
            written = history.queue_pending(pipe)
            store.queue_read(pipe, identity)
            pipe.lrange(history.key(identity), 0, -1)
            # A key of the wrong type fails its own command only, as two round trips would.
            answers = await pipe.execute(raise_on_error=False)
    except (RedisError, OSError) as exc:  # both are advice: the load goes on without them
        if first is not None:  # ...but the first writes are not
            raise FirstWritesFailed(exc) from exc
        log.warning("failure_memory_unavailable", error=describe(exc))
        log.warning("history_unavailable", error=describe(exc))
        return None, None
    if failed := next((a for a in answers[:ahead] if isinstance(a, Exception)), None):
        raise FirstWritesFailed(failed) from failed
    answers = answers[ahead:]
    history.check_written(answers[:written])
    answers = answers[written:]
    remembered = None
    read, listed = answers[: store.READ_ANSWERS], answers[store.READ_ANSWERS]
    if failed := next((a for a in read if isinstance(a, Exception)), None):
        log.warning("failure_memory_unavailable", error=describe(failed))
    else:
        remembered = failures.judge(store.read_answer(identity, read, failures.policy.threshold))
    if isinstance(listed, Exception):
        log.warning("history_unavailable", error=describe(listed))
        return remembered, None
    return remembered, history.stats_from(listed)


async def send_first(first: FirstWrites) -> None:
    """Send ``first`` in a round trip of its own; ``FirstWritesFailed`` if it fails."""
    from redis.exceptions import RedisError  # loaded with the client: no cost here

    try:
        await first.send()
    except (RedisError, OSError) as exc:
        raise FirstWritesFailed(exc) from exc


async def _stats(history: History, identity: str, log: FilteringBoundLogger) -> HistoryStats | None:
    from redis.exceptions import RedisError  # loaded with the client: no cost here

    try:
        return await history.stats(identity)
    except (RedisError, OSError) as exc:  # limits from the declared size still apply
        log.warning("history_unavailable", error=describe(exc))
        return None
