"""Where a job is (``JobState``), and the handles that name one job for a client."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from arq.jobs import JobStatus

from loadwarden.producer._blocking import blocking

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from loadwarden.producer.client import BlockingClient, Client  # noqa: F401 (bases name them)
    from loadwarden.producer.contract import LoadReport

T = TypeVar("T")
C = TypeVar("C")


class JobState(StrEnum):
    """Where a job is."""

    QUEUED = "queued"
    DEFERRED = "deferred"
    RUNNING = "running"
    COMPLETE = "complete"
    NOT_FOUND = "not_found"


FROM_ARQ = {
    JobStatus.queued: JobState.QUEUED,
    JobStatus.deferred: JobState.DEFERRED,
    JobStatus.in_progress: JobState.RUNNING,
    JobStatus.complete: JobState.COMPLETE,
    JobStatus.not_found: JobState.NOT_FOUND,
}


class _Handle(Generic[C]):
    """A job's id, and the client it was enqueued with."""

    def __init__(self, client: C, job_id: str) -> None:
        self.client = client
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.job_id}>"


class JobHandle(_Handle["Client"]):
    """A reference to one enqueued load."""

    async def status(self) -> JobState:
        return await self.client.job_state(self.job_id)

    async def report(self, timeout_s: float | None = None) -> LoadReport:
        """Wait for the report: ReportTimeout after ``timeout_s``, JobNotFound if no such job."""
        return await self.client.report(self.job_id, timeout_s=timeout_s)

    async def cancel(self) -> JobState:
        """Cancel this job (see ``Client.cancel``)."""
        return await self.client.cancel(self.job_id)


class BlockingJobHandle(_Handle["BlockingClient"]):
    """``JobHandle``'s synchronous twin: the same attribute and methods, without ``await``."""

    @property
    def _async_twin(self) -> JobHandle:
        return self.client._async_twin.job(self.job_id)

    def _run(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return self.client._run(factory)

    status = blocking(JobHandle.status)
    report = blocking(JobHandle.report)
    cancel = blocking(JobHandle.cancel)
