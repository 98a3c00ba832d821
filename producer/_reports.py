"""A job's report for a client: read as stored, or waited for (woken by the worker's push)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from arq.constants import result_key_prefix
from pydantic import ValidationError

from loadwarden.producer import wire
from loadwarden.producer._guard import guard
from loadwarden.producer._handles import JobState
from loadwarden.producer.connection import confirm_replicated
from loadwarden.producer.contract import LoadReport
from loadwarden.producer.errors import ContractError, JobNotFound, ReportTimeout
from loadwarden.producer.finished import FinishWatch

if TYPE_CHECKING:
    from loadwarden.producer.client import Client


async def stored_report(client: Client, job_id: str) -> LoadReport | None:
    """The job's report if one is stored now (no waiting), else None."""
    redis = await client.redis()
    raw = await guard(redis.get(result_key_prefix + job_id))
    if raw is None:
        return None
    return _report_in(job_id, wire.loads(raw))


def _pushed_report(watch: FinishWatch, job_id: str) -> LoadReport | None:
    """The report a push carried for ``job_id``, validated as a stored one is; None if it
    carried none, or one that does not pass (then the stored one is read, and judged)."""
    document = watch.take(job_id)
    if document is None:
        return None
    try:
        return _report_in(job_id, document)
    except ContractError:
        return None


def _report_in(job_id: str, document: dict[str, Any]) -> LoadReport:
    """The LoadReport in arq's result document; ContractError if it holds none."""
    result = document.get("r")
    if not document.get("s") or not isinstance(result, dict) or "__error__" in result:
        detail = result.get("__error__") if isinstance(result, dict) else result
        raise ContractError(f"job {job_id} failed before it could be loaded: {detail}")
    try:
        return LoadReport.model_validate(result)
    except ValidationError as exc:
        raise ContractError(f"job {job_id} has a report that is not valid: {exc}") from None


async def report(client: Client, job_id: str, *, timeout_s: float | None = None) -> LoadReport:
    """The job's report, waiting for it up to ``timeout_s`` (None: wait as long as it takes).

    Woken by the worker's push when the report is stored (``FinishWatch``), which
    carries the report (then it is not read back); reads it again every ``poll_s``
    whatever happens.
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    watch = await client.finish_watch()
    pushed = watch.watch([job_id])
    try:
        if timeout_s != 0:
            # Watched before the first read: a push after it wakes us, and so does the
            # subscription standing (to read again whatever came before it).
            watch.start()
        look = True  # whether the job still exists, checked unless a push woke us
        while True:
            pushed.clear()
            stored = _pushed_report(watch, job_id) or await client.stored_report(job_id)
            if stored is not None:
                # With wait_replicas, a report is handed out only once replicas hold it:
                # one a failover could still take back might come again with another
                # outcome.
                await guard(confirm_replicated(await client.redis(), client.settings.redis))
                return stored
            # Not after a push (the report is there, or soon): it costs 3 round trips.
            gone = (look or not watch.live) and (
                await client.job_state(job_id) is JobState.NOT_FOUND
            )
            if gone:
                # The report may have landed between our two reads.
                stored = await client.stored_report(job_id)
                if stored is not None:
                    return stored
                raise JobNotFound(f"no job {job_id!r} is queued, running or finished")
            pause = watch.poll_s
            if deadline is not None:
                if loop.time() >= deadline:
                    state = await client.job_state(job_id)
                    raise ReportTimeout(
                        f"job {job_id} has no report yet (it is {state}; waited {timeout_s:g} s)"
                    )
                pause = min(pause, deadline - loop.time())
            try:
                async with asyncio.timeout(pause):
                    await pushed.wait()
                look = False
            except TimeoutError:
                look = True
    finally:
        watch.unwatch([job_id], pushed)
