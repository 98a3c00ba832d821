"""The report of one job: what the load path learned, built into a LoadReport and logged once."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from structlog.typing import FilteringBoundLogger

from loadwarden.producer.contract import (
    Attempt,
    ErrorInfo,
    FailingModel,
    Limits,
    LoadReport,
    ModelSummary,
    Outcome,
    Resources,
    WorkerInfo,
)
from loadwarden.producer.errors import LoadError
from loadwarden.worker import _version
from loadwarden.worker.load._child_run import ChildRun
from loadwarden.worker.load._outcome import Raised
from loadwarden.worker.load.failures import RepeatedlyFailing
from loadwarden.worker.load.limits import HistoryStats
from loadwarden.worker.load.signing import SignatureCheck
from loadwarden.worker.ops.metrics import Metrics


def now() -> datetime:
    return datetime.now(UTC)


def this_worker() -> WorkerInfo:
    """This worker process, as its reports and heartbeats name it."""
    hostname = socket.gethostname()
    return WorkerInfo(
        id=f"{hostname}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
        hostname=hostname,
        pid=os.getpid(),
        version=_version.VERSION,
    )


@dataclass(frozen=True, slots=True)
class JobRef:
    """Which job a report is for: its id, source, labels, attempt and when it came and began."""

    job_id: str
    source: str
    labels: dict[str, str] = field(default_factory=dict)
    attempt: int = 1
    enqueued_at: datetime | None = None
    started_at: datetime = field(default_factory=now)


@dataclass(slots=True)
class LoadState:
    """What the load path learned before and during the child run, and where it is."""

    summary: ModelSummary | None = None
    limits: Limits | None = None
    #: Waits before the child (admission, a fork server's restart) cut its deadline by over
    #: ``_deadline.WAITED_SHARE``: its timeout is not held against the model.
    limit_cut: bool = False
    run: ChildRun | None = None
    signature: SignatureCheck | None = None
    stage: str = "source"
    #: The model's identity once its source is open, and what the failure memory held for it.
    identity: str | None = None
    remembered: FailingModel | None = None
    #: The model's load history, read with the failure memory (``_lookup``).
    history: HistoryStats | None = None


@dataclass(frozen=True, slots=True)
class Reporter:
    """Who writes reports: this worker, how many tensors a report lists, where it is counted."""

    worker: WorkerInfo
    max_tensors: int
    metrics: Metrics

    def report(self, job: JobRef, state: LoadState, error: LoadError | None) -> LoadReport:
        """The job's report; ``error`` is None exactly when the load is ``ok``."""
        finished_at = now()
        outcome = error.outcome if error else Outcome.OK
        summary, run = state.summary, state.run
        return LoadReport(
            job_id=job.job_id,
            source=job.source,
            outcome=outcome,
            error=ErrorInfo.from_error(
                error,
                traceback_of(run),
                error.remembered if isinstance(error, RepeatedlyFailing) else None,
            )
            if error
            else None,
            attempts=[
                Attempt(
                    number=job.attempt,
                    outcome=outcome,
                    error_code=error.code if error else None,
                    worker=self.worker.id,
                    started_at=job.started_at,
                    finished_at=finished_at,
                )
            ],
            model=summary.capped(self.max_tensors) if summary else None,
            signature=state.signature.info if state.signature else None,
            limits=state.limits,
            resources=resources_of(run),
            confinement=run.confinement if run else [],
            worker=self.worker,
            labels=job.labels,
            enqueued_at=job.enqueued_at,
            started_at=job.started_at,
            finished_at=finished_at,
        )

    def finished(self, log: FilteringBoundLogger, report: LoadReport) -> None:
        """Count the report and log the job's one canonical line."""
        self.metrics.observe(report)
        res = report.resources
        log.info(
            "job_finished",
            outcome=str(report.outcome),
            error_code=report.error.code if report.error else None,
            error=report.error.message if report.error else None,
            wall_seconds=res.wall_seconds if res else 0.0,
            cpu_seconds=round(res.cpu_user_seconds + res.cpu_system_seconds, 6) if res else 0.0,
            peak_rss_bytes=res.peak_rss_bytes if res else 0,
            read_bytes=res.read_bytes if res else 0,
            model_bytes=report.model.bytes if report.model else None,
        )


def traceback_of(run: ChildRun | None) -> str | None:
    return run.final.traceback if run is not None and isinstance(run.final, Raised) else None


def resources_of(run: ChildRun | None) -> Resources | None:
    if run is None or run.ended is None:
        return None
    rchar = run.final.rchar if run.final is not None else 0
    return Resources(
        wall_seconds=round(run.wall_seconds, 6),
        cpu_user_seconds=run.ended.cpu_user_s,
        cpu_system_seconds=run.ended.cpu_system_s,
        peak_rss_bytes=max(run.ended.maxrss_bytes, run.sampled_peak_rss),
        read_bytes=max(rchar, run.sampled_read),
        samples=run.samples,
        cgroup_peak_bytes=run.cgroup_peak_bytes,
        series=run.series,
    )
