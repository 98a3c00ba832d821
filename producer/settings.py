"""Settings: one validated object, built from the environment (``LOADWARDEN_*``) in one place."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
GiB = 1024 * MiB


class InspectionCaps(BaseModel):
    """Caps applied while reading a model header, before any loader sees the file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # safetensors itself accepts 100 MB headers (1.4 GB and 10 s to parse); real
    # models with 100k tensors need about 10 MB.
    max_header_bytes: Annotated[int, Field(gt=0)] = 16 * MiB
    # The largest public checkpoints have a few tens of thousands of tensors.
    max_tensors: Annotated[int, Field(gt=0)] = 200_000
    # No framework tensor in practice goes beyond rank 8; 16 leaves room.
    max_rank: Annotated[int, Field(gt=0)] = 16
    # 1 TiB: beyond any single file we expect; a budget check comes on top (issue #4).
    max_total_bytes: Annotated[int, Field(gt=0)] = 1024 * GiB
    # __metadata__ is free-form strings; bound how much of it we carry into reports.
    max_metadata_entries: Annotated[int, Field(ge=0)] = 1024


class LimitPolicy(BaseModel):
    """How limits are derived from a model's declared size, and their floors and ceilings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Measured: a forkserver child with numpy + safetensors imported has ~40 MiB RSS.
    baseline_memory_bytes: Annotated[int, Field(ge=0)] = 64 * MiB
    # Measured: the pread backend holds the tensors once (peak RSS 1.0x tensor bytes).
    loader_memory_factor: Annotated[float, Field(ge=1.0)] = 1.0
    # Headroom for the parsed header, the hashing buffer and allocator slack.
    memory_slack_bytes: Annotated[int, Field(ge=0)] = 64 * MiB
    memory_floor_bytes: Annotated[int, Field(gt=0)] = 128 * MiB
    memory_ceiling_bytes: Annotated[int, Field(gt=0)] = 64 * GiB
    # Interpreter start, confinement and the first page faults.
    startup_s: Annotated[float, Field(gt=0)] = 5.0
    # A slow disk still gives 50 MB/s; a load slower than that is suspect.
    min_bandwidth_bytes_per_s: Annotated[float, Field(gt=0)] = 50e6
    cpu_floor_s: Annotated[float, Field(gt=0)] = 5.0
    cpu_ceiling_s: Annotated[float, Field(gt=0)] = 3600.0
    timeout_floor_s: Annotated[float, Field(gt=0)] = 10.0
    timeout_ceiling_s: Annotated[float, Field(gt=0)] = 3600.0


class Settings(BaseSettings):
    """Every knob: ``LOADWARDEN_<NAME>`` (nested ones: ``LOADWARDEN_LIMITS__STARTUP_S``)."""

    model_config = SettingsConfigDict(
        env_prefix="LOADWARDEN_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    # None: no Redis configured (commands that need one say so).
    redis_url: str | None = None
    # One queue per deployment; a prefix keeps loadwarden's keys apart from other arq users.
    queue_name: str = "loadwarden:queue"
    # Loads run at once per worker: 2 matches the 2-core nodes we measure on.
    concurrency: Annotated[int, Field(ge=1, le=256)] = 2
    # arq's 0.5 s default adds ~250 ms median latency; 50 ms costs one cheap ZRANGEBYSCORE.
    poll_delay_s: Annotated[float, Field(gt=0)] = 0.05
    # How long SIGTERM lets running loads finish before they are killed and requeued.
    shutdown_grace_s: Annotated[int, Field(ge=0)] = 30
    # 10 Hz psutil sampling costs ~0.5% of a core per load (measured).
    sample_interval_s: Annotated[float, Field(gt=0)] = 0.1
    # Reports stay a day: long enough for a producer to come back for them.
    keep_result_s: Annotated[int, Field(gt=0)] = 86_400
    # A loader needs the model, a few libraries and its pipe; 64 leaves room.
    child_max_fds: Annotated[int, Field(ge=16)] = 64
    inspection: InspectionCaps = InspectionCaps()
    limits: LimitPolicy = LimitPolicy()
