"""The claim of a job in one round trip: arq's ``start_jobs`` claim, and the run's first read.

arq claims a job under WATCH (WATCH, EXISTS, ZSCORE, then MULTI/PSETEX/EXEC): ``_CLAIM``
makes the same checks and the same write atomically, in one EVALSHA, and with them reads
what ``JobBook.begin`` looks at first (the attempts so far, whether a producer cancelled
the job), saving that round trip too. ``LoadWorker`` keeps arq's slot accounting.
"""

from __future__ import annotations

from dataclasses import dataclass

from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from loadwarden.producer.keys import CANCEL_KEY_PREFIX, now_ms
from loadwarden.worker._keys import ATTEMPTS_KEY_PREFIX

#: KEYS: in-progress key, queue, attempts key, cancel key. ARGV: job id, now (ms), marker
#: expiry (ms). Returns false (nil) when the job is not ours to run (in progress elsewhere,
#: gone from the queue, or not due); else [score, attempts (nil: none), cancelled (0/1)],
#: or [score] alone when the attempts key cannot be read.
#:
#: Redis does not roll back a script that fails: the in-progress marker, once set, stays.
#: So nothing after the PSETEX may fail. The attempts key is named by the job id, which a
#: producer chooses, so it may hold any type: its GET goes through ``pcall``, and a GET
#: that answers an error (WRONGTYPE) leaves the read to ``begin``, inside the run, where it
#: fails into a classified report. EXISTS cannot fail on a key of any type.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
redis.call('PSETEX', KEYS[1], ARGV[3], '1')
local attempts = redis.pcall('GET', KEYS[3])
if type(attempts) == 'table' and attempts.err then return {score} end
return {score, attempts, redis.call('EXISTS', KEYS[4])}
"""


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job this worker now runs: its queue score, and ``begin``'s answer when it was read
    with the claim (raw attempts, cancelled), None when ``begin`` must read it itself."""

    score: int
    first_look: tuple[bytes | None, bool] | None


async def claim(redis: Redis, queue: str, job_id: str, marker_ms: int) -> Claimed | None:
    """Claim ``job_id`` (None: not ours to run). A ResponseError means nothing was written:
    the script fails only before its PSETEX (a refused write, such as Redis out of memory)."""
    script = redis.register_script(_CLAIM)
    claimed = await script(
        keys=[
            in_progress_key_prefix + job_id,
            queue,
            ATTEMPTS_KEY_PREFIX + job_id,
            CANCEL_KEY_PREFIX + job_id,
        ],
        args=[job_id, now_ms(), marker_ms],
    )
    if claimed is None:
        return None
    score = int(float(claimed[0]))
    if len(claimed) == 1:
        return Claimed(score, None)
    return Claimed(score, (claimed[1], bool(claimed[2])))
