"""Batch loading for producers: enqueue many requests, follow them, collect their reports.

Each request gets a job id derived from its content, source included (and, for a
local file the producer can see, the file's size, mtime and inode), so duplicates
in a batch become one job, and a second run of an unchanged batch is answered
from the reports already stored in Redis where they cannot have changed
(``reusable``: ``ok``, or a verdict on pinned content); anything else runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from arq.constants import in_progress_key_prefix, result_key_prefix
from pydantic import BaseModel, ConfigDict

from loadwarden.producer._guard import redis_unavailable
from loadwarden.producer.contract import LoadReport, LoadRequest, Outcome
from loadwarden.producer.errors import ContractError
from loadwarden.producer.sources import is_url

if TYPE_CHECKING:
    from loadwarden.producer.client import Client

#: How often a batch looks for its queued jobs having started (the progress shows it):
#: only their ends are pushed. One pipelined round trip for the whole window.
PROGRESS_POLL_S = 0.25


class EntryState(StrEnum):
    """Where one entry of a batch is."""

    PENDING = "pending"  # not enqueued yet
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"  # never enqueued: --fail-fast stopped the batch
    UNFINISHED = "unfinished"  # enqueued, but the batch's time ran out first


class PreloadEntry(BaseModel):
    """One named request of a batch, and what became of it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    source: str
    job_id: str
    state: EntryState = EntryState.PENDING
    cached: bool = False  # answered from a report already stored
    duplicate_of: str | None = None
    report: LoadReport | None = None

    @property
    def outcome(self) -> Outcome | None:
        return self.report.outcome if self.report else None


class PreloadTotals(BaseModel):
    """Counts over a batch."""

    model_config = ConfigDict(extra="forbid")

    entries: int
    jobs: int
    ok: int
    failed: int
    unfinished: int
    cached: int
    by_outcome: dict[str, int]
    wall_seconds: float


class PreloadResult(BaseModel):
    """The whole batch: every entry with its report, and totals."""

    model_config = ConfigDict(extra="forbid")

    entries: list[PreloadEntry]
    totals: PreloadTotals

    @property
    def ok(self) -> bool:
        return all(e.outcome is Outcome.OK for e in self.entries)


ProgressCallback = Callable[[PreloadEntry], object]


#: Refusals that are verdicts on what a file *is* (its content, with its name as asked):
#: they hold as long as the content does. Every other refusal is about the path or the
#: worker's policy (outside_root, symlink, over_budget, ...) and may change.
CONTENT_REFUSALS = frozenset({"code_bearing_format", "object_array", "format_mismatch"})


def _file_state(request: LoadRequest) -> list[int] | None:
    """Size, mtime and inode of a local source the producer can see, else None."""
    if is_url(request.source):
        return None
    try:
        st = os.stat(request.source)
    except (OSError, ValueError):
        return None  # the producer may not see the worker's files; the request alone decides
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def job_id_for(request: LoadRequest, *, salt: str = "") -> str:
    """A job id that is the same for the same request on the same file.

    The request (source included: whether a path exists, and what policy says of
    it, depend on the path even when the digest is pinned) and, when the producer
    can see the file, its size, mtime and inode: an edited file is a new job.
    """
    document: dict[str, Any] = request.model_dump(mode="json", exclude={"labels"})
    state = _file_state(request)
    if state is not None:
        document["file"] = state
    digest = hashlib.sha256(json.dumps([document, salt], sort_keys=True).encode()).hexdigest()
    return f"preload-{digest[:32]}"


def reusable(report: LoadReport, request: LoadRequest) -> bool:
    """Whether a stored report may answer this request again without running it.

    Only verdicts that cannot change with time: ``ok``; ``invalid`` and content
    refusals when the content they judged is pinned (the producer saw the file, so
    an edit makes a new job id, or the report's digest is the requested one).
    Never ``unavailable``, ``timeout``, ``crashed``, ``memory_exceeded``,
    ``cpu_exceeded``, ``cancelled`` or a refusal for the path or policy: those say
    what happened then, and a rerun may end otherwise.
    """
    if report.outcome is Outcome.OK:
        return True
    content_pinned = _file_state(request) is not None or (
        request.sha256 is not None
        and report.model is not None
        and report.model.sha256 == request.sha256
    )
    if report.outcome is Outcome.INVALID:
        return content_pinned
    if report.outcome is Outcome.REFUSED:
        code = report.error.code if report.error else ""
        return content_pinned and code in CONTENT_REFUSALS
    return False


