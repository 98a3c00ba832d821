"""Settings: one validated object, built from the environment (``LOADWARDEN_*``) in one place."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from loadwarden.producer._xdg import xdg_dir
from loadwarden.producer.contract import Outcome, SignedBy, SignerName

MiB = 1024 * 1024
GiB = 1024 * MiB


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


class InspectionCaps(BaseModel):
    """Caps applied while reading a model header, before any loader sees the file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # safetensors itself accepts 100 MB headers (1.4 GB and 10 s to parse); real
    # models with 100k tensors need about 10 MB. Also bounds a GGUF header (keys and
    # tensor infos: ~6 MB with a 262k-token vocabulary) and a zip central directory.
    max_header_bytes: Annotated[int, Field(gt=0)] = 16 * MiB
    # The largest public checkpoints have a few tens of thousands of tensors.
    max_tensors: Annotated[int, Field(gt=0)] = 200_000
    # No framework tensor in practice goes beyond rank 8; 16 leaves room.
    max_rank: Annotated[int, Field(gt=0)] = 16
    # 1 TiB: beyond any single file we expect; a budget check comes on top (issue #4).
    max_total_bytes: Annotated[int, Field(gt=0)] = 1024 * GiB
    # __metadata__ is free-form strings; bound how much of it we carry into reports.
    max_metadata_entries: Annotated[int, Field(ge=0)] = 1024
    # numpy's own limit (np.lib.format's max_header_size); real .npy headers are under
    # 200 bytes. Checked before the header is read: numpy itself reads up to 4 GiB first.
    max_npy_header_bytes: Annotated[int, Field(gt=0, le=1024 * 1024)] = 10_000
    # Trained weights deflate by less than 1.5x; an .npz member that inflates over 100x is
    # almost all one repeated byte, which is what a zip bomb is. Members under 1 MiB are
    # exempt, so small zero-initialised tensors (biases, LoRA B matrices) still load.
    max_compression_ratio: Annotated[float, Field(gt=1)] = 100.0
    # The same ratio cap for a whole archive (all members inflated against the file's
    # size), so that many exempt members cannot add up to a bomb (2000 x 1 MiB of zeros:
    # a 2.4 MB file, 2.1 GB resident). Archives inflating to at most this much are
    # exempt: 64 MiB costs no more than a 64 MiB safetensors file would, and covers
    # every zero-initialised small model we know of.
    archive_ratio_exempt_bytes: Annotated[int, Field(ge=0)] = 64 * MiB
    # Headers that may be larger than this are inspected in a confined child, not the
    # supervisor: parsing costs up to ~30x the header in memory (478 MB for 16 MiB of
    # nested empty arrays), so 1 MiB bounds the in-process cost near 30 MiB, and every
    # real .npy and small safetensors header (a few KiB) stays in-process and fast.
    isolate_above_bytes: Annotated[int, Field(ge=0)] = 1 * MiB
    # The inspection child's memory: the worst 16 MiB header costs 478 MB to parse.
    child_memory_bytes: Annotated[int, Field(gt=0)] = 1 * GiB
    # Its CPU time: strict inspection of a real 16 MiB header takes about a second.
    child_cpu_seconds: Annotated[int, Field(gt=0)] = 30
    # The largest summary the supervisor accepts from it: 200,000 tensors with
    # 100-character names and rank-4 shapes is about 30 MB of JSON.
    max_summary_bytes: Annotated[int, Field(gt=0)] = 48 * MiB
    # llama.cpp's GGUF files carry 20-60 keys; 4096 leaves room for custom metadata.
    max_gguf_keys: Annotated[int, Field(gt=0)] = 4096
    # The longest GGUF strings are chat templates and licences: tens of KiB.
    max_gguf_string_bytes: Annotated[int, Field(gt=0)] = 1 * MiB
    # The largest GGUF arrays are tokenizer vocabularies (262k tokens) and merges (~500k).
    max_gguf_array_elements: Annotated[int, Field(gt=0)] = 4 * 1024 * 1024
    # llama.cpp refuses arrays of arrays and gguf-py can write them: 2 allows one level.
    # At most 32, so the parser's recursion stays far from Python's limit.
    max_gguf_nesting: Annotated[int, Field(gt=0, le=32)] = 2
    # A checkpoint index lists one line per tensor: DeepSeek-V3's (91k tensors, 163
    # shards) is about 9 MiB, Llama-3.1-405B's 0.1 MiB. 16 MiB, like a header.
    max_index_bytes: Annotated[int, Field(gt=0)] = 16 * MiB
    # The largest public checkpoints ship 191 (Llama-3.1-405B) or 163 (DeepSeek-V3) shards;
    # every shard is one descriptor held open by the supervisor and handed to the child.
    max_shards: Annotated[int, Field(gt=0, le=4096)] = 1024


