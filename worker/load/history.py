"""What each model cost when it last loaded, kept in Redis, so its next limits fit it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from loadwarden.producer.keys import HISTORY_KEY_PREFIX
from loadwarden.producer.settings import LimitPolicy
from loadwarden.worker._files import ModelFile, OpenedModel
from loadwarden.worker.load.limits import HistoryStats, stats_of

KEY_PREFIX = HISTORY_KEY_PREFIX

log = structlog.get_logger("loadwarden.history")


def model_identity(model: ModelFile | OpenedModel, sha256: str | None) -> str:
    """The model's identity: its digest when known, else each file's path, size and mtime."""
    if sha256:
        return f"sha256:{sha256}"
    files = [s.file for s in model.files] if isinstance(model, OpenedModel) else [model]
    key = "\0\0".join(f"{f.path}\0{f.size}\0{f.mtime_ns}" for f in files)
    return "file:" + hashlib.sha256(key.encode()).hexdigest()


class History:
    """Recent (wall s, cpu s, peak RSS bytes) of successful loads, per model identity.

    A bounded list per model (``history_samples``, expiring after ``history_ttl_s``).
    Redis trouble never fails a load: it only costs the history.
    """

    def __init__(self, redis: Redis, policy: LimitPolicy) -> None:
        self.redis = redis
        self.policy = policy

    async def stats(self, identity: str) -> HistoryStats | None:
        try:
            raw: list[bytes] = await self.redis.lrange(self.key(identity), 0, -1)  # type: ignore[misc]
        except RedisError as exc:
            log.warning("history_unavailable", error=str(exc))
            return None
        return self.stats_from(raw)

    @staticmethod
    def key(identity: str) -> str:
        """The model's list (LRANGE 0 -1 of it is what ``stats_from`` reads)."""
        return KEY_PREFIX + identity

    @staticmethod
    def stats_from(raw: Sequence[bytes]) -> HistoryStats | None:
        """The stats of the model's stored samples (its list, whole)."""
        samples = []
        for item in raw:
            try:
                wall, cpu, peak = json.loads(item)
                samples.append((float(wall), float(cpu), int(peak)))
            except (ValueError, TypeError):
                continue  # a damaged entry costs one sample, not the load
        return stats_of(samples)

    async def record(self, identity: str, wall_s: float, cpu_s: float, peak_rss_bytes: int) -> None:
        key = KEY_PREFIX + identity
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.lpush(key, json.dumps([round(wall_s, 6), round(cpu_s, 6), peak_rss_bytes]))
                pipe.ltrim(key, 0, self.policy.history_samples - 1)
                pipe.expire(key, self.policy.history_ttl_s)
                await pipe.execute()
        except RedisError as exc:
            log.warning("history_unavailable", error=str(exc))
