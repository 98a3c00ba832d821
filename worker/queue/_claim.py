"""The claim of a job in one round trip: arq's ``start_jobs`` claim, and the run's first reads.

arq claims a job under WATCH (WATCH, EXISTS, ZSCORE, then MULTI/PSETEX/EXEC): ``_CLAIM``
makes the same checks and the same write atomically, in one EVALSHA, and with them reads
what ``JobBook.begin`` looks at first (the attempts so far, whether a producer cancelled
the job), saving that round trip too. ``LoadWorker`` keeps arq's slot accounting.

It also makes arq's ``run_job``'s first transaction (GET the job, INCR its try counter,
EXPIRE the counter) and keeps the answers in the context of the run's task
(``Claimed.start``), where ``answered`` hands them to that transaction instead of Redis:
one more round trip less per job, with no copy of ``run_job``.
"""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass, field
from typing import Any

from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from redis.asyncio import Redis

from loadwarden.producer.keys import CANCEL_KEY_PREFIX, now_ms
from loadwarden.worker._keys import ATTEMPTS_KEY_PREFIX

#: How long arq keeps a job's try counter (arq 0.28's ``run_job``: EXPIRE ... 88400).
RETRY_KEY_TTL_S = 88400

#: KEYS: in-progress key, queue, attempts key, cancel key, job key, try counter. ARGV: job
#: id, now (ms), marker expiry (ms), try counter expiry (s). Returns false (nil) when the
#: job is not ours to run (in progress elsewhere, gone from the queue, or not due); else
#: [score, attempts (nil: none), cancelled (0/1), job (nil: none), try], or without the
#: last two when the job key or the counter cannot be read or counted, or [score] alone
#: when the attempts key cannot be read.
#:
#: Redis does not roll back a script that fails: the in-progress marker, once set, stays.
#: So nothing after the PSETEX may fail. The attempts key, the job key and the counter are
#: named by the job id, which a producer chooses, so they may hold any type: their GETs and
#: the INCR go through ``pcall``. An attempts GET that answers an error (WRONGTYPE) leaves
#: the read to ``begin``, inside the run, where it fails into a classified report; a job
#: GET or an INCR that does leaves arq's transaction to run itself (nothing counted here),
#: which fails as it always did. EXISTS and the EXPIRE of a counter just counted cannot fail.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
redis.call('PSETEX', KEYS[1], ARGV[3], '1')
local attempts = redis.pcall('GET', KEYS[3])
if type(attempts) == 'table' and attempts.err then return {score} end
local cancelled = redis.call('EXISTS', KEYS[4])
local job = redis.pcall('GET', KEYS[5])
if type(job) == 'table' and job.err then return {score, attempts, cancelled} end
local try = redis.pcall('INCR', KEYS[6])
if type(try) == 'table' and try.err then return {score, attempts, cancelled} end
redis.call('EXPIRE', KEYS[6], ARGV[4])
return {score, attempts, cancelled, job, try}
"""


@dataclass(slots=True)
class FirstRead:
    """arq's first transaction of a run, made by the claim: the job's bytes and its try."""

    job_id: str
    job: bytes | None
    job_try: int
    taken: bool = False


#: The first read of the run whose task this is (``Claimed.start``), until taken.
_FIRST_READ: contextvars.ContextVar[FirstRead | None] = contextvars.ContextVar(
    "loadwarden_first_read", default=None
)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job this worker now runs: its queue score, ``begin``'s answer when it was read
    with the claim (raw attempts, cancelled; None when ``begin`` must read it itself), and
    arq's first read of the run when the claim made it."""

    score: int
    first_look: tuple[bytes | None, bool] | None
    first_read: FirstRead | None = None
    _context: contextvars.Context = field(default_factory=contextvars.copy_context)

    def start(self, run: Any) -> asyncio.Task[None]:
        """The run's task (``run`` a coroutine of arq's ``run_job``), holding the first read."""
        self._context.run(_FIRST_READ.set, self.first_read)
        return asyncio.get_running_loop().create_task(run, context=self._context)


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
            job_key_prefix + job_id,
            retry_key_prefix + job_id,
        ],
        args=[job_id, now_ms(), marker_ms, RETRY_KEY_TTL_S],
    )
    if claimed is None:
        return None
    score = int(float(claimed[0]))
    if len(claimed) == 1:
        return Claimed(score, None)
    first_look = (claimed[1], bool(claimed[2]))
    if len(claimed) == 3:
        return Claimed(score, first_look)
    return Claimed(score, first_look, FirstRead(job_id, claimed[3], int(claimed[4])))


def answered(pool: Any) -> Any:
    """``pool``, or in a run's task whose first read the claim made and arq has not taken
    yet, ``pool`` with that read's transaction answered (``LoadWorker.pool``)."""
    first = _FIRST_READ.get()
    return pool if first is None or first.taken else _Answered(pool, first)


class _Answered:
    """A pool whose next ``pipeline(transaction=True)`` is arq's first read, answered."""

    def __init__(self, pool: Any, first: FirstRead) -> None:
        self._pool = pool
        self._first = first

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Any:
        if not transaction:
            return self._pool.pipeline(transaction, shard_hint)
        self._first.taken = True
        _FIRST_READ.set(None)
        return _FirstReadPipeline(self._first)


class _FirstReadPipeline:
    """arq 0.28's first transaction of ``run_job`` (GET job, INCR try, EXPIRE try), its
    answers the claim's. Any other command is not arq's first read: it raises, and the
    job ends with a report (``LoadWorker.run_job``)."""

    def __init__(self, first: FirstRead) -> None:
        self._first = first
        self._queued: list[tuple[Any, ...]] = []

    async def __aenter__(self) -> _FirstReadPipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def get(self, key: str) -> _FirstReadPipeline:
        self._queued.append(("GET", key))
        return self

    def incr(self, key: str, amount: int = 1) -> _FirstReadPipeline:
        self._queued.append(("INCR", key, amount))
        return self

    def expire(self, key: str, seconds: int) -> _FirstReadPipeline:
        self._queued.append(("EXPIRE", key, seconds))
        return self

    async def execute(self) -> list[Any]:
        first = self._first
        expected = [
            ("GET", job_key_prefix + first.job_id),
            ("INCR", retry_key_prefix + first.job_id, 1),
            ("EXPIRE", retry_key_prefix + first.job_id, RETRY_KEY_TTL_S),
        ]
        if self._queued != expected:
            raise RuntimeError(f"not arq's first read of a run, as claimed: {self._queued}")
        return [first.job, first.job_try, True]
