"""One child run: spawn, place in a cgroup, hand over the job, converse under a deadline, stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from structlog.typing import FilteringBoundLogger

from loadwarden.producer.contract import Limits, Resources, Sample
from loadwarden.producer.errors import ChildCrashed, LoadError
from loadwarden.worker._tasks import cancel_and_wait
from loadwarden.worker.load._outcome import Loaded, Raised, Ready, parse_message
from loadwarden.worker.load.monitor import Monitor
from loadwarden.worker.sandbox.cgroups import Cgroup, CgroupManager
from loadwarden.worker.sandbox.children import Child, ChildExit, SandboxError, stop_child
from loadwarden.worker.sandbox.forkserver import ForkServer
from loadwarden.worker.sandbox.spec import ChildSpec

#: After its final message a child exits at once; wait this long before killing it.
EXIT_GRACE_S = 1.0
#: Processes a load may have at once (itself and a little room for what a loader forks).
CHILD_PIDS_MAX = 16


@dataclass(slots=True)
class ChildRun:
    """What one child run produced."""

    ready: Ready | None = None
    final: Loaded | Raised | None = None
    ended: ChildExit | None = None
    wall_seconds: float = 0.0
    timed_out: bool = False
    cancelled: bool = False
    protocol_error: LoadError | None = None
    samples: int = 0
    sampled_peak_rss: int = 0
    sampled_read: int = 0
    cgroup_oom: bool = False
    cgroup_peak_bytes: int | None = None
    series: list[Sample] = field(default_factory=list)
    confinement: list[str] = field(default_factory=list)


async def _converse(
    child: Child,
    run: ChildRun,
    monitor: Monitor,
    limits: Limits,
    log: FilteringBoundLogger,
    sampling: list[asyncio.Task[None]],
) -> None:
    """Read the child's messages: ready (start sampling), then its one answer."""
    while (raw := await child.receive()) is not None:
        message = parse_message(raw)
        if isinstance(message, Ready) and run.ready is None:
            run.ready = message
            run.confinement += message.confinement
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
            raise ChildCrashed("the child sent messages out of order", code="protocol_violation")


async def _within(work: Coroutine[Any, Any, None], seconds: float) -> None:
    """``work`` under a deadline (TimeoutError past it). asyncio.timeout, not wait_for:
    Python 3.11's wait_for can drop a cancel that arrives as the work ends."""
    async with asyncio.timeout(seconds):
        await work


async def _until_cancelled(
    work: Coroutine[Any, Any, None], cancel: asyncio.Event | None, run: ChildRun
) -> None:
    """Await ``work``; if ``cancel`` is set first, abandon it and mark the run cancelled."""
    if cancel is None:
        await work
        return
    task = asyncio.ensure_future(work)
    cancelled = asyncio.ensure_future(cancel.wait())
    try:
        await asyncio.wait({task, cancelled}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(cancelled)
        if not task.done():
            await cancel_and_wait(task)
            run.cancelled = True
    if not run.cancelled:
        task.result()


def place_ahead(cgroups: CgroupManager, child: Child) -> None:
    """``ForkServer.on_ready``: a child forked ahead waits in a cgroup of its own, without a
    memory limit until a load takes it (``_place``): one cgroup.procs write less per load."""
    cgroup = cgroups.prepare(f"child-{child.pid}", CHILD_PIDS_MAX)
    try:
        cgroup.add(child.pid)
    except OSError:
        cgroup.remove()
        raise
    child.cgroup = cgroup


def _place(
    cgroups: CgroupManager | None, child: Child, limits: Limits, run: ChildRun
) -> Cgroup | None:
    """Put the child in a cgroup of its own, its limits written, before it learns its job."""
    if cgroups is None:
        return None
    if child.cgroup is not None:  # placed while it waited: only the load's limit is left
        try:
            cgroups.limit(child.cgroup, limits.memory_bytes)
        except OSError as exc:
            raise ChildCrashed(
                f"could not limit the load's cgroup: {exc}", code="cgroup_failed"
            ) from exc
        run.confinement.append(cgroups.mechanism)
        return child.cgroup
    try:
        cgroup = cgroups.create(f"child-{child.pid}", limits.memory_bytes, CHILD_PIDS_MAX)
    except OSError as exc:  # the machinery failed, not the file: a classified, retried crash
        raise ChildCrashed(
            f"could not create the load's cgroup: {exc}", code="cgroup_failed"
        ) from exc
    try:
        cgroup.add(child.pid)
    except OSError as exc:
        cgroup.remove()
        raise ChildCrashed(
            f"could not place the child in its cgroup: {exc}", code="cgroup_failed"
        ) from exc
    run.confinement.append(cgroups.mechanism)
    return cgroup


async def run_child(
    forkserver: ForkServer,
    spec: ChildSpec,
    fds: int | Sequence[int],
    limits: Limits,
    *,
    cgroups: CgroupManager | None,
    sample_interval_s: float,
    log: FilteringBoundLogger,
    cancel: asyncio.Event | None = None,
    thresholds: Mapping[str, float] | None = None,
    on_threshold: Callable[[str], object] | None = None,
) -> ChildRun:
    """Run one load in a fresh child and always stop it; never leaves a process behind."""
    loop = asyncio.get_running_loop()
    run = ChildRun()
    try:
        child = await forkserver.spawn()
    except SandboxError as exc:
        raise ChildCrashed(f"could not start a child: {exc.message}", code="sandbox") from None
    started = loop.time()
    monitor = Monitor(
        child.pid,
        sample_interval_s,
        log,
        limits=limits,
        thresholds=thresholds,
        on_threshold=on_threshold,
    )
    sampling: list[asyncio.Task[None]] = []
    cgroup: Cgroup | None = child.cgroup  # placed while it waited: removed below in any case
    try:
        cgroup = _place(cgroups, child, limits, run) or cgroup
        await child.send_spec(spec, fds)
        try:
            await _until_cancelled(
                _within(
                    _converse(child, run, monitor, limits, log, sampling),
                    limits.timeout_seconds,
                ),
                cancel,
                run,
            )
        except TimeoutError:
            run.timed_out = True
        except LoadError as exc:
            run.protocol_error = exc
        except (SandboxError, OSError) as exc:
            run.protocol_error = ChildCrashed(
                f"lost contact with the child: {exc}", code="protocol_violation"
            )
        if run.final is not None and not child.exited.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EXIT_GRACE_S):
                    await asyncio.shield(child.exited)
    finally:
        if not child.exited.done():  # a last look, if it is still there
            monitor.sample()
        try:
            run.ended = await stop_child(child)
        finally:
            for task in sampling:
                await cancel_and_wait(task)
        if cgroup is not None:
            run.cgroup_oom, run.cgroup_peak_bytes = cgroup.oom_killed(), cgroup.peak_bytes()
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
