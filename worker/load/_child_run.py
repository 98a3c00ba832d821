"""One child run: spawn, place in a cgroup, hand over the job, converse under a deadline, stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from structlog.typing import FilteringBoundLogger

from loadwarden.producer.contract import Limits, Sample
from loadwarden.producer.errors import LoadError
from loadwarden.worker._tasks import cancel_and_wait, in_thread
from loadwarden.worker.load._deadline import JobDeadline, Stopped, until
from loadwarden.worker.load._outcome import (
    Early,
    Loaded,
    ProtocolViolation,
    Raised,
    Ready,
    RunEnd,
    Stop,
    failure,
    parse_message,
)
from loadwarden.worker.load.monitor import Monitor
from loadwarden.worker.sandbox.cgroups import CgroupManager
from loadwarden.worker.sandbox.children import Child, ChildExit, SandboxError, stop_child
from loadwarden.worker.sandbox.forkserver import ForkServer
from loadwarden.worker.sandbox.spec import ChildSpec

#: After its final message a child exits at once; wait this long before killing it.
EXIT_GRACE_S = 1.0
#: Processes a load may have at once (itself and a little room for what a loader forks).
CHILD_PIDS_MAX = 16


@dataclass(frozen=True, slots=True)
class ChildHost:
    """Where children run: the fork server that starts them, the cgroups that hold them, and
    how often they are sampled."""

    forkserver: ForkServer
    cgroups: CgroupManager | None
    sample_interval_s: float

    async def sandbox_back(self, deadline: JobDeadline, log: FilteringBoundLogger) -> None:
        """Wait for a lost fork server's restart (``ForkServer.running``), if one is under
        way, within the job's deadline: a load meanwhile would fail at once, its attempt
        burnt while the sandbox merely restarts. A start that failed fails the load."""
        forkserver = self.forkserver
        if forkserver.alive or not forkserver.restarting:
            return
        log.info("forkserver_awaited", deadline_in_s=round(deadline.remaining_s(), 3))
        await deadline.before(forkserver.running(), "waiting for the fork server to start again")


@dataclass(frozen=True, slots=True)
class ChildJob:
    """What one child does: its spec and files, its limits, and the levels worth a warning."""

    spec: ChildSpec
    fds: int | Sequence[int]
    limits: Limits
    #: Near-limit levels by limit name (``limits.near_thresholds``), counted when crossed.
    thresholds: Mapping[str, float] | None = None
    on_threshold: Callable[[str], object] | None = None


@dataclass(slots=True)
class ChildRun:
    """What one child run produced."""

    ready: Ready | None = None
    final: Loaded | Raised | None = None
    ended: ChildExit | None = None
    wall_seconds: float = 0.0
    stopped: Stop | None = None
    protocol_error: str | None = None
    samples: int = 0
    sampled_peak_rss: int = 0
    sampled_read: int = 0
    cgroup_oom: bool = False
    cgroup_peak_bytes: int | None = None
    series: list[Sample] = field(default_factory=list)
    confinement: list[str] = field(default_factory=list)

    @property
    def timed_out(self) -> bool:
        return self.stopped is Stop.DEADLINE

    @property
    def cancelled(self) -> bool:
        return self.stopped is Stop.CANCEL

    def end(self, limits: Limits, expected_manifest: str, checked: LoadError | None) -> RunEnd:
        """How this run ended, for ``decide``, with what the supervisor's checks found."""
        assert self.ended is not None  # run_child always ends with stop_child
        return RunEnd(
            limits=limits,
            exit=self.ended,
            expected_manifest=expected_manifest,
            final=self.final,
            stopped=self.stopped,
            protocol_error=self.protocol_error,
            cgroup_oom=self.cgroup_oom,
            peak_rss_bytes=self.sampled_peak_rss,
            checked=checked,
        )


async def _converse(
    child: Child,
    run: ChildRun,
    monitor: Monitor,
    limits: Limits,
    log: FilteringBoundLogger,
    sampling: list[asyncio.Task[None]],
    landlock: bool,
) -> None:
    """Read the child's messages: ready (start sampling), then its one answer.

    A child asked for Landlock (the supervisor found it in this kernel) that reports
    itself ready without it is not believed to be confined: the run ends as a violation.
    """
    while (raw := await child.receive()) is not None:
        message = parse_message(raw)
        if isinstance(message, Ready) and run.ready is None:
            run.confinement += message.confinement
            if landlock and not any(c.startswith("landlock_abi") for c in message.confinement):
                raise ProtocolViolation("the child was asked for Landlock and reported none")
            run.ready = message
            sampling.append(asyncio.create_task(monitor.run()))
            log.info(
                "load_started",
                child_pid=child.pid,
                limits=limits.model_dump(mode="json"),
                confinement=run.confinement,
            )
        elif isinstance(message, Raised) or (isinstance(message, Loaded) and run.ready is not None):
            # A child may raise before it is ready (the file changed since inspection).
            run.final = message
            return
        else:
            raise ProtocolViolation("the child sent messages out of order")