class LimitPolicy(BaseModel):
    """How limits are derived from a model's declared size, and their floors and ceilings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Measured: a forkserver child with numpy + safetensors imported has ~40 MiB RSS.
    baseline_memory_bytes: Annotated[int, Field(ge=0)] = 64 * MiB
    # Measured: the pread backend holds the tensors once (peak RSS 1.0x tensor bytes).
    loader_memory_factor: Annotated[float, Field(ge=1.0)] = 1.0
    # Headroom for the parsed header and allocator slack (set when the child also ran a
    # hashing helper; the hash is the supervisor's now, so this errs high): a fixed
    # part for small models and a fraction for large ones (a 100 MB model: 1.42x).
    memory_slack_bytes: Annotated[int, Field(ge=0)] = 32 * MiB
    memory_slack_fraction: Annotated[float, Field(ge=0)] = 0.1
    memory_floor_bytes: Annotated[int, Field(gt=0)] = 128 * MiB
    # Per tensor, whatever its size: safetensors' dict of 200,000 zero-size arrays grew
    # the loader by 0.87 KiB each (measured), and the child's manifest of them (a list,
    # then its JSON) about as much again; without it such a file died of SIGABRT.
    per_tensor_memory_bytes: Annotated[int, Field(ge=0)] = 2 * 1024
    # Per tensor: 52 us each to load 50,000 zero-size tensors on a busy 2-core node
    # (measured), doubled for the manifest.
    per_tensor_s: Annotated[float, Field(ge=0)] = 100e-6
    memory_ceiling_bytes: Annotated[int, Field(gt=0)] = 64 * GiB
    # Interpreter start, confinement and the first page faults.
    startup_s: Annotated[float, Field(gt=0)] = 5.0
    # A slow disk still gives 50 MB/s; a load slower than that is suspect.
    min_bandwidth_bytes_per_s: Annotated[float, Field(gt=0)] = 50e6
    cpu_floor_s: Annotated[float, Field(gt=0)] = 5.0
    cpu_ceiling_s: Annotated[float, Field(gt=0)] = 3600.0
    timeout_floor_s: Annotated[float, Field(gt=0)] = 10.0
    timeout_ceiling_s: Annotated[float, Field(gt=0)] = 3600.0
    # History wins over the declared size once a model has loaded this often: fewer
    # samples make a p95 that one slow run can swing.
    history_min_samples: Annotated[int, Field(ge=1)] = 3
    # Loads kept per model; a p95 over 20 ignores one outlier and follows a trend.
    history_samples: Annotated[int, Field(ge=1, le=1000)] = 20
    # Deadline and CPU from history = p95 x margin: 3x covers a busy node (measured
    # run-to-run spread under load is below 2x) and still stops a 10x regression.
    history_time_margin: Annotated[float, Field(ge=1.0)] = 3.0
    # Memory from history = p95 peak x margin, never below the declared-size figure.
    history_memory_margin: Annotated[float, Field(ge=1.0)] = 1.25
    # History of a model not loaded for a month is dropped.
    history_ttl_s: Annotated[int, Field(gt=0)] = 30 * 86_400


class FailureMemoryPolicy(BaseModel):
    """When a model that keeps failing is refused without a child (worker/load/failures.py).

    From the environment: ``LOADWARDEN_FAILURE_MEMORY__THRESHOLD=3``,
    ``LOADWARDEN_FAILURE_MEMORY__WINDOW_S=900``, ``LOADWARDEN_FAILURE_MEMORY__ENABLED=false``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # False: every load runs, however often its model failed (nothing read or written).
    enabled: bool = True
    # ModelMesh's figure (it stops loading a model after 3 recent failures): one failure is
    # a busy node, two a coincidence, three distinct jobs failing the same bytes a pattern.
    # Retries of one job count once, so a single job can never trip it on its own.
    threshold: Annotated[int, Field(ge=1, le=100)] = 3
    # ModelMesh's 15 minutes: long enough that a model hanging until its deadline (minutes
    # each) cannot keep most of a pool busy, short enough that a fixed disk, a larger node or
    # a new worker version gets another try without an operator.
    window_s: Annotated[float, Field(gt=0, le=7 * 86_400)] = 900.0


