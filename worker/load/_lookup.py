"""What Redis knows of a model before it loads (failure memory, history), in one round trip."""

from __future__ import annotations

from structlog.typing import FilteringBoundLogger

from loadwarden.producer import failures as store
from loadwarden.producer.contract import FailingModel
from loadwarden.producer.errors import describe
from loadwarden.worker.load.failures import FailureMemory
from loadwarden.worker.load.history import History
from loadwarden.worker.load.limits import HistoryStats


async def look_up(
    identity: str,
    failures: FailureMemory | None,
    history: History | None,
    log: FilteringBoundLogger,
) -> tuple[FailingModel | None, HistoryStats | None]:
    """What the failure memory holds for the model and its history's stats (each None when
    there is none or Redis cannot say); raises ``RepeatedlyFailing`` when it is refused.

    One transaction when both live on one connection pool: a tiny load's round trips are
    most of its cost in the supervisor (bench/tiny.py).
    """
    if failures is None or history is None or failures.redis is not history.redis:
        remembered = await failures.admit(identity, log) if failures is not None else None
        stats = await _stats(history, identity, log) if history is not None else None
        return remembered, stats
    from redis.exceptions import RedisError  # loaded with the client: no cost here

    try:
        async with failures.redis.pipeline(transaction=True) as pipe:
            # Samples recorded since the last round trip ride along, first (History.record).
            written = history.queue_pending(pipe)
            store.queue_read(pipe, identity)
            pipe.lrange(history.key(identity), 0, -1)
            # A key of the wrong type fails its own command only, as two round trips would.
            answers = await pipe.execute(raise_on_error=False)
    except (RedisError, OSError) as exc:  # both are advice: the load goes on without them
        log.warning("failure_memory_unavailable", error=describe(exc))
        log.warning("history_unavailable", error=describe(exc))
        return None, None
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


async def _stats(history: History, identity: str, log: FilteringBoundLogger) -> HistoryStats | None:
    from redis.exceptions import RedisError  # loaded with the client: no cost here

    try:
        return await history.stats(identity)
    except (RedisError, OSError) as exc:  # limits from the declared size still apply
        log.warning("history_unavailable", error=describe(exc))
        return None