async def place_ahead(cgroups: CgroupManager, child: Child) -> None:
    """``ForkServer.on_ready``: a child forked ahead waits in a cgroup of its own, without a
    memory limit until a load takes it (``_place``): one cgroup.procs write less per load.

    In a thread of ``cgroups.threads`` (``in_thread``: a cancel waits for it, so
    ``child.cgroup`` is set if the cgroup exists): the mkdir and the cgroup.procs write
    wait on the kernel's cgroup locks, a migration through an RCU grace period (10-60 ms
    seen here, every few loads), which on the event loop stalled the load running
    meanwhile (issue 13's p99).
    """
    await in_thread(lambda: _cgroup_for(cgroups, child, None), cgroups.threads)


def _cgroup_for(cgroups: CgroupManager, child: Child, memory_bytes: int | None) -> None:
    """A new cgroup holding ``child`` (set as ``child.cgroup``), its memory limit written
    unless None; blocking (see ``place_ahead``)."""
    name = f"child-{child.pid}"
    cgroup = (
        cgroups.prepare(name, CHILD_PIDS_MAX)
        if memory_bytes is None
        else cgroups.create(name, memory_bytes, CHILD_PIDS_MAX)
    )
    try:
        cgroup.add(child.pid)
    except OSError:
        cgroup.remove()
        raise
    child.cgroup = cgroup


async def _place(
    cgroups: CgroupManager | None, child: Child, limits: Limits, run: ChildRun
) -> None:
    """Put the child in a cgroup of its own, its limits written, before it learns its job
    (a new one in a thread, as ``place_ahead`` does)."""
    if cgroups is None:
        return
    if child.cgroup is not None:  # placed while it waited: only the load's limit is left
        try:
            cgroups.limit(child.cgroup, limits.memory_bytes)
        except OSError as exc:
            raise failure(Early.CGROUP_FAILED, f"could not limit the load's cgroup: {exc}") from exc
        run.confinement.append(cgroups.mechanism)
        return
    try:
        await in_thread(lambda: _cgroup_for(cgroups, child, limits.memory_bytes), cgroups.threads)
    except OSError as exc:  # the machinery failed, not the file: a classified, retried crash
        raise failure(
            Early.CGROUP_FAILED, f"could not place the child in a cgroup of its own: {exc}"
        ) from exc
    run.confinement.append(cgroups.mechanism)


async def run_child(
    host: ChildHost,
    job: ChildJob,
    *,
    log: FilteringBoundLogger,
    cancel: asyncio.Event | None = None,
) -> ChildRun:
    """Run one load in a fresh child and always stop it; never leaves a process behind."""
    loop = asyncio.get_running_loop()
    run = ChildRun()
    limits = job.limits
    try:
        child = await host.forkserver.spawn(lent=True)
    except SandboxError as exc:
        raise failure(Early.SANDBOX, f"could not start a child: {exc.message}") from None
    started = loop.time()
    monitor = Monitor(
        child.pid,
        host.sample_interval_s,
        log,
        limits=limits,
        thresholds=job.thresholds,
        on_threshold=job.on_threshold,
    )
    sampling: list[asyncio.Task[None]] = []
    try:
        await _place(host.cgroups, child, limits, run)
        await child.send_spec(job.spec, job.fds)
        try:
            await until(
                _converse(child, run, monitor, limits, log, sampling, job.spec.landlock),
                loop.time() + limits.timeout_seconds,
                cancel,
            )
        except Stopped as exc:
            run.stopped = exc.why
        except ProtocolViolation as exc:
            run.protocol_error = str(exc)
        except (SandboxError, OSError) as exc:
            run.protocol_error = f"lost contact with the child: {exc}"
        if run.final is not None and not child.exited.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EXIT_GRACE_S):
                    await asyncio.shield(child.exited)
    finally:
        if not child.exited.done():  # a last look, if it is still there
            monitor.sample()
        try:
            run.ended = await stop_child(child)
        finally:  # also when stop_child raised (the fork server was lost): no cgroup left
            host.forkserver.returned()  # the next child is forked now, off this load's path
            for task in sampling:
                await cancel_and_wait(task)
            if (cgroup := child.cgroup) is not None:
                run.cgroup_oom, run.cgroup_peak_bytes = cgroup.oom_killed(), cgroup.peak_bytes()
                if host.cgroups is not None:  # removed off the job's path (``remove_soon``)
                    host.cgroups.remove_soon(cgroup, unreaped=run.ended is None)
                else:
                    cgroup.remove()
    run.wall_seconds = loop.time() - started
    run.samples = monitor.usage.samples
    run.sampled_peak_rss = monitor.usage.peak_rss_bytes
    run.sampled_read = monitor.usage.read_chars
    run.series = monitor.usage.series
    if run.timed_out:
        log.warning(
            "child_killed",
            child_pid=child.pid,
            reason="deadline",
            timeout_seconds=limits.timeout_seconds,
        )
    return run
