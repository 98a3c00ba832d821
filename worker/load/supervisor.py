"""The load path: open, inspect, derive limits, admit, run one confined child, report.

``Supervisor.load`` is the job function's body and the ``loadwarden load``
command's; nothing else runs a load.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

import structlog
from structlog.typing import FilteringBoundLogger

from loadwarden.producer.contract import (
    JobPhase,
    Limits,
    LoadReport,
    LoadRequest,
    ModelFormat,
    ModelSummary,
    RunningJob,
)
from loadwarden.producer.errors import LoadError, describe
from loadwarden.worker._files import OpenedModel
from loadwarden.worker._tasks import cancel_and_wait, in_thread
from loadwarden.worker.config import Settings
from loadwarden.worker.formats import LOADERS
from loadwarden.worker.load._checks import (
    check_anomaly,
    record_history,
    verify_signature,
    warn_clamped,
)
from loadwarden.worker.load._child_run import ChildHost, ChildJob, place_ahead, run_child
from loadwarden.worker.load._deadline import JobDeadline, within
from loadwarden.worker.load._digest import digest_files
from loadwarden.worker.load._inspection import inspect_bounded, manifest_for
from loadwarden.worker.load._lookup import FirstWrites, FirstWritesFailed, Once, look_up
from loadwarden.worker.load._model import (
    child_spec,
    inspect_opened,
    needs_digests,
    with_digests,
)
from loadwarden.worker.load._outcome import STAGE_ENDS, Early, Loaded, decide, failure
from loadwarden.worker.load._report import JobRef, LoadState, Reporter, now, this_worker
from loadwarden.worker.load.admission import Admission, detect_memory_bytes
from loadwarden.worker.load.failures import FailureMemory
from loadwarden.worker.load.history import History, model_identity
from loadwarden.worker.load.limits import (
    HistoryStats,
    derive_limits,
    expected_memory_bytes,
    job_budget_s,
    near_thresholds,
    tensor_budget_bytes,
)
from loadwarden.worker.load.signing import Trust, TrustError, note_writes, recheck
from loadwarden.worker.ops.logs import configure_logging
from loadwarden.worker.ops.metrics import Metrics
from loadwarden.worker.sandbox import _seccomp
from loadwarden.worker.sandbox._landlock import abi_version
from loadwarden.worker.sandbox.cgroups import CgroupManager
from loadwarden.worker.sandbox.children import SandboxError
from loadwarden.worker.sandbox.forkserver import ForkServer
from loadwarden.worker.sources import open_model

#: The loader each format runs in the child.
DEFAULT_LOADERS: Mapping[ModelFormat, str] = LOADERS


class Supervisor:
    """Runs loads, one fresh confined child each, within the node's memory budget."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        forkserver: ForkServer | None = None,
        loaders: Mapping[ModelFormat, str] | None = None,
        preload: Sequence[str] = (),
        history: History | None = None,
        failures: FailureMemory | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = s = settings or Settings()
        if not structlog.is_configured():
            # Used as a library with no logging set up: structlog's default prints every
            # level to stdout; ours is info and above, to stderr (as the CLI does).
            configure_logging("info")
        self.forkserver = forkserver or ForkServer(preload=preload)
        self.loaders = {**DEFAULT_LOADERS, **(loaders or {})}
        self.history = history
        self.failures = failures
        #: The trusted signers (``signing.signers``), loaded by ``start``.
        self.trust: Trust | None = None
        #: Every job held now, with its phase (the heartbeat publishes them).
        self.in_flight: dict[str, RunningJob] = {}
        #: Set whenever ``in_flight`` changes, so the heartbeat can publish it at once.
        self.changed = asyncio.Event()
        container = s.container_memory_bytes or detect_memory_bytes()
        budget = s.memory_budget_bytes or max(0, container - s.memory_reserve_bytes)
        self.admission = Admission(budget)
        self.cgroups: CgroupManager | None = None
        self.cgroups_note = "disabled by settings (use_cgroups = false)"
        self.landlock_abi = abi_version() if s.use_landlock else 0
        self.info = this_worker()
        self._log = structlog.get_logger("loadwarden.supervisor").bind(worker=self.info.id)
        self.metrics = metrics or Metrics()
        self.metrics.bind(
            lambda: len(self.in_flight),
            lambda: self.admission.budget_bytes,
            lambda: self.admission.in_use_bytes,
        )
        self.metrics.info.info({"worker": self.info.id, "version": self.info.version})

    async def start(self) -> None:
        """Find the confinement this host allows (refusing to start without a required one)."""
        s = self.settings
        if s.use_cgroups and self.cgroups is None:
            self.cgroups, self.cgroups_note = CgroupManager.detect(s.cgroup_root)
        self.metrics.confinement.info(self.confinement_labels())
        self._log.info(
            "sandbox_ready" if self.cgroups else "cgroups_unavailable",
            cgroups=self.cgroups_note,
            landlock_abi=self.landlock_abi,
            memory_budget_bytes=self.admission.budget_bytes,
        )
        refusals = []
        try:  # fail closed: never run without the signers a policy names
            await self._trusted()
        except TrustError as exc:
            refusals.append(str(exc))
        if s.require_cgroups and self.cgroups is None:
            refusals.append(f"require_cgroups is set, but {self.cgroups_note}")
        if s.require_landlock and not self.landlock_abi:
            refusals.append("require_landlock is set, but this kernel denies Landlock")
        if refusals:
            if self.cgroups is not None:
                self.cgroups.close()
                self.cgroups = None
            raise SandboxError("refusing to start: " + "; ".join(refusals))
        if self.cgroups is not None:
            self.forkserver.on_ready = functools.partial(place_ahead, self.cgroups)
        self.forkserver.on_restart = self.metrics.forkserver_restarts.inc
        self.metrics.forkserver_down.set_function(lambda: self.forkserver.down_s)
        await self.forkserver.start()

    def confinement_labels(self) -> dict[str, str]:
        """What confines this worker's loads, as metric labels (loadwarden_confinement_info)."""
        return {
            "cgroups": f"v{self.cgroups.version}" if self.cgroups else "none",
            "landlock": f"abi{self.landlock_abi}" if self.landlock_abi else "none",
            # The child's own seccomp filters, when the sandbox has them; the container
            # runtime's profile (RuntimeDefault) is not ours to report.
            "seccomp": _seccomp.label(),
            "address_space_limit": "on" if self.settings.use_address_space_limit else "off",
        }

    async def close(self) -> None:
        if self.history is not None:  # samples recorded but not written yet
            await self.history.close()
        await self.forkserver.close()
        if self.cgroups is not None:
            await self.cgroups.drain()
            self.cgroups.close()

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
        cancel: asyncio.Event | None = None,
        first: FirstWrites | None = None,
    ) -> LoadReport:
        """Run one load to its end and return its report; never raises for a bad file.

        Setting ``cancel`` kills the child at once and ends the load ``cancelled``.
        ``first`` (a job's lease) is written before the model is inspected or loaded, or
        opened in a thread; ``FirstWritesFailed`` if it cannot be, and the load stops there.
        """
        job = JobRef(
            job_id or uuid.uuid4().hex, request.source, dict(request.labels), attempt, enqueued_at
        )
        log = self._log.bind(job_id=job.job_id, source=request.source, attempt=attempt)
        state = LoadState()
        error: LoadError | None = None
        phase = self._phase_setter(job.job_id, request.source)
        phase(JobPhase.INSPECTING)
        try:
            error = await self._load(request, state, log, cancel, phase, first)
        except FirstWritesFailed:
            raise
        except LoadError as exc:
            error = exc
        except SandboxError as exc:  # the machinery failed, not the file: worth a retry
            error = failure(Early.SANDBOX, f"the sandbox failed: {exc.message}")
        except Exception as exc:  # whatever escaped a stage still ends in a classified report
            error = failure(
                STAGE_ENDS[state.stage], f"the {state.stage} stage failed: {describe(exc)}"
            )
            log.error("load_stage_failed", stage=state.stage, error=describe(exc))
        finally:
            self.in_flight.pop(job.job_id, None)
            self.changed.set()
        if self.failures is not None and state.identity is not None:
            await self.failures.settle(state, job.job_id, request.source, error, log)
        return self._finish(log, job, state, error)

    def _phase_setter(self, job_id: str, source: str) -> Callable[[JobPhase], None]:
        def enter(phase: JobPhase) -> None:
            self.in_flight[job_id] = RunningJob(
                job_id=job_id, source=source, phase=phase, since=now()
            )
            self.changed.set()

        return enter

    async def _load(
        self,
        request: LoadRequest,
        state: LoadState,
        log: FilteringBoundLogger,
        cancel: asyncio.Event | None,
        phase: Callable[[JobPhase], None],
        first: FirstWrites | None,
    ) -> LoadError | None:
        budget_s = job_budget_s(request.limits, self.settings.limits)  # the request's, capped
        deadline = JobDeadline.starting_now(budget_s, cancel)
        # Sent before work in a thread (which could take the worker down), else in the look-up.
        first_writes = Once(first)
        opened = await deadline.before(
            open_model(
                request.source,
                expected_sha256=request.sha256,
                policy=self.settings.sources,
                caps=self.settings.inspection,
                before_thread=first_writes.send,
            ),
            "opening the source",
        )
        with opened:
            # A model the failure memory holds as repeatedly failing is refused in the look-up,
            # before its signature is checked, its header inspected or any child; its history
            # comes in the same round trip (with the first writes, when not sent yet).
            state.identity = identity = model_identity(opened, request.sha256)
            state.remembered, state.history = await look_up(
                identity, self.failures, self.history, log, first_writes.take()
            )
            state.stage = "signature"
            await verify_signature(
                self.settings.signing, self._trusted, opened, request, state, deadline
            )
            state.stage = "inspect"
            state.summary = summary = await deadline.before(
                inspect_bounded(
                    opened,
                    request,
                    self.settings.inspection,
                    self.tensor_budget_bytes(),
                    deadline,
                    self._inspect,
                ),
                "inspecting the model",
            )
            manifest = await manifest_for(opened, summary)
            state.stage = "limits"
            history = state.history
            state.limits = limits = derive_limits(
                summary.bytes,
                request.limits,
                self.settings.limits,
                history,
                tensor_count=len(summary.tensors),
            )
            warn_clamped(log, request, limits)
            state.stage = "admit"
            phase(JobPhase.WAITING)
            waits_began = asyncio.get_running_loop().time()
            async with self.admission.reserve(limits.memory_bytes):
                if cancel is not None and cancel.is_set():
                    raise failure(Early.CANCELLED, "cancelled before the load began")
                host = ChildHost(self.forkserver, self.cgroups, self.settings.sample_interval_s)
                await host.sandbox_back(deadline, log)  # a lost fork server's restart: waiting
                phase(JobPhase.LOADING)
                # What is left of the job's deadline (after source, inspection, admission, restart)
                limits, state.limit_cut = within(limits, deadline, waits_began)
                state.limits = limits
                # Every file hashed here while the child loads: the loader never sees a digest.
                hashing = (
                    asyncio.create_task(
                        digest_files([(shard.file.fd, shard.file.size) for shard in opened.files])
                    )
                    if needs_digests(opened, request.sha256) or state.signature is not None
                    else None
                )
                digests: list[str] | None = None
                state.stage = "child"
                try:
                    state.run = run = await run_child(
                        host,
                        self._child_job(opened, summary, manifest, limits, history),
                        log=log,
                        cancel=cancel,
                    )
                    if hashing is not None and isinstance(run.final, Loaded):
                        digests = await deadline.before(hashing, "hashing the files")
                        note_writes(state.signature, opened)
                finally:
                    if hashing is not None:
                        await cancel_and_wait(hashing)
        state.stage = "classify"
        checked: LoadError | None = None
        if isinstance(run.final, Loaded) and not run.cancelled:
            state.summary, mismatch = with_digests(
                summary, opened, run.final.result, digests, request.sha256
            )
            # ...and the bytes loaded are still the ones signed.
            checked = mismatch or recheck(state.signature, opened, digests)
        error = decide(run.end(limits, manifest, checked)).error
        if error is None:
            if history is not None:
                check_anomaly(run, history, self.settings, self.metrics, log)
            await record_history(self.history, identity, run, log)
        return error

    def _child_job(
        self,
        opened: OpenedModel,
        summary: ModelSummary,
        manifest: str,
        limits: Limits,
        history: HistoryStats | None,
    ) -> ChildJob:
        """The child's work: its spec and files, its limits, and the levels worth a warning."""
        s = self.settings
        loader = self.loaders[summary.format]
        expected = expected_memory_bytes(summary.bytes, s.limits, history)
        return ChildJob(
            child_spec(opened, loader, manifest, limits, s, landlock=self.landlock_abi > 0),
            [shard.file.fd for shard in opened.files],
            limits,
            thresholds=near_thresholds(limits, expected, s.threshold_fraction),
            on_threshold=lambda limit: self.metrics.thresholds.labels(limit=limit).inc(),
        )

    async def _trusted(self) -> Trust | None:
        """The trusted signers, loaded on first use (keys read, model-signing imported: ~1 s,
        in a thread); None when the settings name none."""
        if self.trust is None and self.settings.signing.signers:
            policy = self.settings.signing
            self.trust = await in_thread(lambda: Trust(policy))
        return self.trust

    def _inspect(self, opened: OpenedModel, request: LoadRequest) -> ModelSummary:
        """Sniff each file's format by magic bytes and inspect it strictly (no loader, no
        child); a checkpoint's shards are checked against its index and summed."""
        caps, budget = self.settings.inspection, self.tensor_budget_bytes()
        return inspect_opened(opened, declared=request.format, caps=caps, budget_bytes=budget)

    def tensor_budget_bytes(self) -> int:
        """The most tensor bytes a load could hold on this worker (see ``limits``)."""
        return tensor_budget_bytes(self.settings.limits, self.admission.budget_bytes)

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
        job = JobRef(job_id, source, attempt=attempt, enqueued_at=enqueued_at)
        return self._finish(log, job, LoadState(), error)

    def _finish(
        self, log: FilteringBoundLogger, job: JobRef, state: LoadState, error: LoadError | None
    ) -> LoadReport:
        """The job's report, counted and logged once."""
        reporter = Reporter(self.info, self.settings.report_max_tensors, self.metrics)
        report = reporter.report(job, state, error)
        reporter.finished(log, report)
        return report
