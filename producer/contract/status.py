"""What Redis says about now: the failure memory's models and each live worker's heartbeat."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import Field

from loadwarden.producer.contract._base import NonNegInt, _Model
from loadwarden.producer.outcomes import Outcome


class RememberedFailure(_Model):
    """One failed load that the failure memory counts against its model."""

    job_id: str
    source: str
    outcome: Outcome
    error_code: str
    at: datetime


class FailingModel(_Model):
    """What the failure memory holds for one model identity."""

    identity: str = Field(
        description="the model's identity: sha256:<digest> when the request named one, else "
        "file:<sha256 of each file's path, size and mtime> (a changed file is a new model)"
    )
    failures: list[RememberedFailure] = Field(
        description="one per job (a job's retries count once), newest first"
    )
    refused: bool = Field(description="true when loads of this model are refused now")
    expires_at: datetime = Field(
        description="when the memory forgets this model (a window after its latest failure)"
    )


class JobPhase(StrEnum):
    """What a worker is doing with a job right now."""

    INSPECTING = "inspecting"  # opening the source, reading the header, deriving limits
    WAITING = "waiting"  # for room in the worker's memory budget, or its fork server's restart
    LOADING = "loading"  # a confined child is loading it


class RunningJob(_Model):
    """One job a worker holds now, and since when it has been in its current phase."""

    job_id: str
    source: str
    phase: JobPhase
    since: datetime


class WorkerStatus(_Model):
    """A live worker's heartbeat: who it is, what it runs, how much of its memory budget is held."""

    id: str
    hostname: str
    pid: int
    version: str
    queue: str
    concurrency: Annotated[int, Field(ge=1)]
    memory_budget_bytes: NonNegInt
    memory_in_use_bytes: NonNegInt
    running: NonNegInt
    waiting: NonNegInt = Field(description="loads waiting for memory budget")
    in_flight: list[str] = Field(default=[], description="job ids this worker is running")
    jobs: list[RunningJob] = Field(default=[], description="each job held now, with its phase")
    cgroups: str
    landlock_abi: NonNegInt
    started_at: datetime
    seen_at: datetime
