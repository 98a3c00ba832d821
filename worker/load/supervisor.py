"""The load path: open, inspect, derive limits, admit, run one confined child, report.

``Supervisor.load`` is the job function's body and the ``loadwarden load``
command's; nothing else runs a load.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from structlog.typing import FilteringBoundLogger

from loadwarden.producer.contract import (
    Attempt,
    Derivation,
    ErrorInfo,
    FailingModel,
    JobPhase,
    Limits,
    LoadReport,
    LoadRequest,
    ModelFormat,
    ModelSummary,
    Outcome,
    RunningJob,
    WorkerInfo,
)
from loadwarden.producer.errors import (
    ChildCrashed,
    InvalidModel,
    LoadCancelled,
    LoadError,
    MemoryExceeded,
    SourceRefused,
    SourceUnavailable,
    describe,
)
from loadwarden.worker import _version
from loadwarden.worker._files import OpenedModel
from loadwarden.worker._tasks import cancel_and_wait
from loadwarden.worker.config import Settings
from loadwarden.worker.formats import LOADERS, needs_isolation
from loadwarden.worker.load._child_run import (
    ChildRun,
    place_ahead,
    resources_of,
    run_child,
    traceback_of,
)
from loadwarden.worker.load._deadline import before_deadline, in_thread, within
from loadwarden.worker.load._digest import digest_files
from loadwarden.worker.load._lookup import look_up
from loadwarden.worker.load._model import (
    child_files,
    inspect_opened,
    needs_digests,
    shard_format,
    with_digests,
)
from loadwarden.worker.load._outcome import Loaded, classify
from loadwarden.worker.load.admission import Admission, detect_memory_bytes
from loadwarden.worker.load.failures import FailureMemory, RepeatedlyFailing
from loadwarden.worker.load.history import History, model_identity
from loadwarden.worker.load.limits import (
    HistoryStats,
    derive_limits,
    expected_memory_bytes,
    near_thresholds,
)
from loadwarden.worker.load.signing import (
    SignatureCheck,
    Trust,
    TrustError,
    check_signature,
    may_require,
    note_writes,
    recheck,
    required_signers,
)
from loadwarden.worker.ops.logs import configure_logging
from loadwarden.worker.ops.metrics import Metrics
from loadwarden.worker.sandbox import _seccomp
from loadwarden.worker.sandbox._landlock import abi_version
from loadwarden.worker.sandbox._protocol import manifest_digest
from loadwarden.worker.sandbox.cgroups import CgroupManager
from loadwarden.worker.sandbox.children import SandboxError
from loadwarden.worker.sandbox.forkserver import ForkServer
from loadwarden.worker.sandbox.inspector import inspect_in_child
from loadwarden.worker.sandbox.spec import ChildSpec
from loadwarden.worker.sources import open_model

#: The loader each format runs in the child.
DEFAULT_LOADERS: Mapping[ModelFormat, str] = LOADERS


def _now() -> datetime:
    return datetime.now(UTC)


#: A model of at most this many bytes (all files) is inspected, and its manifest hashed, on
#: the event loop: reading and parsing 64 KiB of already-open regular files costs less than
#: the thread hop (and the thread never protected the loop from a slow parse: the GIL).
INLINE_MAX_BYTES = 64 * 1024

#: What an exception we did not expect becomes, by the stage of the load it escaped from
#: (every path of a load ends in a report; see README "When things break").
STAGE_ERRORS: dict[str, tuple[type[LoadError], str]] = {
    # The source could not be opened for a reason the opener did not name: worth a retry.
    "source": (SourceUnavailable, "source_error"),
    # Fail closed: a signature we could not check is one we do not accept.
    "signature": (SourceRefused, "signature_invalid"),
    # The file made the inspector fail: a verdict on the content, not retried.
    "inspect": (InvalidModel, "inspection_error"),
    "limits": (ChildCrashed, "internal_error"),
    "admit": (ChildCrashed, "internal_error"),
    # The sandbox machinery failed, not the file: worth a retry.
    "child": (ChildCrashed, "sandbox"),
    "classify": (ChildCrashed, "internal_error"),
}


@dataclass(slots=True)
class _Loaded:
    """What the load path learned before and during the child run, and where it is."""

    summary: ModelSummary | None = None
    limits: Limits | None = None
    run: ChildRun | None = None
    signature: SignatureCheck | None = None
    stage: str = "source"
    #: The model's identity once its source is open, and what the failure memory held for it.
    identity: str | None = None
    remembered: FailingModel | None = None
    history: HistoryStats | None = None


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
        self.info = WorkerInfo(
            id=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
            hostname=socket.gethostname(),
            pid=os.getpid(),
            version=_version.VERSION,
        )
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
        await self.forkserver.start()

    def confinement_labels(self) -> dict[str, str]:
        """What confines this worker's loads, as metric labels (loadwarden_confinement_info)."""
        return {
            "cgroups": f"v{self.cgroups.version}" if self.cgroups else "none",
            "landlock": f"abi{self.landlock_abi}" if self.landlock_abi else "none",
            # The child's own seccomp filter, when the sandbox has one; the container
            # runtime's profile (RuntimeDefault) is not ours to report.
            "seccomp": "no_sockets" if _seccomp.available() else "none",
            "address_space_limit": "on" if self.settings.use_address_space_limit else "off",
        }

    async def close(self) -> None:
        if self.history is not None:  # samples recorded but not written yet
            await self.history.close()
        await self.forkserver.close()
        if self.cgroups is not None:
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
    ) -> LoadReport:
        """Run one load to its end and return its report; never raises for a bad file.

        Setting ``cancel`` kills the child at once and ends the load ``cancelled``.
        """
        job_id = job_id or uuid.uuid4().hex
        log = self._log.bind(job_id=job_id, source=request.source, attempt=attempt)
        started_at = _now()
        state = _Loaded()
        error: LoadError | None = None
        phase = self._phase_setter(job_id, request.source)
        phase(JobPhase.INSPECTING)
        try:
            error = await self._load(request, state, log, cancel, phase)
        except LoadError as exc:
            error = exc
        except SandboxError as exc:  # the machinery failed, not the file: worth a retry
            error = ChildCrashed(f"the sandbox failed: {exc.message}", code="sandbox")
        except Exception as exc:  # whatever escaped a stage still ends in a classified report
            cls, code = STAGE_ERRORS[state.stage]
            error = cls(f"the {state.stage} stage failed: {describe(exc)}", code=code)
            log.error("load_stage_failed", stage=state.stage, error=describe(exc))
        finally:
            self.in_flight.pop(job_id, None)
            self.changed.set()
        if self.failures is not None and state.identity is not None:
            await self.failures.settle(
                state.identity, job_id, request.source, error, state.run, state.remembered, log
            )
        report = self._report(
            request.source,
            dict(request.labels),
            job_id,
            attempt,
            enqueued_at,
            started_at,
            state,
            error,
        )
        self._log_finished(log, report)
        return report

    def _phase_setter(self, job_id: str, source: str) -> Callable[[JobPhase], None]:
        def enter(phase: JobPhase) -> None:
            self.in_flight[job_id] = RunningJob(
                job_id=job_id, source=source, phase=phase, since=_now()
            )
            self.changed.set()

        return enter

    async def _load(
        self,
        request: LoadRequest,
        state: _Loaded,
        log: FilteringBoundLogger,
        cancel: asyncio.Event | None,
        phase: Callable[[JobPhase], None],
    ) -> LoadError | None:
        loop = asyncio.get_running_loop()
        budget_s = self.job_budget_s(request)
        deadline = loop.time() + budget_s
        opened = await before_deadline(
            open_model(
                request.source,
                expected_sha256=request.sha256,
                policy=self.settings.sources,
                caps=self.settings.inspection,
            ),
            "opening the source",
            deadline,
            budget_s,
            cancel,
        )
        with opened:
            identity = await self._admit(opened, request, state, log)
            state.stage = "signature"
            await self._check_signature(opened, request, state, deadline, budget_s, cancel)
            state.stage = "inspect"
            state.summary = summary = await before_deadline(
                self._inspect_bounded(opened, request, deadline),
                "inspecting the model",
                deadline,
                budget_s,
                cancel,
            )
            # Once per load, off the event loop (it hashes the whole manifest) unless tiny.
            manifest = (
                _manifest_of(summary)
                if _is_tiny(opened)
                else await in_thread(lambda: _manifest_of(summary))
            )
            state.stage = "limits"
            history = state.history
            state.limits = limits = derive_limits(
                summary.bytes,
                request.limits,
                self.settings.limits,
                history,
                tensor_count=len(summary.tensors),
            )
            _warn_clamped(log, request, limits)
            state.stage = "admit"
            phase(JobPhase.WAITING)
            async with self.admission.reserve(limits.memory_bytes):
                phase(JobPhase.LOADING)
                if cancel is not None and cancel.is_set():
                    raise LoadCancelled("cancelled before the load began", code="cancelled")
                # What is left of the job's deadline, after the source, inspection and admission.
                state.limits = limits = within(limits, deadline - loop.time())
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
                        self.forkserver,
                        self._spec(opened, summary, manifest, limits),
                        [shard.file.fd for shard in opened.files],
                        limits,
                        cgroups=self.cgroups,
                        sample_interval_s=self.settings.sample_interval_s,
                        log=log,
                        cancel=cancel,
                        thresholds=near_thresholds(
                            limits,
                            expected_memory_bytes(summary.bytes, self.settings.limits, history),
                            self.settings.threshold_fraction,
                        ),
                        on_threshold=lambda limit: self.metrics.thresholds.labels(
                            limit=limit
                        ).inc(),
                    )
                    if hashing is not None and isinstance(run.final, Loaded):
                        digests = await before_deadline(
                            hashing, "hashing the files", deadline, budget_s, cancel
                        )
                        note_writes(state.signature, opened)
                finally:
                    if hashing is not None:
                        await cancel_and_wait(hashing)
        state.stage = "classify"
        assert run.ended is not None  # run_child always ends with stop_child
        if run.cancelled:
            return LoadCancelled("cancelled while loading; the child was killed", code="cancelled")
        error = run.protocol_error or classify(
            run.final,
            run.ended,
            limits,
            timed_out=run.timed_out,
            peak_rss_bytes=run.sampled_peak_rss,
            expected_manifest=manifest,
        )
        if isinstance(run.final, Loaded):
            state.summary, mismatch = with_digests(
                summary, opened, run.final.result, digests, request.sha256
            )
            # ...and the bytes loaded are still the ones signed.
            error = error or mismatch or recheck(state.signature, opened, digests)
        if run.cgroup_oom and not run.timed_out and not isinstance(run.final, Loaded):
            error = MemoryExceeded(
                f"the kernel's OOM killer stopped the load at its cgroup's "
                f"{limits.memory_bytes}-byte limit",
                code="cgroup_oom",
            )
        if error is None and history is not None:
            self._check_anomaly(run, history, log)
        if error is None and self.history is not None:
            await self._record_history(self.history, identity, run, log)
        return error

    async def _record_history(
        self, history: History, identity: str, run: ChildRun, log: FilteringBoundLogger
    ) -> None:
        from redis.exceptions import RedisError  # loaded with the history's client

        assert run.ended is not None
        try:
            await history.record(
                identity,
                run.wall_seconds,
                run.ended.cpu_user_s + run.ended.cpu_system_s,
                run.ended.maxrss_bytes,
            )
        except (RedisError, OSError) as exc:  # history is advice: the load stands
            log.warning("history_unavailable", error=describe(exc))

    async def _check_signature(
        self,
        opened: OpenedModel,
        request: LoadRequest,
        state: _Loaded,
        deadline: float,
        budget_s: float,
        cancel: asyncio.Event | None,
    ) -> None:
        """Refuse the load unless a signature every rule accepts covers its files; before any
        child, the inspector's included (``loadwarden.worker.load.signing``)."""
        # In a thread: a roots rule may stat the folders on the files' way (a network share).
        policy = self.settings.signing
        if not may_require(policy, request):
            return
        requirement = await in_thread(lambda: required_signers(policy, request, opened))
        if requirement is None:
            return
        state.signature = signed = SignatureCheck()
        try:
            trust = await self._trusted()
        except TrustError as exc:
            raise SourceRefused(str(exc), code="signing_unavailable") from None
        await before_deadline(
            check_signature(opened, requirement, trust, signed),
            "verifying the signature",
            deadline,
            budget_s,
            cancel,
        )

    async def _trusted(self) -> Trust | None:
        """The trusted signers, loaded on first use (keys read, model-signing imported: ~1 s,
        in a thread); None when the settings name none."""
        if self.trust is None and self.settings.signing.signers:
            policy = self.settings.signing
            self.trust = await in_thread(lambda: Trust(policy))
        return self.trust

    async def _admit(
        self, opened: OpenedModel, request: LoadRequest, state: _Loaded, log: FilteringBoundLogger
    ) -> str:
        """The model's identity; a model the failure memory holds as repeatedly failing is
        refused here, before its signature is checked, its header inspected or any child."""
        state.identity = identity = model_identity(opened, request.sha256)
        # The history is read here too, in the same round trip, for the limits.
        state.remembered, state.history = await look_up(identity, self.failures, self.history, log)
        return identity

    def _check_anomaly(
        self, run: ChildRun, history: HistoryStats, log: FilteringBoundLogger
    ) -> None:
        """Log (and count) a load far beyond its own history, even when it succeeded."""
        s = self.settings
        assert run.ended is not None
        figures = {
            "wall": (run.wall_seconds, history.wall_p95_s, s.anomaly_min_wall_s),
            "peak_rss": (
                float(run.ended.maxrss_bytes),
                float(history.peak_rss_p95_bytes),
                float(s.anomaly_min_rss_bytes),
            ),
        }
        factor = s.anomaly_factor
        for kind, (value, p95, margin) in figures.items():
            if p95 > 0 and value > factor * p95 and value - p95 > margin:
                log.warning("load_anomaly", kind=kind, value=value, history_p95=p95, factor=factor)
                self.metrics.anomalies.labels(kind=kind).inc()

    def job_budget_s(self, request: LoadRequest) -> float:
        """The whole job's deadline (source, inspection, load): the request's, capped."""
        ceiling = self.settings.limits.timeout_ceiling_s
        asked = request.limits.timeout_seconds
        return ceiling if asked is None else min(asked, ceiling)

    async def _inspect_bounded(
        self, opened: OpenedModel, request: LoadRequest, deadline: float
    ) -> ModelSummary:
        """Inspect in-process (a thread; on the loop for a tiny model) when every header is
        small, else each file whose header may be large in its own confined child, one after
        the other, and the rest here."""
        caps = self.settings.inspection
        if _is_tiny(opened) and caps.isolate_above_bytes >= INLINE_MAX_BYTES:
            return self._inspect(opened, request)
        large = await in_thread(
            lambda: [needs_isolation(s.file, caps.isolate_above_bytes) for s in opened.files]
        )
        if not any(large):
            return await in_thread(lambda: self._inspect(opened, request))
        budget_bytes = self.tensor_budget_bytes()
        found: list[ModelSummary | None] = []
        for shard, isolate in zip(opened.files, large, strict=True):
            if not isolate:
                found.append(None)
                continue
            remaining_s = deadline - asyncio.get_running_loop().time()
            found.append(
                await inspect_in_child(
                    shard.file,
                    declared=shard_format(opened, request.format),
                    caps=caps,
                    budget_bytes=budget_bytes,
                    memory_bytes=caps.child_memory_bytes,
                    cpu_seconds=max(1, min(caps.child_cpu_seconds, math.ceil(remaining_s))),
                    max_answer_bytes=caps.max_summary_bytes,
                )
            )
        return await in_thread(
            lambda: inspect_opened(
                opened,
                declared=request.format,
                caps=caps,
                budget_bytes=budget_bytes,
                inspected=found,
            )
        )

    def _inspect(self, opened: OpenedModel, request: LoadRequest) -> ModelSummary:
        """Sniff each file's format by magic bytes and inspect it strictly (no loader, no
        child); a checkpoint's shards are checked against its index and summed."""
        return inspect_opened(
            opened,
            declared=request.format,
            caps=self.settings.inspection,
            budget_bytes=self.tensor_budget_bytes(),
        )

    def tensor_budget_bytes(self) -> int:
        """The most tensor bytes a load could hold here: derive_limits' memory formula, inverted,
        at the lower of the memory ceiling and this worker's whole budget."""
        p = self.settings.limits
        room = min(p.memory_ceiling_bytes, self.admission.budget_bytes)
        room -= p.baseline_memory_bytes + p.memory_slack_bytes
        return max(0, int(room / (p.loader_memory_factor + p.memory_slack_fraction)))

    def _spec(
        self,
        opened: OpenedModel,
        summary: ModelSummary,
        manifest: str,
        limits: Limits,
    ) -> ChildSpec:
        return ChildSpec(
            loader=self.loaders[summary.format],
            memory_bytes=limits.memory_bytes,
            cpu_seconds=limits.cpu_seconds,
            max_fds=self.settings.child_max_fds,
            address_space_limit=self.settings.use_address_space_limit,
            landlock=self.landlock_abi > 0,
            manifest_digest=manifest,
            **child_files(opened),
        )

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
        report = self._report(source, {}, job_id, attempt, enqueued_at, _now(), _Loaded(), error)
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
        state: _Loaded,
        error: LoadError | None,
    ) -> LoadReport:
        finished_at = _now()
        outcome = error.outcome if error else Outcome.OK
        summary, run = state.summary, state.run
        return LoadReport(
            job_id=job_id,
            source=source,
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
                    number=attempt,
                    outcome=outcome,
                    error_code=error.code if error else None,
                    worker=self.info.id,
                    started_at=started_at,
                    finished_at=finished_at,
                )
            ],
            model=summary.capped(self.settings.report_max_tensors) if summary else None,
            signature=state.signature.info if state.signature else None,
            limits=state.limits,
            resources=resources_of(run),
            confinement=run.confinement if run else [],
            worker=self.info,
            labels=labels,
            enqueued_at=enqueued_at,
            started_at=started_at,
            finished_at=finished_at,
        )

    def _log_finished(self, log: FilteringBoundLogger, report: LoadReport) -> None:
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


def _warn_clamped(log: FilteringBoundLogger, request: LoadRequest, limits: Limits) -> None:
    """A request that asked for more than the worker allows is told so, not silently trimmed."""
    asked = request.limits
    for name, wanted, got in (
        ("memory_bytes", asked.memory_bytes, limits.memory_bytes),
        ("cpu_seconds", asked.cpu_seconds, limits.cpu_seconds),
        ("timeout_seconds", asked.timeout_seconds, limits.timeout_seconds),
    ):
        if getattr(limits.derivation, name) is Derivation.OVERRIDE_CLAMPED:
            log.warning("limit_override_clamped", limit=name, requested=wanted, ceiling=got)


def _is_tiny(opened: OpenedModel) -> bool:
    """Whether every file together is small enough to inspect on the event loop."""
    return sum(shard.file.size for shard in opened.files) <= INLINE_MAX_BYTES


def _manifest_of(summary: ModelSummary) -> str:
    return manifest_digest([(t.name, t.dtype, t.shape, t.bytes) for t in summary.tensors])
