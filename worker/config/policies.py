"""The worker's policies for one load: inspection caps, limits, failure memory, autoscaling."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

MiB = 1024 * 1024
GiB = 1024 * MiB
#: ``Settings.report_max_tensors``: a report lists at most this many tensors (totals
#: always). A 150,000-tensor manifest is ~9 MB of JSON per report, and nobody reads past
#: the first screens of it.
REPORT_MAX_TENSORS = 1000


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