def _default_cache_dir() -> Path:
    return xdg_dir("XDG_CACHE_HOME", ".cache") / "loadwarden"


class SourcePolicy(BaseModel):
    """Where a model may come from: local roots, URL hosts and networks, download bounds.

    From the environment, tuples are JSON lists, e.g.
    ``LOADWARDEN_SOURCES__ALLOW_ROOTS='["/models", "/srv/models"]'`` and
    ``LOADWARDEN_SOURCES__ALLOW_HOSTS='["huggingface.co"]'``. pydantic-settings JSON-decodes
    every tuple-typed variable, so a comma-separated value (``/models,/srv/models``) is an
    error, not a list: splitting needs its ``NoDecode`` marker, which arrived in
    pydantic-settings 2.7 while we support 2.3 and later.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Empty: the worker's cwd at resolve time, so `loadwarden load FILE` works where it is run.
    # A deployed worker should name its model folders. Roots must be absolute.
    allow_roots: tuple[Path, ...] = ()
    # A hard link into a root looks, by its path, like a file that belongs there, and
    # Linux lets any user link a file they can read (unless fs.protected_hardlinks is on).
    # False: models in ordinary folders often carry links (deduplicating stores, hub caches
    # hardlinked into place); set it where the roots are writable by someone less trusted.
    refuse_hard_links: bool = False
    # Empty: no URL is fetched at all until an operator names the hosts it trusts (exact
    # names, compared case-insensitively; no wildcards, so a typo cannot open a whole domain).
    allow_hosts: tuple[str, ...] = ()
    # Empty: private, loopback, link-local and other non-global addresses are refused (SSRF);
    # name CIDRs (e.g. "10.20.0.0/16" for an in-cluster mirror) to allow them.
    allow_networks: tuple[str, ...] = ()
    # A TCP + TLS handshake with a reachable host takes well under a second; 10 s rides out a
    # slow resolver or a lost SYN while still failing a dead host quickly (it is retried).
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    # The longest silence allowed between two reads of a body; 30 s tolerates a busy CDN but
    # frees a job held by a server that stopped sending.
    read_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    # 64 GiB: the default memory ceiling (LimitPolicy.memory_ceiling_bytes); a larger file
    # could not be loaded under the default limits anyway, so it is not worth the disk.
    max_download_bytes: Annotated[int, Field(gt=0)] = 64 * GiB
    # Model hubs redirect once or twice (to a CDN); each hop is checked against the host and
    # address rules again. More than 5 is a loop or a trick.
    max_redirects: Annotated[int, Field(ge=0, le=20)] = 5
    # Per user, survives restarts, and is where cache cleaners look (XDG base directories).
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    # None: huggingface_hub's own rule (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub),
    # so hf:// finds the models a user already downloaded. Read by hf:// sources only.
    hf_cache_dir: Path | None = None
    # The cache's size cap: before each download, least recently used entries are evicted
    # until max_download_bytes more fit under it. None: no cap (a workstation's cache is the
    # user's disk); a deployment on a size-limited volume sets it below the volume's limit.
    cache_max_bytes: Annotated[int, Field(gt=0)] | None = None

    @field_validator("allow_roots", "cache_dir", "hf_cache_dir")
    @classmethod
    def _absolute(cls, value: Path | tuple[Path, ...] | None) -> Path | tuple[Path, ...] | None:
        for path in value if isinstance(value, tuple) else (value,) if value else ():
            if not path.is_absolute():
                raise ValueError(f"{str(path)!r} is not an absolute path")
        return value

    @model_validator(mode="after")
    def _one_download_fits_the_cache(self) -> SourcePolicy:
        if self.cache_max_bytes is not None and self.cache_max_bytes < self.max_download_bytes:
            raise ValueError(
                "cache_max_bytes must be at least max_download_bytes: the largest allowed "
                "download could never fit in the cache"
            )
        return self

    @field_validator("allow_hosts")
    @classmethod
    def _exact_hosts(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for host in hosts:
            name = host.strip().lower().rstrip(".")
            if not name or (any(c in name for c in "*/:@ ") and not _is_ip(name)):
                raise ValueError(f"{host!r} is not a host name (exact names only, no wildcards)")
            out.append(name)
        return tuple(out)

    @field_validator("allow_networks")
    @classmethod
    def _cidrs(cls, networks: tuple[str, ...]) -> tuple[str, ...]:
        # strict: "127.0.0.1/8" (host bits set) is more likely a typo than a network.
        try:
            return tuple(str(ipaddress.ip_network(n.strip(), strict=True)) for n in networks)
        except ValueError as exc:
            raise ValueError(f"not a CIDR network: {exc}") from None


class TrustedSigner(BaseModel):
    """A key (or a certificate authority) whose model signatures this worker accepts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # A PEM public key (EC P-256, P-384 or P-521: the curves model-signing signs with).
    public_key: Path | None = None
    # PEM certificates (a CA and its intermediates): a signature whose bundle carries a
    # signing certificate that chains to them (and may sign code) is this signer's.
    certificate_chain: tuple[Path, ...] = ()

    @model_validator(mode="after")
    def _one_kind(self) -> TrustedSigner:
        if (self.public_key is None) == (not self.certificate_chain):
            raise ValueError("give either public_key or certificate_chain, not both or neither")
        for path in (self.public_key, *self.certificate_chain):
            if path is not None and not path.is_absolute():
                raise ValueError(f"{str(path)!r} is not an absolute path")
        return self


