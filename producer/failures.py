"""The failure memory's storage in Redis: record, read, list and forget failing models.

One hash per model identity (``FAILURES_KEY_PREFIX``): a field per job that failed (so a
job's retries count once), its value the failure as JSON. The hash expires a window after
its latest failure, so a model is forgotten by Redis itself; two sorted sets index the
identities (all of them, and those with enough failures to be refused), scored by when
their memory lapses, so that listing and the metrics never scan the keyspace.
Workers write (``record``, ``forget`` on success); operators read and clear through the
client. The policy (which failures count, the refusal) is the worker's: worker/load/failures.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from loadwarden.producer.contract import FailingModel, RememberedFailure
from loadwarden.producer.keys import FAILING_ZSET, FAILURES_KEY_PREFIX, REFUSING_ZSET, now_ms

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

#: Failures kept per model at most (the newest): the refusal needs ``threshold`` of them and
#: an operator a few more; a burst of many jobs failing at once must not grow one hash.
MAX_REMEMBERED = 20

# Atomic, as several workers record at once: prune what fell out of the window (and this
# job's earlier attempt), add this failure, cap the hash, renew its expiry and the indexes.
# Time is the server's (TIME), so workers with skewed clocks agree on every window.
# KEYS: the model's hash, FAILING_ZSET, REFUSING_ZSET.
# ARGV: identity, job id, failure JSON (without its time), window ms, threshold, cap.
_RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[4])
local kept = {}
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local ok, entry = pcall(cjson.decode, fields[i + 1])
  local at = ok and type(entry) == 'table' and tonumber(entry['at_ms']) or nil
  if at == nil or at <= now - window or fields[i] == ARGV[2] then
    redis.call('HDEL', KEYS[1], fields[i])
  else
    kept[#kept + 1] = {fields[i], at}
  end
end
local entry = cjson.decode(ARGV[3])
entry['at_ms'] = now
redis.call('HSET', KEYS[1], ARGV[2], cjson.encode(entry))
local cap = tonumber(ARGV[6])
if #kept + 1 > cap then
  table.sort(kept, function(a, b) return a[2] < b[2] end)
  for i = 1, #kept + 1 - cap do redis.call('HDEL', KEYS[1], kept[i][1]) end
end
local count = redis.call('HLEN', KEYS[1])
redis.call('PEXPIRE', KEYS[1], window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZADD', KEYS[2], now + window, ARGV[1])
if count >= tonumber(ARGV[5]) then
  redis.call('ZADD', KEYS[3], now + window, ARGV[1])
else
  redis.call('ZREM', KEYS[3], ARGV[1])
end
return count
"""


async def record(
    redis: Redis,
    identity: str,
    *,
    job_id: str,
    source: str,
    outcome: str,
    error_code: str,
    threshold: int,
    window_s: float,
) -> int:
    """Remember one failed load of ``identity``; return how many failures it has now."""
    failure = json.dumps({"source": source, "outcome": outcome, "error_code": error_code})
    count = await redis.eval(  # type: ignore[misc]
        _RECORD,
        3,
        FAILURES_KEY_PREFIX + identity,
        FAILING_ZSET,
        REFUSING_ZSET,
        identity,
        job_id,
        failure,
        str(max(1, round(window_s * 1000))),
        str(threshold),
        str(max(threshold, MAX_REMEMBERED)),
    )
    return int(count)


def _failure(job_id: bytes | str, raw: bytes | str) -> RememberedFailure | None:
    """One stored failure, or None when the entry is damaged (it costs that entry only)."""
    try:
        doc: Any = json.loads(raw)
        return RememberedFailure(
            job_id=job_id.decode() if isinstance(job_id, bytes) else job_id,
            source=doc["source"],
            outcome=doc["outcome"],
            error_code=doc["error_code"],
            at=datetime.fromtimestamp(doc["at_ms"] / 1000, UTC),
        )
    except (ValueError, TypeError, KeyError, ValidationError, OverflowError):
        return None


def _model(
    identity: str,
    fields: dict[Any, Any],
    pttl_ms: int,
    *,
    threshold: int | None = None,
    refused: bool = False,
) -> FailingModel | None:
    """The stored failures as a FailingModel, refused at ``threshold`` if given."""
    failures = [f for k, v in fields.items() if (f := _failure(k, v)) is not None]
    if not failures or pttl_ms < 0:  # gone, or (damaged) without an expiry
        return None
    failures.sort(key=lambda f: f.at, reverse=True)
    return FailingModel(
        identity=identity,
        failures=failures,
        refused=len(failures) >= threshold if threshold is not None else refused,
        expires_at=datetime.now(UTC) + timedelta(milliseconds=pttl_ms),
    )


async def read(redis: Redis, identity: str, threshold: int) -> FailingModel | None:
    """What the memory holds for ``identity`` (None: nothing); ``refused`` at ``threshold``."""
    async with redis.pipeline(transaction=True) as pipe:
        queue_read(pipe, identity)
        answers = await pipe.execute()
    return read_answer(identity, answers, threshold)


#: How many answers ``queue_read`` adds to a pipeline.
READ_ANSWERS = 2


def queue_read(pipe: Pipeline, identity: str) -> None:
    """Queue ``read``'s commands on ``pipe`` (a worker reads more in the same round trip)."""
    pipe.hgetall(FAILURES_KEY_PREFIX + identity)
    pipe.pttl(FAILURES_KEY_PREFIX + identity)


def read_answer(identity: str, answers: Sequence[Any], threshold: int) -> FailingModel | None:
    """``read``'s result from the ``READ_ANSWERS`` answers of what ``queue_read`` queued."""
    fields, pttl = answers
    return _model(identity, fields, int(pttl), threshold=threshold)


async def listing(redis: Redis) -> list[FailingModel]:
    """Every model the memory holds, the ones refused first, then by latest failure.

    ``refused`` is what the recording worker decided with its own threshold (the
    REFUSING_ZSET index), so an operator's shell needs no copy of the workers' settings.
    """
    now = now_ms()
    names = await redis.zrangebyscore(FAILING_ZSET, now, "+inf")
    identities = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if not identities:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for identity in identities:
            pipe.hgetall(FAILURES_KEY_PREFIX + identity)
            pipe.pttl(FAILURES_KEY_PREFIX + identity)
            pipe.zscore(REFUSING_ZSET, identity)
        answers = await pipe.execute()
    found = []
    for i, identity in enumerate(identities):
        fields, pttl, until = answers[3 * i : 3 * i + 3]
        refused = until is not None and until > now
        if model := _model(identity, fields, int(pttl), refused=refused):
            found.append(model)
    found.sort(key=lambda m: (not m.refused, -m.failures[0].at.timestamp()))
    return found


async def forget(redis: Redis, identities: Sequence[str] | None = None) -> int:
    """Drop the named identities (None: every one); return how many the memory held."""
    if identities is None:
        names = await redis.zrange(FAILING_ZSET, 0, -1)
        identities = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if not identities:
        return 0
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(*(FAILURES_KEY_PREFIX + i for i in identities))
        pipe.zrem(FAILING_ZSET, *identities)
        pipe.zrem(REFUSING_ZSET, *identities)
        deleted, _, _ = await pipe.execute()
    return int(deleted)


async def refused_count(redis: Redis) -> int:
    """How many models are refused now (the index's live entries: one ZCOUNT)."""
    return int(await redis.zcount(REFUSING_ZSET, now_ms(), "+inf"))
