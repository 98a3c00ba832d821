"""The loads that finished lately: a capped stream for lists, per-minute counts per outcome.

Workers write both when a job ends for good (``JobBook.finish``); the console and
``GET /v1/loads`` read them. Each entry is small; the full report stays under its job id.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis

from loadwarden.producer.contract import Outcome
from loadwarden.producer.keys import (
    RECENT_STREAM,
    SERVICE_KEY_PREFIX,
    SERVICE_OUTCOME_FIELD_PREFIX,
    SERVICE_WINDOW_MINUTES,
)


class RecentLoad(BaseModel):
    """One finished load as the recent stream remembers it."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    outcome: str
    source: str
    labels: dict[str, str]
    finished_at: datetime


def _labels(text: str) -> dict[str, str]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _entry(entry_id: bytes, fields: dict[bytes, bytes]) -> RecentLoad:
    text = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}
    millis = int(entry_id.decode().split("-", 1)[0])
    return RecentLoad(
        job_id=text.get("job_id", ""),
        outcome=text.get("outcome", ""),
        source=text.get("source", ""),
        labels=_labels(text.get("labels", "{}")),
        finished_at=datetime.fromtimestamp(millis / 1000, UTC),
    )


async def recent_loads(redis: Redis, count: int = 500) -> list[RecentLoad]:
    """The last ``count`` finished loads, newest first."""
    entries = await redis.xrevrange(RECENT_STREAM, count=count)
    return [_entry(entry_id, fields) for entry_id, fields in entries]


async def outcomes_last_hour(redis: Redis) -> dict[str, int]:
    """Loads finished in the last hour per outcome (every outcome present, zeros included)."""
    minute = int(time.time()) // 60
    fields = [SERVICE_OUTCOME_FIELD_PREFIX + str(o) for o in Outcome]
    async with redis.pipeline(transaction=False) as pipe:
        for m in range(minute - SERVICE_WINDOW_MINUTES + 1, minute + 1):
            pipe.hmget(SERVICE_KEY_PREFIX + str(m), fields)
        buckets = await pipe.execute()
    return {
        str(outcome): sum(int(bucket[i] or 0) for bucket in buckets)
        for i, outcome in enumerate(Outcome)
    }
