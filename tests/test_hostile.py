"""The hostile corpus through inspect_model and a real Supervisor, filesystem tricks, controls."""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from loadwarden.producer.contract import LoadRequest, ModelFormat, ModelSummary, Outcome
from loadwarden.producer.errors import SourceRefused
from loadwarden.worker._files import OpenedModel, open_model_file
from loadwarden.worker.binary.dtypes import NPY_BY_ARRAY
from loadwarden.worker.config import InspectionCaps, Settings, SourcePolicy
from loadwarden.worker.formats import LOADERS, Inspection, inspect_model
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.sources import open_source
from tests.hostile import CORPUS, Case

#: Every case must finish within this (generous: the slowest takes milliseconds).
TIME_BOUND_S = 5.0
#: ... and grow this process's peak RSS by less than this.
MEMORY_BOUND_BYTES = 256 * 1024 * 1024

BY_ID = {case.id: case for case in CORPUS}
VALID = [case for case in CORPUS if case.error is None and case.load_code is None]


def _ids(cases: list[Case]) -> list[Any]:
    return [pytest.param(case, id=case.id) for case in cases]


class Tampering(Supervisor):
    """Changes the file after inspecting it, before the child starts."""

    def __init__(self, settings: Settings, *, change: Callable[[str], None], **kw: Any) -> None:
        super().__init__(settings, **kw)
        self.change = change

    def _inspect(self, opened: OpenedModel, request: LoadRequest) -> Any:
        result = super()._inspect(opened, request)
        self.change(opened.first.path)
        return result


def supervisor_for(case: Case, **kw: Any) -> Supervisor:
    """A supervisor with the case's caps, and its memory budget when the case sets one."""
    settings = Settings(inspection=case.caps) if case.caps else Settings()
    if case.budget_bytes is not None:
        settings = settings.model_copy(update={"memory_budget_bytes": case.budget_bytes})
    return Supervisor(settings, **kw)


@contextlib.contextmanager
def bounded() -> Iterator[None]:
    """The block ends within TIME_BOUND_S and grows peak RSS by less than MEMORY_BOUND_BYTES."""
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    yield
    elapsed = time.monotonic() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kib) * 1024
    assert elapsed < TIME_BOUND_S, f"took {elapsed:.2f} s"
    assert grown < MEMORY_BOUND_BYTES, f"peak RSS grew by {grown} bytes"


def inspect_case(case: Case, path: Path) -> Inspection:
    with open_model_file(path) as model:
        return inspect_model(
            model.fd,
            model.size,
            path=model.path,
            declared=case.declared,
            caps=case.caps or InspectionCaps(),
            budget_bytes=case.budget_bytes,
        )


def manifest(summary: ModelSummary) -> dict[str, tuple[str, list[int], int]]:
    return {t.name: (t.dtype, t.shape, t.bytes) for t in summary.tensors}


@pytest.mark.parametrize("case", _ids(CORPUS))
def test_inspection_names_the_defect(case: Case, tmp_path: Path) -> None:
    """Each corpus file is refused or rejected with its class and code, or passes, in bounds."""
    path = case.write(tmp_path)
    with bounded():
        if case.error is None:
            inspection = inspect_case(case, path)
        else:
            with pytest.raises(case.error) as info:
                inspect_case(case, path)
    if case.error is None:
        assert inspection.loader == LOADERS[inspection.summary.format]
        return
    assert type(info.value) is case.error
    assert (info.value.code, case.fragment in info.value.message) == (case.code, True), info.value
    assert len(info.value.message) < 400


@pytest.mark.parametrize("case", _ids(CORPUS))
async def test_load_ends_as_inspection_says(case: Case, tmp_path: Path) -> None:
    """Through a real supervisor: the same outcome and code; no child when the header shows it."""
    path = case.write(tmp_path)
    async with supervisor_for(case) as supervisor:
        before = supervisor.forkserver.spawned
        with bounded():
            report = await supervisor.load(LoadRequest(source=str(path), format=case.declared))
        spawned = supervisor.forkserver.spawned - before
    if case.error is not None:
        assert report.outcome is case.error("").outcome
        assert report.error is not None and report.error.code == case.code, report.error
        assert (spawned, report.resources) == (0, None)
    elif case.load_code is not None:
        assert report.outcome is Outcome.INVALID
        assert report.error is not None and report.error.code == case.load_code, report.error
        assert spawned == 1
    else:
        assert report.outcome is Outcome.OK, report.error
        assert report.model is not None and spawned == 1
        assert manifest(report.model) == manifest(inspect_case(case, path).summary)