@dataclass
class _Batch:
    client: Client
    entries: list[PreloadEntry]
    requests: dict[str, LoadRequest]
    window: int
    fail_fast: bool
    on_progress: ProgressCallback | None
    by_job: dict[str, list[PreloadEntry]] = field(default_factory=dict)
    failed: bool = False

    def _notify(self, job_id: str) -> None:
        for entry in self.by_job[job_id]:
            if self.on_progress is not None:
                self.on_progress(entry)

    def _set(
        self, job_id: str, state: EntryState, report: LoadReport | None = None, cached: bool = False
    ) -> None:
        for entry in self.by_job[job_id]:
            entry.state, entry.report, entry.cached = state, report or entry.report, cached
        if report is not None and report.outcome is not Outcome.OK:
            self.failed = True
        self._notify(job_id)

    async def run(self) -> None:
        for entry in self.entries:
            self.by_job.setdefault(entry.job_id, []).append(entry)
            if self.on_progress is not None:
                self.on_progress(entry)
        waiting = list(self.by_job)
        in_flight: set[str] = set()
        # Woken by the workers' pushes (loadwarden.producer.finished); each job is watched
        # before its first look, so no push slips past between a look and a wait.
        watch = await self.client.finish_watch()
        pushed = asyncio.Event()
        watch.start()
        try:
            while waiting or in_flight:
                while (
                    waiting
                    and len(in_flight) < self.window
                    and not (self.fail_fast and self.failed)
                ):
                    job_id = waiting.pop(0)
                    watch.watch([job_id], pushed)
                    if await self._start(job_id):
                        in_flight.add(job_id)
                    else:
                        watch.unwatch([job_id], pushed)
                if self.fail_fast and self.failed:
                    for job_id in waiting:
                        self._set(job_id, EntryState.SKIPPED)
                    waiting.clear()
                if in_flight:
                    pushed.clear()
                    done = await self._poll(in_flight)
                    watch.unwatch(done, pushed)
                    if in_flight and not (waiting and len(in_flight) < self.window):
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(self._pause(in_flight, watch.poll_s)):
                                await pushed.wait()
        finally:
            watch.unwatch(list(self.by_job), pushed)

    def _pause(self, in_flight: set[str], push_poll_s: float) -> float:
        """How long to wait for a push: a job not yet seen running is looked at sooner (only
        an end is pushed, and the progress shows when a job starts)."""
        queued = any(self.by_job[j][0].state is EntryState.QUEUED for j in in_flight)
        return min(push_poll_s, PROGRESS_POLL_S) if queued else push_poll_s

    async def _start(self, job_id: str) -> bool:
        """Enqueue one job, or take its stored report; True if it is now in flight."""
        request = self.requests[job_id]
        try:
            stored = await self.client.stored_report(job_id)
        except ContractError:  # not a report we can read: run it again
            stored = None
        if stored is not None and reusable(stored, request):
            self._set(job_id, EntryState.DONE, stored, cached=True)
            return False
        # A stored result that may not be reused is dropped: arq enqueues no id that has one.
        redis = await self.client.redis()
        await redis.delete(result_key_prefix + job_id)
        await self.client.enqueue(request, job_id=job_id)
        self._set(job_id, EntryState.QUEUED)
        return True

    async def _poll(self, in_flight: set[str]) -> list[str]:
        """One look at the jobs in flight (one pipelined round trip); the ids that are done."""
        redis = await self.client.redis()
        order = sorted(in_flight)
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in order:
                pipe.exists(result_key_prefix + job_id)
                pipe.exists(in_progress_key_prefix + job_id)
            flags = await pipe.execute()
        done = []
        for i, job_id in enumerate(order):
            has_result, running = flags[2 * i], flags[2 * i + 1]
            if has_result:
                report = await self.client.stored_report(job_id)
                if report is not None:
                    in_flight.discard(job_id)
                    done.append(job_id)
                    self._set(job_id, EntryState.DONE, report)
            elif running and self.by_job[job_id][0].state is not EntryState.RUNNING:
                self._set(job_id, EntryState.RUNNING)
        return done


async def preload(
    client: Client,
    requests: Sequence[tuple[str, LoadRequest]] | Sequence[LoadRequest],
    *,
    on_progress: ProgressCallback | None = None,
    concurrency: int = 16,
    timeout_s: float | None = None,
    fail_fast: bool = False,
    force: bool = False,
) -> PreloadResult:
    """Run a batch of loads through the queue and return every entry with its report.

    This is ``Client.preload``: ``await client.preload(requests, ...)``.

    ``concurrency`` bounds the jobs this batch keeps in the queue at once;
    ``timeout_s`` bounds the whole batch (entries still out are ``unfinished``);
    ``fail_fast`` stops enqueueing after the first report that is not ``ok``;
    ``force`` runs everything again instead of reusing stored reports.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    salt = uuid.uuid4().hex if force else ""
    named = [(r.source, r) if isinstance(r, LoadRequest) else r for r in requests]
    entries: list[PreloadEntry] = []
    by_job: dict[str, LoadRequest] = {}
    first_by_job: dict[str, str] = {}
    for name, request in named:
        job_id = job_id_for(request, salt=salt)
        entries.append(
            PreloadEntry(
                name=name,
                source=request.source,
                job_id=job_id,
                duplicate_of=first_by_job.get(job_id),
            )
        )
        first_by_job.setdefault(job_id, name)
        by_job.setdefault(job_id, request)
    batch = _Batch(client, entries, by_job, max(1, concurrency), fail_fast, on_progress)
    try:
        async with asyncio.timeout(timeout_s):
            # Redis failing under a batch is the client's RedisUnavailable, as for one job.
            with redis_unavailable():
                await batch.run()
    except TimeoutError:
        for entry in entries:
            if entry.state in (EntryState.QUEUED, EntryState.RUNNING, EntryState.PENDING):
                entry.state = EntryState.UNFINISHED
    return PreloadResult(entries=entries, totals=_totals(entries, loop.time() - started))


def _totals(entries: list[PreloadEntry], wall_seconds: float) -> PreloadTotals:
    by_outcome: dict[str, int] = {}
    for entry in entries:
        key = str(entry.outcome) if entry.outcome else str(entry.state)
        by_outcome[key] = by_outcome.get(key, 0) + 1
    ok = sum(e.outcome is Outcome.OK for e in entries)
    done = sum(e.report is not None for e in entries)
    return PreloadTotals(
        entries=len(entries),
        jobs=len({e.job_id for e in entries}),
        ok=ok,
        failed=done - ok,
        unfinished=len(entries) - done,
        cached=sum(e.cached for e in entries),
        by_outcome=dict(sorted(by_outcome.items())),
        wall_seconds=round(wall_seconds, 3),
    )