class SigningPolicy(BaseModel):
    """Which models must carry a valid signature (OpenSSF model signing), and by whom.

    Each rule is "signed by one of these signers" (names from ``signers``; ``*``: any of
    them). Every rule that applies to a load must hold, so a load may only be signed by a
    signer in all of them; a request's or catalog's ``signed_by`` is one more rule, and
    it names signers, never keys: only the keys configured here can ever verify a model.
    From the environment, each is JSON, e.g.
    ``LOADWARDEN_SIGNING__SIGNERS='{"acme": {"public_key": "/keys/acme.pub"}}'`` and
    ``LOADWARDEN_SIGNING__ROOTS='{"/models/prod": ["acme"]}'``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # None trusted: a load that must be signed is then refused (unknown signer).
    signers: dict[SignerName, TrustedSigner] = {}
    # Every load (None: no rule for all loads; loads are signed only where a rule says).
    require: SignedBy | None = None
    # Loads whose files lie under one of these folders (a root or any folder inside one), or
    # whose source names a path under one (a symlink there to a model elsewhere too).
    roots: dict[Path, SignedBy] = {}
    # hf:// loads of these organisations (the ORG of hf://ORG/NAME, in any case: the hub's
    # names are case-insensitive, and a cache keeps whichever spelling it was fetched by).
    hf_orgs: dict[str, SignedBy] = {}

    @model_validator(mode="after")
    def _known_signers(self) -> SigningPolicy:
        if "*" in self.signers:
            raise ValueError('"*" means any signer; it cannot name one')
        rules = [self.require or (), *self.roots.values(), *self.hf_orgs.values()]
        for name in {n for rule in rules for n in rule} - {"*", *self.signers}:
            raise ValueError(f"signer {name!r} is required by a rule but not in signers")
        for root in self.roots:
            if not root.is_absolute():
                raise ValueError(f"{str(root)!r} is not an absolute path")
        return self

    @property
    def requires_any(self) -> bool:
        """Whether some rule of the worker's own requires signatures."""
        return bool(self.require or self.roots or self.hf_orgs)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class AutoscalePolicy(BaseModel):
    """Inputs of the autoscaling formula (see ``loadwarden.worker.ops.autoscale``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # What the formula aims for, not the drain time you promise: new workers arrive an
    # evaluation interval plus a pod start-up later, and loads vary in size, so set it
    # to (your drain target - interval - start-up) / 2 (bench/autoscale_sim.py: a
    # 120 s promise with 15 s polls and 30 s start-up needs 37.5 here).
    target_drain_s: Annotated[float, Field(gt=0)] = 60.0
    # KEDA's minReplicaCount: 0 lets the pool scale to zero when the queue is empty.
    min_workers: Annotated[int, Field(ge=0)] = 0
    # KEDA's maxReplicaCount in deploy/k8s/keda.
    max_workers: Annotated[int, Field(ge=1)] = 20
    # Two concurrent loads of ~6 s each, used until loads have been measured.
    default_service_rate_per_worker: Annotated[float, Field(gt=0)] = 0.33


class RedisOptions(BaseModel):
    """How every loadwarden process talks to Redis (``loadwarden.producer.connection``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # A TCP (+ TLS + AUTH) handshake on a LAN takes milliseconds; 5 s rides out one lost SYN
    # (the kernel resends after 1 s, then 3 s) and still fails a dead host quickly.
    connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    # The longest wait for one reply. Our commands are O(1) or O(log n) on small values and
    # answer in well under a millisecond; a reply 5 s late means a half-open connection
    # (a peer gone without a FIN), which would otherwise hang a caller for ever.
    socket_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    # A connection idle this long is PINGed before it is used again, so one a restart or a
    # NAT timeout left half-open is replaced before a real command waits on it. 15 s is
    # below the idle timeouts of common load balancers and NATs (30-350 s).
    health_check_interval_s: Annotated[float, Field(ge=0)] = 15.0
    # Once Redis has answered, a command that meets a dropped connection, a timeout, a
    # loading or read-only server is retried with backoff for this long before the caller
    # gets RedisUnavailable. 60 s covers a Sentinel failover with its default
    # down-after-milliseconds (30 s) plus the election and promotion (a few s, measured),
    # and the restart of a Redis whose AOF replays in seconds. A server never reached at
    # all (a wrong URL) fails at once instead.
    ride_through_s: Annotated[float, Field(ge=0)] = 60.0
    # 0: an acknowledgement means the primary has it (Redis' own default). N > 0: an
    # enqueue, a result and a dead letter are confirmed with WAIT N (N replicas have them)
    # before they count as done; see README "High availability" for what this buys.
    wait_replicas: Annotated[int, Field(ge=0)] = 0
    # How long WAIT may block: longer than a replica's usual lag (milliseconds on a LAN),
    # shorter than socket_timeout_s so a WAIT is never mistaken for a dead connection.
    wait_timeout_s: Annotated[float, Field(gt=0)] = 2.0

    @model_validator(mode="after")
    def _wait_within_socket_timeout(self) -> RedisOptions:
        if self.wait_timeout_s >= self.socket_timeout_s:
            raise ValueError("wait_timeout_s must be below socket_timeout_s")
        return self


class Settings(BaseSettings):
    """Every knob: ``LOADWARDEN_<NAME>`` (nested ones: ``LOADWARDEN_LIMITS__STARTUP_S``)."""

    model_config = SettingsConfigDict(
        env_prefix="LOADWARDEN_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    # None: no Redis configured (commands that need one say so). redis://, rediss://,
    # unix://, or redis+sentinel:// / rediss+sentinel:// (loadwarden.producer.connection).
    redis_url: str | None = None
    redis: RedisOptions = RedisOptions()
    # One queue per deployment; a prefix keeps loadwarden's keys apart from other arq users.
    queue_name: str = "loadwarden:queue"
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
    # Reports stay a day: long enough for a producer to come back for them.
    keep_result_s: Annotated[int, Field(gt=0)] = 86_400
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
    # A report lists at most this many tensors (totals always): a 150,000-tensor manifest
    # is ~9 MB of JSON per report, and nobody reads past the first screens of it.
    report_max_tensors: Annotated[int, Field(ge=0)] = 1000
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
