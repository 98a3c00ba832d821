"""A worker's default concurrency follows the CPUs it may use (affinity and CPU quota)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loadwarden.worker.config import CONCURRENCY_PER_CPU, Settings, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, AFFINITY),
        ({"cpu.max": "max 100000\n"}, AFFINITY),
        ({"cpu.max": "50000 100000\n"}, 1),  # half a CPU still runs one
        ({"cpu.max": f"{150000 * AFFINITY} 100000\n"}, AFFINITY),  # never above affinity
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, AFFINITY),
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
    ],
)
def test_usable_cpus_is_capped_by_the_quota(
    tmp_path: Path, files: dict[str, str], expected: int
) -> None:
    """A cgroup v2 or v1 CPU quota caps the CPUs counted; no quota leaves the affinity."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert usable_cpus(tmp_path) == expected


def test_default_concurrency_is_per_usable_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset, concurrency is CONCURRENCY_PER_CPU per usable CPU; set, it is what was asked."""
    monkeypatch.delenv("LOADWARDEN_CONCURRENCY", raising=False)
    assert Settings().concurrency == CONCURRENCY_PER_CPU * usable_cpus()
    monkeypatch.setenv("LOADWARDEN_CONCURRENCY", "3")
    assert Settings().concurrency == 3
