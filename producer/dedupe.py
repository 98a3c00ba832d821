"""Idempotent enqueue: one atomic Redis step finds a request's (or an id's) job or enqueues it.

The dedupe key ``loadwarden:dedupe:<hash of the request>`` names the job of a
request that is queued or running. Looking it up, checking that job is still
alive, and enqueueing a new job when it is not must be one step: as separate
commands (SET NX, GET, a state read, SET) two producers enqueueing the same
request at the same moment both saw no live job and made two. A Lua script runs
all of it atomically on the server (``EVALSHA``, redis-py's ``register_script``).

A job is alive while arq's job key or in-progress marker exists (arq deletes
both when it stores the result). The script writes the job exactly as arq's
``enqueue_job`` does (``PSETEX arq:job:<id>``, ``ZADD <queue>``), then pushes a
token on the queue's wake list for an idle worker blocked on it
(``keys.wake_workers``). It touches keys it computes from the stored job id, so
it needs all keys on one node: fine for a single Redis or Sentinel, not for Redis
Cluster (which loadwarden does not use).

A caller's own job id skips the dedupe key: ``enqueue_as`` makes arq's own check
(no job and no result under that id yet) and write in one script too. arq's
``enqueue_job`` takes four round trips for the same (WATCH, EXISTS, MULTI/EXEC,
then the wake push), two of them before the job's enqueue time is stamped: the
caller's wait for a report grew by all four (bench/tiny.py).
"""

from __future__ import annotations

import uuid

from arq.connections import ArqRedis
from arq.constants import (
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
)
from arq.jobs import serialize_job

from loadwarden.producer import wire
from loadwarden.producer.contract import LoadRequest
from loadwarden.producer.keys import (
    DEDUPE_KEY_PREFIX,
    WAKE_TOKENS_MAX,
    WAKE_TTL_MS,
    dedupe_key,
    wake_key,
)

#: KEYS: dedupe key, queue, wake list. ARGV: fresh id, job payload, score (ms), job expiry
#: (ms), dedupe key expiry (s), job key prefix, in-progress key prefix, wake tokens kept,
#: wake list expiry (ms). Returns {job id, 1 if it was enqueued now else 0}.
_SCRIPT = """
local existing = redis.call('GET', KEYS[1])
if existing then
  if redis.call('EXISTS', ARGV[6] .. existing, ARGV[7] .. existing) > 0 then
    return {existing, 0}
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[5])
redis.call('SET', ARGV[6] .. ARGV[1], ARGV[2], 'PX', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('LPUSH', KEYS[3], '1')
redis.call('LTRIM', KEYS[3], 0, ARGV[8] - 1)
redis.call('PEXPIRE', KEYS[3], ARGV[9])
return {ARGV[1], 1}
"""

#: KEYS: job key, result key, queue, wake list. ARGV: job id, job payload, score (ms), job
#: expiry (ms), wake tokens kept, wake list expiry (ms). Returns 1 if enqueued now, 0 if the
#: id was in use (a job or a result under it: arq's own check).
_BY_ID = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('LPUSH', KEYS[4], '1')
redis.call('LTRIM', KEYS[4], 0, ARGV[5] - 1)
redis.call('PEXPIRE', KEYS[4], ARGV[6])
return 1
"""


def _payload(function: str, request: LoadRequest, now_ms: int) -> bytes:
    """arq's job document (only the fields the caller set travel, so the worker can tell a
    request's own retry policy from the defaults)."""
    return serialize_job(
        function,
        (),
        {"request": request.model_dump(mode="json", exclude_unset=True)},
        None,
        now_ms,
        serializer=wire.dumps,
    )


async def enqueue_as(
    redis: ArqRedis,
    request: LoadRequest,
    job_id: str,
    *,
    function: str,
    queue_name: str,
    now_ms: int,
) -> bool:
    """Enqueue ``request`` as ``job_id`` unless that id is in use; whether it was enqueued now.

    Safe to run again after a lost answer: the second run finds the first's job.
    """
    script = redis.register_script(_BY_ID)
    created = await script(
        keys=[
            job_key_prefix + job_id,
            result_key_prefix + job_id,
            queue_name,
            wake_key(queue_name),
        ],
        args=[
            job_id,
            _payload(function, request, now_ms),
            now_ms,
            redis.expires_extra_ms,
            WAKE_TOKENS_MAX,
            WAKE_TTL_MS,
        ],
    )
    return bool(created)


async def enqueue_once(
    redis: ArqRedis,
    request: LoadRequest,
    *,
    function: str,
    queue_name: str,
    now_ms: int,
    dedupe_ttl_s: int,
) -> tuple[str, bool]:
    """The job id of ``request``'s live job, or of a new one enqueued now (and whether it is new).

    Only the fields the caller set travel in the job, so the worker can tell a
    request's own retry policy from the defaults.
    """
    fresh = uuid.uuid4().hex
    payload = _payload(function, request, now_ms)
    script = redis.register_script(_SCRIPT)
    job_id, created = await script(
        keys=[DEDUPE_KEY_PREFIX + dedupe_key(request), queue_name, wake_key(queue_name)],
        args=[
            fresh,
            payload,
            now_ms,
            redis.expires_extra_ms,
            max(1, int(dedupe_ttl_s)),
            job_key_prefix,
            in_progress_key_prefix,
            WAKE_TOKENS_MAX,
            WAKE_TTL_MS,
        ],
    )
    return (job_id.decode() if isinstance(job_id, bytes) else str(job_id)), bool(created)
