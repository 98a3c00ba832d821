"""Dead letters: jobs that failed for good, read, run again or dropped by a client."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, ValidationError

from loadwarden.producer._guard import guard
from loadwarden.producer.contract import LoadReport, LoadRequest
from loadwarden.producer.errors import JobNotFound
from loadwarden.producer.keys import DEAD_LETTER_STREAM

if TYPE_CHECKING:
    from loadwarden.producer._handles import JobHandle
    from loadwarden.producer.client import Client

#: One entry of the dead-letter stream: its id and its fields.
Entry = tuple[bytes, dict[bytes, bytes]]


class DeadLetter(BaseModel):
    """A job that failed for good: its final report and (when it was one) its request."""

    model_config = ConfigDict(frozen=True)

    id: str
    job_id: str
    outcome: str
    at: str
    request: LoadRequest | None
    report: LoadReport

    @classmethod
    def from_entry(cls, entry_id: bytes | str, fields: dict[bytes, bytes]) -> DeadLetter:
        text = {k.decode(): v.decode() for k, v in fields.items()}
        try:
            request: LoadRequest | None = LoadRequest.model_validate_json(text["request"])
        except ValidationError:
            request = None
        return cls(
            id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
            job_id=text["job_id"],
            outcome=text["outcome"],
            at=text["at"],
            request=request,
            report=LoadReport.model_validate_json(text["report"]),
        )


async def dead_letters(client: Client, count: int = 100) -> list[DeadLetter]:
    """The most recent jobs that failed for good, newest first."""
    redis = await client.redis()
    entries = await guard(redis.xrevrange(DEAD_LETTER_STREAM, count=count))
    return [DeadLetter.from_entry(entry_id, fields) for entry_id, fields in entries]


async def _entries(client: Client, refs: Sequence[str] | None) -> list[Entry]:
    """Dead-letter entries named by their ids or by their jobs' ids (None: all of them).

    A job id is the natural thing to paste from ``report`` or ``show``; a dead-letter
    id looks like ``1732958512345-0``. Anything that names neither is JobNotFound.
    """
    everything = await guard((await client.redis()).xrange(DEAD_LETTER_STREAM))
    if refs is None:
        return list(everything)
    found: list[Entry] = []
    for ref in refs:
        hits = [
            (entry_id, fields)
            for entry_id, fields in everything
            if ref in (entry_id.decode(), fields.get(b"job_id", b"").decode())
        ]
        if not hits:
            raise JobNotFound(
                f"no dead letter {ref!r}: give an id from 'dead list' (like "
                "1732958512345-0) or the job id of a dead-lettered job"
            )
        found += [hit for hit in hits if hit not in found]
    return found


async def retry_dead(client: Client, ids: Sequence[str] | None = None) -> list[JobHandle]:
    """Enqueue dead-lettered jobs again (all of them when ``ids`` is None) and drop them.

    ``ids`` may name dead-letter ids or the job ids of dead-lettered jobs.
    """
    redis = await client.redis()
    handles = []
    for entry_id, fields in await _entries(client, ids):
        letter = DeadLetter.from_entry(entry_id, fields)
        if letter.request is None:
            continue  # not a request at all (a planted payload): nothing to rerun
        handles.append(
            await client.enqueue(letter.request, job_id=f"{letter.job_id}-r{uuid.uuid4().hex[:6]}")
        )
        await guard(redis.xdel(DEAD_LETTER_STREAM, letter.id))
    return handles


async def purge_dead(
    client: Client, ids: Sequence[str] | None = None, *, outcome: str | None = None
) -> int:
    """Drop dead letters: those named (by id or job id), or with ``outcome``, or all of them.

    Returns how many were dropped.
    """
    redis = await client.redis()
    if ids is None and outcome is None:
        count = await guard(redis.xlen(DEAD_LETTER_STREAM))
        await guard(redis.delete(DEAD_LETTER_STREAM))
        return int(count)
    chosen = [
        entry_id
        for entry_id, fields in await _entries(client, ids)
        if outcome is None or fields.get(b"outcome", b"").decode() == outcome
    ]
    if chosen:
        await guard(redis.xdel(DEAD_LETTER_STREAM, *chosen))
    return len(chosen)
