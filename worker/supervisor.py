"""The load path: inspect, derive limits, run one confined child under a deadline, report.

``Supervisor.load`` is the job function's body and the ``loadwarden load``
command's; nothing else runs a load.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog
from structlog.typing import FilteringBoundLogger

from loadwarden.producer.contract import (
    Attempt,
    ErrorInfo,
    Limits,
    LoadReport,
    LoadRequest,
    ModelFormat,
    ModelSummary,
    Outcome,
    Resources,
    WorkerInfo,
)
from loadwarden.producer.errors import ChildCrashed, LoadError
from loadwarden.producer.settings import Settings
from loadwarden.worker import _version
from loadwarden.worker._files import ModelFile
from loadwarden.worker._outcome import Loaded, Raised, Ready, classify, parse_message
from loadwarden.worker.formats.safetensors import inspect_safetensors
from loadwarden.worker.limits import derive_limits
from loadwarden.worker.monitor import Monitor
from loadwarden.worker.sandbox._protocol import manifest_digest
from loadwarden.worker.sandbox.forkserver import (
    ChildExit,
    ForkServer,
    SandboxError,
    stop_child,
)
from loadwarden.worker.sources import open_source

T = TypeVar("T")

#: After its final message a child exits at once; wait this long before killing it.
EXIT_GRACE_S = 1.0

#: The loader each format runs in the child.
DEFAULT_LOADERS: Mapping[ModelFormat, str] = {ModelFormat.SAFETENSORS: "safetensors"}


def _now() -> datetime:
    return datetime.now(UTC)


async def _in_thread(fn: Callable[[], T]) -> T:
    """Run blocking work in a thread; if cancelled, let it finish first (it may use our fds)."""
    future = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await future
        raise


@dataclass(slots=True)
class _Run:
    """What one child run produced."""

    ready: Ready | None = None
    final: Loaded | Raised | None = None
    ended: ChildExit | None = None
    wall_seconds: float = 0.0
    timed_out: bool = False
    protocol_error: LoadError | None = None
    usage_samples: int = 0
    sampled_peak_rss: int = 0
    sampled_read: int = 0
    confinement: list[str] = field(default_factory=list)


class Supervisor:
    """Runs loads, one fresh confined child each, and reports what happened."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        forkserver: ForkServer | None = None,
        loaders: Mapping[ModelFormat, str] | None = None,
        preload: Sequence[str] = (),
    ) -> None:
        self.settings = settings or Settings()
        self.forkserver = forkserver or ForkServer(preload=preload)
        self.loaders = {**DEFAULT_LOADERS, **(loaders or {})}
        self.info = WorkerInfo(
            id=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
            hostname=socket.gethostname(),
            pid=os.getpid(),
            version=_version.VERSION,
        )
        self._log = structlog.get_logger("loadwarden.supervisor").bind(worker=self.info.id)

    async def start(self) -> None:
        await self.forkserver.start()

    async def close(self) -> None:
        await self.forkserver.close()

    async def __aenter__(self) -> Supervisor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def load(
        self,
        request: LoadRequest,
        *,
        job_id: str | None = None,
        attempt: int = 1,
        enqueued_at: datetime | None = None,
    ) -> LoadReport:
        """Run one load to its end and return its report; never raises for a bad file."""
        job_id = job_id or uuid.uuid4().hex
        log = self._log.bind(job_id=job_id, source=request.source, attempt=attempt)
        started_at = _now()
        summary: ModelSummary | None = None
        limits: Limits | None = None
        run = _Run()
        error: LoadError | None = None
        try:
            opened = await open_source(
                request.source, expected_sha256=request.sha256, policy=self.settings.sources
            )
            with opened as model_file:
                summary = await _in_thread(lambda: self._inspect(model_file, request))
                limits = derive_limits(summary.bytes, request.limits, self.settings.limits)
                run = await self._run_child(model_file, summary, limits, request, log)
                assert run.ended is not None  # _run_child always ends with stop_child
                error = run.protocol_error or classify(
                    run.final,
                    run.ended,
                    limits,
                    timed_out=run.timed_out,
                    peak_rss_bytes=run.sampled_peak_rss,
                    expected_manifest=_manifest_of(summary),
                )
        except LoadError as exc:
            error = exc
        except SandboxError as exc:  # the machinery failed, not the file: worth a retry
            error = ChildCrashed(f"the sandbox failed: {exc.message}", code="sandbox")
        report = self._report(
            request.source,
            dict(request.labels),
            job_id,
            attempt,
            enqueued_at,
            started_at,
            summary,
            limits,
            run,
            error,
        )
        self._log_finished(log, report)
        return report

    def _inspect(self, model_file: ModelFile, request: LoadRequest) -> ModelSummary:
        # Only safetensors so far; format sniffing by magic bytes comes with issue #6.
        fmt = request.format or ModelFormat.SAFETENSORS
        if fmt is not ModelFormat.SAFETENSORS:
            raise AssertionError(f"no inspector for {fmt}")
        return inspect_safetensors(model_file.fd, model_file.size, self.settings.inspection).summary

    def _spec(
        self, model_file: ModelFile, summary: ModelSummary, limits: Limits, request: LoadRequest
    ) -> dict[str, Any]:
        return {
            "loader": self.loaders[summary.format],
            "sha256": request.sha256,
            "memory_bytes": limits.memory_bytes,
            "cpu_seconds": limits.cpu_seconds,
            "max_fds": self.settings.child_max_fds,
            "manifest_digest": _manifest_of(summary),
            "expect": {"dev": model_file.dev, "ino": model_file.ino, "size": model_file.size},
        }

    async def _run_child(
        self,
        model_file: ModelFile,
        summary: ModelSummary,
        limits: Limits,
        request: LoadRequest,
        log: FilteringBoundLogger,
    ) -> _Run:
        loop = asyncio.get_running_loop()
        run = _Run()
        try:
            child = await self.forkserver.spawn()
        except SandboxError as exc:
            raise ChildCrashed(f"could not start a child: {exc.message}", code="sandbox") from None
        started = loop.time()
        monitor = Monitor(child.pid, self.settings.sample_interval_s, log)
        sampling: asyncio.Task[None] | None = None
        try:
            await child.send_spec(self._spec(model_file, summary, limits, request), model_file.fd)

            async def converse() -> None:
                nonlocal sampling
                while (raw := await child.receive()) is not None:
                    message = parse_message(raw)
                    if isinstance(message, Ready) and run.ready is None:
                        run.ready = message
                        sampling = asyncio.create_task(monitor.run())
                        log.info(
                            "load_started",
                            child_pid=child.pid,
                            limits=limits.model_dump(mode="json"),
                            confinement=message.confinement,
                        )
                    elif isinstance(message, Loaded | Raised) and run.ready is not None:
                        run.final = message
                        return
                    else:
                        raise ChildCrashed(
                            "the child sent messages out of order", code="protocol_violation"
                        )

            try:
                await asyncio.wait_for(converse(), timeout=limits.timeout_seconds)
            except TimeoutError:
                run.timed_out = True
            except (LoadError, SandboxError, OSError) as exc:
                run.protocol_error = (
                    exc
                    if isinstance(exc, LoadError)
                    else ChildCrashed(
                        f"lost contact with the child: {exc}", code="protocol_violation"
                    )
                )
            if run.final is not None and not child.exited.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(child.exited), EXIT_GRACE_S)
        finally:
            if sampling is not None:
                sampling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampling
            monitor.sample()  # a last look, if it is still there
            run.ended = await stop_child(child)
        run.wall_seconds = loop.time() - started
        run.usage_samples = monitor.usage.samples
        run.sampled_peak_rss = monitor.usage.peak_rss_bytes
        run.sampled_read = monitor.usage.read_chars
        if run.timed_out:
            log.warning(
                "child_killed",
                child_pid=child.pid,
                reason="deadline",
                timeout_seconds=limits.timeout_seconds,
            )
        return run

    def rejected(
        self,
        error: LoadError,
        *,
        job_id: str,
        source: str,
        attempt: int = 1,
        enqueued_at: datetime | None = None,
    ) -> LoadReport:
        """The report of a job refused before any load began (for example, not a LoadRequest)."""
        log = self._log.bind(job_id=job_id, source=source, attempt=attempt)
        report = self._report(
            source, {}, job_id, attempt, enqueued_at, _now(), None, None, _Run(), error
        )
        self._log_finished(log, report)
        return report

    def _report(
        self,
        source: str,
        labels: dict[str, str],
        job_id: str,
        attempt: int,
        enqueued_at: datetime | None,
        started_at: datetime,
        summary: ModelSummary | None,
        limits: Limits | None,
        run: _Run,
        error: LoadError | None,
    ) -> LoadReport:
        finished_at = _now()
        outcome = error.outcome if error else Outcome.OK
        if summary is not None and isinstance(run.final, Loaded):
            summary = summary.model_copy(update={"sha256": run.final.result.sha256})
        resources = None
        if run.ended is not None:
            rchar = run.final.rchar if run.final is not None else 0
            resources = Resources(
                wall_seconds=round(run.wall_seconds, 6),
                cpu_user_seconds=run.ended.cpu_user_s,
                cpu_system_seconds=run.ended.cpu_system_s,
                peak_rss_bytes=max(run.ended.maxrss_bytes, run.sampled_peak_rss),
                read_bytes=max(rchar, run.sampled_read),
                samples=run.usage_samples,
            )
        traceback = run.final.traceback if isinstance(run.final, Raised) else None
        return LoadReport(
            job_id=job_id,
            source=source,
            outcome=outcome,
            error=ErrorInfo.from_error(error, traceback) if error else None,
            attempts=[
                Attempt(
                    number=attempt,
                    outcome=outcome,
                    error_code=error.code if error else None,
                    worker=self.info.id,
                    started_at=started_at,
                    finished_at=finished_at,
                )
            ],
            model=summary,
            limits=limits,
            resources=resources,
            confinement=run.ready.confinement if run.ready else [],
            worker=self.info,
            labels=labels,
            enqueued_at=enqueued_at,
            started_at=started_at,
            finished_at=finished_at,
        )

    @staticmethod
    def _log_finished(log: FilteringBoundLogger, report: LoadReport) -> None:
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


def _manifest_of(summary: ModelSummary) -> str:
    return manifest_digest([(t.name, t.dtype, t.shape, t.bytes) for t in summary.tensors])
