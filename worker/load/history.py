"""What each model cost when it last loaded, kept in Redis, so its next limits fit it."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from loadwarden.worker._files import ModelFile, OpenedModel
from loadwarden.worker._keys import HISTORY_KEY_PREFIX
from loadwarden.worker.config import LimitPolicy
from loadwarden.worker.load.limits import HistoryStats, stats_of

KEY_PREFIX = HISTORY_KEY_PREFIX

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

log = structlog.get_logger("loadwarden.history")


def model_identity(model: ModelFile | OpenedModel, sha256: str | None) -> str:
    """The model's identity: its digest when known, else each file's path, size and mtime."""
    if sha256:
        return f"sha256:{sha256}"
    files = [s.file for s in model.files] if isinstance(model, OpenedModel) else [model]
    key = "\0\0".join(f"{f.path}\0{f.size}\0{f.mtime_ns}" for f in files)
    return "file:" + hashlib.sha256(key.encode()).hexdigest()


#: A recorded sample waits at most this long for a round trip to ride in (the next load's
#: look-up, usually) before it is written on its own: one round trip less per load.
FLUSH_DELAY_S = 0.1
#: Samples held at most while Redis cannot take them (beyond, the oldest are dropped).
MAX_PENDING = 1000
#: The commands ``queue_pending`` adds to a pipeline per sample.
ANSWERS_PER_SAMPLE = 3


#: Stored samples parsed, kept by their bytes: a model's list gains one sample a load, so
#: each load of it would otherwise parse again the ``history_samples`` its last one read.
SAMPLES_CACHED = 4096


@functools.lru_cache(maxsize=SAMPLES_CACHED)
def _sample(item: bytes) -> tuple[float, float, int] | None:
    """One stored sample; None for a damaged entry (it costs one sample, not the load)."""
    try:
        wall, cpu, peak = json.loads(item)
        sample = float(wall), float(cpu), int(peak)
    except (ValueError, TypeError, OverflowError):  # OverflowError: int() of 1e400 (inf)
        return None
    if not all(math.isfinite(x) and x >= 0 for x in sample):
        return None  # NaN, inf or a negative figure: no load measured that
    return sample


class History:
    """Recent (wall s, cpu s, peak RSS bytes) of successful loads, per model identity.

    A bounded list per model (``history_samples``, expiring after ``history_ttl_s``).
    Redis trouble never fails a load: it only costs the history.

    ``record`` only queues a sample: it is written with this worker's next read of any
    history (``stats``, or the look-up before a load, in the same round trip and before
    it, so this worker always reads what it recorded), or within ``FLUSH_DELAY_S`` on its
    own; ``flush`` writes what is left (the worker calls it as it stops).
    """

    def __init__(self, redis: Redis, policy: LimitPolicy) -> None:
        self.redis = redis
        self.policy = policy
        self._pending: list[tuple[str, str]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None

    async def stats(self, identity: str) -> HistoryStats | None:
        from redis.exceptions import RedisError  # loaded with our client: no cost here

        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                written = self.queue_pending(pipe)
                pipe.lrange(self.key(identity), 0, -1)
                answers = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            log.warning("history_unavailable", error=str(exc))
            return None
        self.check_written(answers[:written])
        if isinstance(answers[written], Exception):
            log.warning("history_unavailable", error=str(answers[written]))
            return None
        return self.stats_from(answers[written])

    @staticmethod
    def key(identity: str) -> str:
        """The model's list (LRANGE 0 -1 of it is what ``stats_from`` reads)."""
        return KEY_PREFIX + identity

    @staticmethod
    def stats_from(raw: Sequence[bytes]) -> HistoryStats | None:
        """The stats of the model's stored samples (its list, whole)."""
        samples = [sample for item in raw if (sample := _sample(item)) is not None]
        return stats_of(samples)

    async def record(self, identity: str, wall_s: float, cpu_s: float, peak_rss_bytes: int) -> None:
        """Queue one successful load's figures (see the class docstring for when they go)."""
        sample = json.dumps([round(wall_s, 6), round(cpu_s, 6), peak_rss_bytes])
        self._pending.append((self.key(identity), sample))
        del self._pending[:-MAX_PENDING]
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(FLUSH_DELAY_S, self._flush_later)

    def queue_pending(self, pipe: Pipeline) -> int:
        """Queue the samples not written yet on ``pipe``; how many answers they add."""
        pending, self._pending = self._pending, []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for key, sample in pending:
            pipe.lpush(key, sample)
            pipe.ltrim(key, 0, self.policy.history_samples - 1)
            pipe.expire(key, self.policy.history_ttl_s)
        return len(pending) * ANSWERS_PER_SAMPLE

    @staticmethod
    def check_written(answers: Sequence[object]) -> None:
        """Log a sample that could not be written (a key of the wrong type): advice lost."""
        if failed := next((a for a in answers if isinstance(a, Exception)), None):
            log.warning("history_unavailable", error=str(failed))

    async def flush(self) -> None:
        """Write the samples not written yet, in one round trip (none: no round trip)."""
        if not self._pending:
            return
        from redis.exceptions import RedisError  # loaded with our client: no cost here

        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                written = self.queue_pending(pipe)
                answers = await pipe.execute(raise_on_error=False)
            self.check_written(answers[:written])
        except (RedisError, OSError) as exc:
            log.warning("history_unavailable", error=str(exc))

    async def close(self) -> None:
        """Write what is pending and stop the timer (the worker's last call)."""
        if self._flushing is not None:
            await self._flushing
        await self.flush()

    def _flush_later(self) -> None:
        loop = asyncio.get_running_loop()
        if self._flushing is not None and not self._flushing.done():
            self._timer = loop.call_later(FLUSH_DELAY_S, self._flush_later)  # after that one
            return
        self._timer = None
        self._flushing = loop.create_task(self.flush())
