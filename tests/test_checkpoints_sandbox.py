"""A checkpoint gets the sandbox a single file gets: shard descriptors only, headers that
may be large inspected in confined children, digests computed by the supervisor."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from loadwarden.producer.contract import LoadRequest, ModelSummary, Outcome
from loadwarden.worker.config import InspectionCaps, Settings
from loadwarden.worker.load import _inspection as inspection_module
from loadwarden.worker.load.supervisor import Supervisor
from tests.checkpoints import save_pretrained, state_dict
from tests.conftest import eventually
from tests.test_checkpoints import SHARD_BYTES, assert_whole
from tests.test_deadline import SLACK_S, _inspection_children, _nested_arrays_header


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A sharded BF16 checkpoint as save_pretrained writes it."""
    folder = tmp_path / "ckpt"
    assert len(save_pretrained(folder, state_dict(), SHARD_BYTES)) >= 3
    return folder


@pytest.fixture
def shard_files(checkpoint: Path) -> list[Path]:
    """The checkpoint's shard files, by name."""
    return sorted(checkpoint.glob("model-*.safetensors"))


async def test_checkpoint_child_holds_only_its_shards(
    make_supervisor: Callable[..., Supervisor], checkpoint: Path, shard_files: list[Path]
) -> None:
    """A checkpoint's child holds /dev/null as 0-2, its socket and every shard: nothing else."""
    shards = len(shard_files)
    async with make_supervisor("probe_fds") as sup:
        report = await sup.load(LoadRequest(source=str(checkpoint)))
    assert report.error is not None and report.error.code == "loader_error", report.error
    kinds = json.loads(report.error.message.split(": ", 1)[1])
    assert sorted(kinds.values()) == sorted(["char"] * 3 + ["socket"] + ["model"] * shards)
    assert {kinds[str(n)] for n in (0, 1, 2)} == {"char"}


async def test_every_shard_header_is_inspected_in_a_confined_child(
    checkpoint: Path, shard_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With isolation below the shards' header sizes, each shard goes to its own inspection
    child and the checkpoint still loads whole, with the supervisor's digests."""
    real = inspection_module.inspect_in_child
    calls: list[str] = []

    async def counted(model_file: Any, **kw: Any) -> ModelSummary:
        calls.append(model_file.path)
        return await real(model_file, **kw)

    monkeypatch.setattr(inspection_module, "inspect_in_child", counted)
    settings = Settings(inspection=InspectionCaps(isolate_above_bytes=16))
    async with Supervisor(settings) as sup:
        report = await sup.load(LoadRequest(source=str(checkpoint)))
    assert_whole(report, checkpoint)
    assert sorted(Path(path).name for path in calls) == [p.name for p in shard_files]


def _zero_a_dimension(shard: Path) -> None:
    """Make the first dimension of two or more digits -0 and spaces: same length, same offsets."""
    data = shard.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length].decode()
    found = re.search(r'"shape":\[(\d\d+)', header)
    assert found is not None, header[:200]
    digits = found.group(1)
    broken = header.replace(f'"shape":[{digits}', '"shape":[-0' + " " * (len(digits) - 2), 1)
    assert len(broken) == length
    shard.write_bytes(data[:8] + broken.encode() + data[8 + length :])


async def test_a_defective_shard_is_named_by_its_inspection_child(
    checkpoint: Path, shard_files: list[Path]
) -> None:
    """A shard whose header breaks (a -0 dimension) inside the child ends invalid, named."""
    _zero_a_dimension(shard_files[1])
    settings = Settings(inspection=InspectionCaps(isolate_above_bytes=16))
    async with Supervisor(settings) as sup:
        report = await sup.load(LoadRequest(source=str(checkpoint)))
    assert report.outcome is Outcome.INVALID, report
    assert report.error is not None and report.error.code == "bad_shape", report.error


async def test_cancel_interrupts_a_checkpoint_shards_inspection(tmp_path: Path) -> None:
    """The job's cancel reaches a checkpoint's shard inspection: the job ends cancelled
    and the shard's inspection child is killed."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(_nested_arrays_header())
    cancel = asyncio.Event()
    async with Supervisor(Settings()) as sup:
        job = asyncio.create_task(sup.load(LoadRequest(source=str(folder)), cancel=cancel))
        await eventually(_inspection_children, 10, "an inspection child started")
        cancel.set()
        report = await asyncio.wait_for(job, SLACK_S)
        assert sup.forkserver.spawned == 0
    assert report.outcome is Outcome.CANCELLED, report.error
    assert report.error is not None and "inspecting" in report.error.message
    assert _inspection_children() == []