def reference_manifest(fmt: ModelFormat, path: Path) -> dict[str, tuple[str, list[int], int]]:
    """What the format's reference library reads from ``path``."""
    if fmt is ModelFormat.GGUF:
        import gguf

        reader = gguf.GGUFReader(path)
        return {
            t.name: (t.tensor_type.name, [int(d) for d in t.shape[::-1]], int(t.n_bytes))
            for t in reader.tensors
        }
    if fmt is ModelFormat.SAFETENSORS:
        arrays = load_file(path)
    elif fmt is ModelFormat.NPY:
        arrays = {"array": np.load(path, allow_pickle=False)}
    else:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    return {
        name: (NPY_BY_ARRAY[a.dtype.name], list(a.shape), a.nbytes) for name, a in arrays.items()
    }


@pytest.mark.parametrize("case", _ids(VALID))
def test_valid_control_matches_the_reference_library(case: Case, tmp_path: Path) -> None:
    """A valid file's inspected manifest is what numpy, safetensors or gguf-py reads."""
    path = case.write(tmp_path)
    summary = inspect_case(case, path).summary
    assert manifest(summary) == reference_manifest(summary.format, path)
    assert summary.bytes == sum(t.bytes for t in summary.tensors)
    assert summary.file_bytes == os.path.getsize(path)


def _fifo(folder: Path) -> Path:
    os.mkfifo(folder / "model.safetensors")
    return folder / "model.safetensors"


def _symlink_loop(folder: Path) -> Path:
    os.symlink("b.safetensors", folder / "a.safetensors")
    os.symlink("a.safetensors", folder / "b.safetensors")
    return folder / "a.safetensors"


def _link_to(target: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        os.symlink(target, folder / "model.safetensors")
        return folder / "model.safetensors"

    return make


def _directory(folder: Path) -> Path:
    (folder / "model.safetensors").mkdir()
    return folder / "model.safetensors"


@pytest.mark.parametrize(
    ("make", "code"),
    [
        pytest.param(_fifo, "not_regular_file", id="fifo"),
        pytest.param(_symlink_loop, "symlink_loop", id="symlink-loop"),
        pytest.param(_link_to("/etc/passwd"), "outside_root", id="symlink-etc-passwd"),
        pytest.param(_link_to("/proc/self/environ"), "outside_root", id="symlink-proc-environ"),
        pytest.param(_directory, "not_regular_file", id="directory"),
    ],
)
async def test_filesystem_trick_is_refused_before_any_open(
    make: Callable[[Path], Path], code: str, tmp_path: Path
) -> None:
    """FIFOs, symlink loops and escapes, and directories are refused, by sources and a load
    (which reads a directory as a checkpoint folder)."""
    path = make(tmp_path)
    with bounded(), pytest.raises(SourceRefused) as info:
        await open_source(
            str(path), expected_sha256=None, policy=SourcePolicy(allow_roots=(tmp_path,))
        )
    assert info.value.code == code
    async with Supervisor(Settings()) as supervisor:
        before = supervisor.forkserver.spawned
        with bounded():
            report = await supervisor.load(LoadRequest(source=str(path)))
        assert supervisor.forkserver.spawned == before
    if make is _directory:  # a load takes a folder as a checkpoint: this one holds none
        outcome, code = Outcome.INVALID, "no_checkpoint"
    else:
        outcome = Outcome.REFUSED
    assert report.outcome is outcome
    assert report.error is not None and report.error.code == code


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) - 1)


def _grow(path: str) -> None:
    with open(path, "ab") as f:
        f.write(b"\0" * 64)


@pytest.mark.parametrize("change", [_truncate, _grow], ids=["truncated", "grown"])
@pytest.mark.parametrize(
    "case_id", ["st-valid-mixed", "npy-valid-f32", "npz-valid-stored", "gguf-valid-mixed"]
)
async def test_file_changed_after_inspection_is_invalid(
    case_id: str, change: Callable[[str], None], tmp_path: Path
) -> None:
    """A file truncated or grown between inspection and load: the child refuses it, invalid."""
    case = BY_ID[case_id]
    path = case.write(tmp_path)
    async with Tampering(Settings(), change=change) as supervisor:
        before = supervisor.forkserver.spawned
        with bounded():
            report = await supervisor.load(LoadRequest(source=str(path)))
        assert supervisor.forkserver.spawned == before + 1
    assert report.outcome is Outcome.INVALID
    assert report.error is not None and report.error.code == "file_changed", report.error


def test_every_group_is_covered() -> None:
    """The corpus has defects and valid controls for every format, and code-bearing refusals."""
    groups = {case.group for case in CORPUS}
    assert groups == {
        "safetensors",
        "npy",
        "npz",
        "gguf",
        "budget",
        "code_bearing",
        "mismatch",
        "unknown",
    }
    for group in ("safetensors", "npy", "npz", "gguf"):
        kinds = {case.error is None for case in CORPUS if case.group == group}
        assert kinds == {True, False}, group
