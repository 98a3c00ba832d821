"""The worker's settings: the producer's, and every knob of the worker's own (``LOADWARDEN_*``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from loadwarden.producer.contract import Outcome
from loadwarden.producer.settings import Settings as ProducerSettings
from loadwarden.worker.config.policies import (
    REPORT_MAX_TENSORS,
    AutoscalePolicy,
    FailureMemoryPolicy,
    InspectionCaps,
    LimitPolicy,
    MiB,
)
from loadwarden.worker.config.trust import SigningPolicy, SourcePolicy

#: Jobs a worker holds at once per usable CPU, by default (see ``Settings.concurrency``).
CONCURRENCY_PER_CPU = 4


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity, capped by a CPU quota (cgroup v2 or v1)."""
    cpus = len(os.sched_getaffinity(0))
    for quota_file, period_file in (
        ("cpu.max", None),
        ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us"),
    ):
        try:
            text = (cgroup_root / quota_file).read_text().split()
            if period_file is not None:
                text.append((cgroup_root / period_file).read_text().strip())
            quota, period = int(text[0]), int(text[1])
        except (OSError, ValueError, IndexError):  # "max", absent, or no quota (-1)
            continue
        if quota > 0 and period > 0:
            cpus = min(cpus, max(1, -(-quota // period)))
    return cpus


def default_concurrency() -> int:
    """The default of ``Settings.concurrency``: CONCURRENCY_PER_CPU per usable CPU."""
    return max(1, min(256, CONCURRENCY_PER_CPU * usable_cpus()))


class Settings(ProducerSettings):
    """Every knob: ``LOADWARDEN_<NAME>`` (nested ones: ``LOADWARDEN_LIMITS__STARTUP_S``).

    The producer's settings (Redis, the queue, ``keep_result_s``) and the worker's own, read
    from the environment in one place, as one validated object.
    """

    # Jobs one worker holds at once. Memory admission, not this, bounds what loads run
    # together (a load starts only when its limit fits the budget, FIFO), so this only
    # needs to keep the CPUs busy: a tiny load spends most of its wall time waiting (Redis
    # round trips, its child starting and exiting), not computing. 4 per usable CPU
    # (affinity and the container's CPU quota): 8 on 2 cores, where a fixed 2 capped tiny
    # loads at 75 jobs/s and 10 gave 196 (issue 13). Not more: jobs a worker holds while
    # they wait for memory are jobs another worker cannot take (and that the autoscaler
    # counts as running, not queued).
    concurrency: Annotated[int, Field(ge=1, le=256)] = Field(default_factory=default_concurrency)
    # The longest an idle worker waits before it looks at the queue anyway. An enqueue wakes
    # an idle worker at once (a token on the queue's wake list, BLPOP), a job ending wakes
    # a full one, and a deferred job's due time bounds the wait: this only picks up jobs
    # enqueued without a token (arq's own enqueue_job, a producer in another language that
    # does not push one). 0.25 s keeps their pick-up under arq's 0.5 s default while an idle
    # worker costs ~4 looks a second (it was 50 at the old 0.02 s poll).
    poll_delay_s: Annotated[float, Field(gt=0)] = 0.25
    # How long SIGTERM lets running loads finish before they are killed and requeued.
    # None: the longest deadline a load may get here (limits.timeout_ceiling_s), so a drain
    # (scale-down, rollout, node drain) never kills a load that could still finish in time;
    # see ``drain_grace_s``. Set it lower only where a slow drain costs more than a rerun.
    shutdown_grace_s: Annotated[int, Field(ge=0)] | None = None
    # 10 Hz psutil sampling costs ~0.5% of a core per load (measured).
    sample_interval_s: Annotated[float, Field(gt=0)] = 0.1
    # A loader needs the model, a few libraries and its pipe; 64 leaves room.
    child_max_fds: Annotated[int, Field(ge=16)] = 64
    # The memory all running loads may hold together; None: the container's memory minus
    # ``memory_reserve_bytes``.
    memory_budget_bytes: Annotated[int, Field(gt=0)] | None = None
    # The container's memory limit as the platform states it (Kubernetes' downward API,
    # ``resourceFieldRef: limits.memory``); None: read from the cgroup filesystem, else the
    # machine's RAM. Stated beats detected: no layout of /sys/fs/cgroup can mislead it.
    container_memory_bytes: Annotated[int, Field(gt=0)] | None = None
    # Left for the supervisor, Redis clients and the page cache: 512 MiB covers a
    # worker's own ~100 MiB several times over.
    memory_reserve_bytes: Annotated[int, Field(ge=0)] = 512 * MiB
    # Serve /metrics, /livez and /readyz here (None: no HTTP server).
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    metrics_host: str = "0.0.0.0"
    # /livez fails once the fork server has been down this long (every start since its loss
    # failed, or died again within the backoff's 30 s): such a worker claims no job, or
    # barely any, and only a fresh process helps, so the liveness probe restarts it. 300 s
    # outlasts the restart backoff's longest waits (60 s) several times over, so a fork
    # server that comes back after a few tries and stays up never costs a restart;
    # None (LOADWARDEN_FORKSERVER_DOWN_MAX_S=null): /livez ignores the fork server.
    forkserver_down_max_s: Annotated[float, Field(gt=0)] | None = 300.0
    # Log (and count) a load near a limit: early warning before the limit stops it. For
    # memory, "near" is this fraction of the headroom above what a healthy load of the
    # model holds (worker/load/limits.py: near_thresholds); for CPU and deadline, of the limit.
    threshold_fraction: Annotated[float, Field(gt=0, le=1)] = 0.8
    # A load this many times beyond its history's p95 (wall or peak) is an anomaly...
    anomaly_factor: Annotated[float, Field(gt=1)] = 3.0
    # ...and also this far beyond it in absolute terms: tiny loads vary by several times
    # in milliseconds (measured in bench/soak.py), which is noise, not an anomaly.
    anomaly_min_wall_s: Annotated[float, Field(ge=0)] = 1.0
    anomaly_min_rss_bytes: Annotated[int, Field(ge=0)] = 64 * MiB
    # The crash lease: a job whose worker stops renewing it runs again this soon
    # (arq alone waits for its longest timeout + 10 s, an hour here).
    lease_s: Annotated[float, Field(gt=0)] = 30.0
    # Renewed three times per lease: two missed renewals are survivable.
    lease_renew_s: Annotated[float, Field(gt=0)] = 10.0
    # Outcomes this worker retries when a request does not say; None: timeout,
    # crashed and unavailable.
    retry_on: tuple[Outcome, ...] | None = None
    # Final failures kept in the dead-letter stream (approximately; XADD MAXLEN ~).
    dead_letter_maxlen: Annotated[int, Field(ge=1)] = 10_000
    # Put each load in a cgroup of its own when this worker may create them; False
    # relies on rlimits alone.
    use_cgroups: bool = True
    # Fail closed: refuse to start when per-load cgroups cannot be created. Off by default
    # because an unprivileged container usually cannot create them (deploy/README.md).
    require_cgroups: bool = False
    # Where the cgroup filesystem is mounted: the standard place on every distribution and
    # container runtime.
    cgroup_root: Path = Path("/sys/fs/cgroup")
    # Restrict each child with Landlock (read the model and the interpreter only; no
    # writes, no exec, no TCP) where the kernel supports it.
    use_landlock: bool = True
    # Fail closed: refuse to start when the kernel (or a seccomp profile) denies Landlock.
    # Off by default: kernels before 5.13 have none, and rlimits still bound every load.
    require_landlock: bool = False
    # RLIMIT_AS bounds the child's address space. Some native libraries reserve far more
    # address space than they touch; where cgroups confine memory, this may be turned off.
    use_address_space_limit: bool = True
    report_max_tensors: Annotated[int, Field(ge=0)] = REPORT_MAX_TENSORS
    # LOADWARDEN_ALLOW_ROOTS=/a:/b, folders separated by ':' as in PATH; when set it wins
    # over sources.allow_roots (LOADWARDEN_SOURCES__ALLOW_ROOTS, a JSON list), for the
    # worker, the in-process Supervisor and every command alike.
    allow_roots: str | None = None
    autoscale: AutoscalePolicy = AutoscalePolicy()
    failure_memory: FailureMemoryPolicy = FailureMemoryPolicy()
    inspection: InspectionCaps = InspectionCaps()
    limits: LimitPolicy = LimitPolicy()
    # A factory, not a shared instance: the cache dir follows $XDG_CACHE_HOME at construction.
    sources: SourcePolicy = Field(default_factory=SourcePolicy)
    # Nothing signed is required until an operator names trusted signers and rules.
    signing: SigningPolicy = SigningPolicy()

    @property
    def drain_grace_s(self) -> float:
        """How long SIGTERM waits for running loads: the setting, else the deadline ceiling."""
        if self.shutdown_grace_s is not None:
            return float(self.shutdown_grace_s)
        return self.limits.timeout_ceiling_s

    @field_validator("forkserver_down_max_s", mode="before")
    @classmethod
    def _null_from_the_environment(cls, value: object) -> object:
        # pydantic-settings passes a scalar variable as its text: "null" is how README says
        # to turn the check off, and no float parses it.
        return None if isinstance(value, str) and value.strip().lower() == "null" else value

    @model_validator(mode="after")
    def _poll_within_socket_timeout(self) -> Settings:
        # An idle worker blocks in BLPOP for up to poll_delay_s: longer would read as a dead
        # connection.
        if self.poll_delay_s >= self.redis.socket_timeout_s:
            raise ValueError("poll_delay_s must be below redis.socket_timeout_s")
        return self

    @model_validator(mode="after")
    def _requirements_need_the_mechanism(self) -> Settings:
        for name in ("cgroups", "landlock"):
            if getattr(self, f"require_{name}") and not getattr(self, f"use_{name}"):
                raise ValueError(f"require_{name} needs use_{name}: it would refuse every start")
        return self

    @model_validator(mode="after")
    def _roots_from_path_list(self) -> Settings:
        if self.allow_roots:
            roots = tuple(Path(p) for p in self.allow_roots.split(os.pathsep) if p)
            policy = SourcePolicy.model_validate(
                {**self.sources.model_dump(), "allow_roots": roots}
            )
            object.__setattr__(self, "sources", policy)  # frozen: set once, while validating
        return self
