"""Sharded checkpoints and hf:// sources: loaded whole in one child, and every hostile layout
refused with a classified outcome, through a real Supervisor, the CLI and a real worker."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from huggingface_hub import try_to_load_from_cache
from safetensors.numpy import load_file, save_file

from loadwarden.producer.catalog import load_catalog
from loadwarden.producer.client import Client
from loadwarden.producer.contract import LoadReport, LoadRequest, Outcome
from loadwarden.producer.errors import CatalogError
from loadwarden.worker.cli.calibrate import calibrate
from loadwarden.worker.config import Settings
from loadwarden.worker.load._model import checkpoint_digest
from loadwarden.worker.load.supervisor import Supervisor
from tests.checkpoints import (
    INDEX,
    cache_snapshot,
    read_index,
    save_pretrained,
    state_dict,
    write_index,
)
from tests.test_cli import run

REPO = "example-org/tiny-llama"
#: Small enough for several shards of a few tensors each.
SHARD_BYTES = 40_000


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A sharded BF16 checkpoint as save_pretrained writes it."""
    folder = tmp_path / "ckpt"
    shards = save_pretrained(folder, state_dict(), SHARD_BYTES)
    assert len(shards) >= 3
    return folder


@pytest.fixture
def hub_cache(tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The checkpoint in a Hugging Face cache (HF_HUB_CACHE), laid out by huggingface_hub."""
    cache = tmp_path / "hub"
    cache_snapshot(cache, REPO, checkpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
async def lazy_supervisor() -> AsyncIterator[Supervisor]:
    """A supervisor whose fork server starts only when a load needs a child."""
    supervisor = Supervisor(Settings())
    try:
        yield supervisor
    finally:
        await supervisor.close()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_whole(report: LoadReport, folder: Path) -> None:
    """The report is ok and describes every shard of ``folder``'s checkpoint, summed."""
    assert report.outcome is Outcome.OK, report.error
    model = report.model
    assert model is not None and model.shards is not None
    tensors = state_dict()
    shard_files = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert [s.file for s in model.shards] == shard_files
    assert model.parameters == sum(int(t.size) for t in tensors.values())
    assert model.dtypes == {"BF16": model.parameters}
    assert (
        model.bytes
        == sum(int(t.nbytes) for t in tensors.values())
        == sum(s.bytes for s in model.shards)
    )
    assert {t.name for t in model.tensors} == set(tensors)
    digests = [(s.file, file_sha256(folder / s.file)) for s in model.shards]
    assert [s.sha256 for s in model.shards] == [d for _, d in digests]
    assert model.sha256 == checkpoint_digest(digests)
    assert model.metadata["total_size"] == str(model.bytes)


@pytest.mark.parametrize("how", ["folder", "index", "hf", "hf@main", "hf@commit"])
async def test_checkpoint_loads_whole_in_one_child(
    how: str, checkpoint: Path, hub_cache: Path, lazy_supervisor: Supervisor
) -> None:
    """A folder, its index and its hf:// name each load every shard in one child, one report."""
    commit = (hub_cache / f"models--{REPO.replace('/', '--')}" / "refs" / "main").read_text()
    source = {
        "folder": str(checkpoint),
        "index": str(checkpoint / INDEX),
        "hf": f"hf://{REPO}",
        "hf@main": f"hf://{REPO}@main",
        "hf@commit": f"hf://{REPO}@{commit}",
    }[how]
    report = await lazy_supervisor.load(LoadRequest(source=source))
    assert_whole(report, checkpoint)
    assert lazy_supervisor.forkserver.spawned == 1


def test_huggingface_hub_sees_the_cache_we_read(checkpoint: Path, hub_cache: Path) -> None:
    """The test cache is huggingface_hub's own layout: its reader finds the same index."""
    found = try_to_load_from_cache(REPO, INDEX, cache_dir=hub_cache)
    assert isinstance(found, str)
    assert Path(found).read_bytes() == (checkpoint / INDEX).read_bytes()


async def test_pinned_checkpoint_digest(checkpoint: Path, lazy_supervisor: Supervisor) -> None:
    """A request's sha256 pins a checkpoint (its shards' sha256sum lines); another is invalid."""
    first = await lazy_supervisor.load(LoadRequest(source=str(checkpoint)))
    assert first.model is not None and first.model.sha256 is not None
    again = await lazy_supervisor.load(
        LoadRequest(source=str(checkpoint), sha256=first.model.sha256)
    )
    wrong = await lazy_supervisor.load(LoadRequest(source=str(checkpoint), sha256="0" * 64))
    assert again.outcome is Outcome.OK
    assert (wrong.outcome, wrong.error and wrong.error.code) == (
        Outcome.INVALID,
        "sha256_mismatch",
    )


@pytest.mark.timeout(180)  # 1024 files written, inspected, hashed and loaded
async def test_checkpoint_at_the_shard_cap_loads(tmp_path: Path) -> None:
    """A checkpoint of max_shards shards loads in one child: its descriptors go over in
    several packets (250 each) and its spec outgrows a default socket buffer."""
    cap = Settings().inspection.max_shards
    tensors = {f"t{i:05d}": np.full(4, i, dtype=np.float32) for i in range(cap)}
    assert len(save_pretrained(tmp_path / "many", tensors, 16)) == cap
    async with Supervisor(Settings()) as supervisor:
        report = await supervisor.load(LoadRequest(source=str(tmp_path / "many")))
    assert report.outcome is Outcome.OK, report.error
    assert report.model is not None and report.model.shards is not None
    assert len(report.model.shards) == cap and all(s.sha256 for s in report.model.shards)


async def test_single_file_folder(tmp_path: Path, lazy_supervisor: Supervisor) -> None:
    """A folder holding one model.safetensors loads it, reported as a one-shard checkpoint."""
    folder = tmp_path / "single"
    assert save_pretrained(folder, state_dict(layers=1), "1GB") == ["model.safetensors"]
    report = await lazy_supervisor.load(LoadRequest(source=str(folder)))
    assert report.outcome is Outcome.OK, report.error
    assert report.model is not None and report.model.shards is not None
    assert [s.file for s in report.model.shards] == ["model.safetensors"]


# Hostile layouts: each changes a good checkpoint (folder, index dict, hub cache) in place.
Tamper = Callable[[Path, dict[str, object], Path], str | None]


def _weight_map(index: dict[str, object]) -> dict[str, str]:
    weight_map = index["weight_map"]
    assert isinstance(weight_map, dict)
    return weight_map


def _rename_shard(to: str) -> Tamper:
    def tamper(folder: Path, index: dict[str, object], _cache: Path) -> None:
        weight_map = _weight_map(index)
        first = sorted(set(weight_map.values()))[0]
        for name, shard in weight_map.items():
            if shard == first:
                weight_map[name] = to

    return tamper


def _missing_tensor(folder: Path, index: dict[str, object], _cache: Path) -> None:
    weight_map = _weight_map(index)
    weight_map["model.layers.99.mlp.up_proj.weight"] = sorted(set(weight_map.values()))[0]


def _tensor_in_two_shards(folder: Path, index: dict[str, object], _cache: Path) -> None:
    weight_map = _weight_map(index)
    path = folder / sorted(set(weight_map.values()))[0]
    tensors = load_file(str(path))
    tensors["lm_head.weight"] = np.zeros((2, 2), dtype=ml_dtypes.bfloat16)  # in another shard
    save_file(tensors, str(path))


def _unlisted_tensor(folder: Path, index: dict[str, object], _cache: Path) -> None:
    shard = sorted(set(_weight_map(index).values()))[0]
    tensors = load_file(str(folder / shard))
    tensors["stowaway"] = np.zeros(3, dtype=ml_dtypes.bfloat16)
    save_file(tensors, str(folder / shard))


def _lying_total_size(folder: Path, index: dict[str, object], _cache: Path) -> None:
    metadata = index["metadata"]
    assert isinstance(metadata, dict)
    metadata["total_size"] = int(metadata["total_size"]) + 2


def _duplicate_key(folder: Path, index: dict[str, object], _cache: Path) -> str:
    text = json.dumps(index, indent=2)
    # The same tensor listed twice, as two keys of one JSON object (json.dumps cannot write it).
    weight_map = _weight_map(index)
    name, shard = next(iter(weight_map.items()))
    text = text.replace('"weight_map": {', f'"weight_map": {{\n    "{name}": "{shard}",', 1)
    (folder / INDEX).write_text(text)
    return str(folder / INDEX)


def _hard_linked_shard(folder: Path, index: dict[str, object], _cache: Path) -> None:
    # One file under two shard names: the second name is a hard link to the first.
    weight_map = _weight_map(index)
    first, second = sorted(set(weight_map.values()))[:2]
    (folder / second).unlink()
    os.link(folder / first, folder / second)


def _ten_thousand_shards(folder: Path, index: dict[str, object], _cache: Path) -> None:
    index["weight_map"] = {f"t{i}": f"model-{i:05d}-of-10000.safetensors" for i in range(10_000)}


def _huge_index(folder: Path, index: dict[str, object], _cache: Path) -> str:
    path = folder / INDEX
    with path.open("wb") as f:  # 100 MB, sparse: the size alone must refuse it, unread
        f.write(b'{"weight_map": {')
        f.truncate(100_000_000)
    return str(path)


def _symlink_out(folder: Path, index: dict[str, object], _cache: Path) -> None:
    shard = sorted(set(_weight_map(index).values()))[0]
    outside = folder.parent / "elsewhere.safetensors"
    shutil.move(folder / shard, outside)
    (folder / shard).symlink_to(outside)


def _pickle_shard(folder: Path, index: dict[str, object], _cache: Path) -> None:
    shard = sorted(set(_weight_map(index).values()))[0]
    (folder / shard).write_bytes(pickle.dumps({"weight": [0.0]}, protocol=4))


def _shard_absent(folder: Path, index: dict[str, object], _cache: Path) -> None:
    (folder / sorted(set(_weight_map(index).values()))[-1]).unlink()


HOSTILE_INDEXES: dict[str, tuple[Tamper, Outcome, str]] = {
    "escape-dotdot": (_rename_shard("../x.safetensors"), Outcome.INVALID, "bad_shard_name"),
    "escape-absolute": (_rename_shard("/etc/passwd"), Outcome.INVALID, "bad_shard_name"),
    "escape-subdir": (_rename_shard("a/b.safetensors"), Outcome.INVALID, "bad_shard_name"),
    "escape-backslash": (_rename_shard("..\\x.safetensors"), Outcome.INVALID, "bad_shard_name"),
    "pickle-extension": (_rename_shard("pytorch_model.bin"), Outcome.INVALID, "bad_shard_name"),
    "missing-tensor": (_missing_tensor, Outcome.INVALID, "missing_tensor"),
    "tensor-in-two-shards": (_tensor_in_two_shards, Outcome.INVALID, "tensor_in_two_shards"),
    "unlisted-tensor": (_unlisted_tensor, Outcome.INVALID, "unlisted_tensor"),
    "lying-total-size": (_lying_total_size, Outcome.INVALID, "total_size_mismatch"),
    "tensor-listed-twice": (_duplicate_key, Outcome.INVALID, "duplicate_key"),
    "shard-listed-twice": (_hard_linked_shard, Outcome.INVALID, "duplicate_shard"),
    "ten-thousand-shards": (_ten_thousand_shards, Outcome.INVALID, "too_many_shards"),
    "100-MB-index": (_huge_index, Outcome.INVALID, "index_too_large"),
    "symlink-out": (_symlink_out, Outcome.REFUSED, "symlink"),
    "pickle-shard": (_pickle_shard, Outcome.REFUSED, "code_bearing_format"),
    "shard-absent": (_shard_absent, Outcome.UNAVAILABLE, "not_found"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_INDEXES))
async def test_hostile_index_is_classified_before_any_child(
    case: str, checkpoint: Path, tmp_path: Path, lazy_supervisor: Supervisor
) -> None:
    """Each hostile index or shard ends invalid/refused/unavailable with its code, no child."""
    tamper, outcome, code = HOSTILE_INDEXES[case]
    index = read_index(checkpoint)
    source = tamper(checkpoint, index, tmp_path / "hub")
    if source is None:
        write_index(checkpoint, index)
    report = await lazy_supervisor.load(LoadRequest(source=source or str(checkpoint)))
    assert (report.outcome, report.error and report.error.code) == (outcome, code), report.error
    assert lazy_supervisor.forkserver.spawned == 0
    # The supervisor stays usable: a good checkpoint loads right after.
    good = tmp_path / "good"
    save_pretrained(good, state_dict(), SHARD_BYTES)
    assert_whole(await lazy_supervisor.load(LoadRequest(source=str(good))), good)


def _storage(cache: Path) -> Path:
    return cache / f"models--{REPO.replace('/', '--')}"


def _snapshot_entry(cache: Path, name: str) -> Path:
    commit = (_storage(cache) / "refs" / "main").read_text()
    return _storage(cache) / "snapshots" / commit / name


def _shard_entries(cache: Path) -> list[Path]:
    return sorted(_snapshot_entry(cache, INDEX).parent.glob("model-*.safetensors"))


def _link_out_of_blobs(cache: Path) -> str:
    entry = _shard_entries(cache)[0]
    target = cache.parent / "ckpt" / entry.name
    entry.unlink()
    entry.symlink_to(os.path.relpath(target, entry.parent))
    return f"hf://{REPO}"


def _absolute_link(cache: Path) -> str:
    entry = _snapshot_entry(cache, INDEX)
    entry.unlink()
    entry.symlink_to("/etc/passwd")
    return f"hf://{REPO}"


def _corrupt_blob(cache: Path) -> str:
    entry = _shard_entries(cache)[1]
    blob = _storage(cache) / "blobs" / os.readlink(entry).rsplit("/", 1)[1]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in tensor data: the header still checks out
    blob.write_bytes(bytes(data))
    return f"hf://{REPO}"


def _corrupt_index_blob(cache: Path) -> str:
    entry = _snapshot_entry(cache, INDEX)
    blob = _storage(cache) / "blobs" / os.readlink(entry).rsplit("/", 1)[1]
    blob.write_bytes(blob.read_bytes().replace(b"total_size", b"total_sizf"))
    return f"hf://{REPO}"


def _ref_to_missing_snapshot(cache: Path) -> str:
    (_storage(cache) / "refs" / "main").write_text("f" * 40)
    return f"hf://{REPO}"


def _not_cached(cache: Path) -> str:
    return "hf://example-org/never-downloaded"


def _unknown_branch(cache: Path) -> str:
    return f"hf://{REPO}@no-such-branch"


HOSTILE_CACHES: dict[str, tuple[Callable[[Path], str], Outcome, str]] = {
    "snapshot-link-leaves-blobs": (_link_out_of_blobs, Outcome.REFUSED, "outside_blobs"),
    "snapshot-link-absolute": (_absolute_link, Outcome.REFUSED, "outside_blobs"),
    "corrupted-blob": (_corrupt_blob, Outcome.INVALID, "sha256_mismatch"),
    "corrupted-index-blob": (_corrupt_index_blob, Outcome.INVALID, "blob_mismatch"),
    "ref-names-missing-snapshot": (_ref_to_missing_snapshot, Outcome.INVALID, "missing_snapshot"),
    "not-cached": (_not_cached, Outcome.UNAVAILABLE, "not_found"),
    "unknown-branch": (_unknown_branch, Outcome.UNAVAILABLE, "not_found"),
    "name-dotdot": (lambda _c: "hf://../x", Outcome.REFUSED, "bad_hf_name"),
    "name-without-org": (lambda _c: "hf://a", Outcome.REFUSED, "bad_hf_name"),
    "name-double-dash": (lambda _c: "hf://org--x/name", Outcome.REFUSED, "bad_hf_name"),
    "revision-chars": (lambda _c: f"hf://{REPO}@main;rm -rf", Outcome.REFUSED, "bad_hf_name"),
    "revision-climbs": (lambda _c: f"hf://{REPO}@../../x", Outcome.REFUSED, "bad_hf_name"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CACHES))
async def test_hostile_cache_is_classified(
    case: str, hub_cache: Path, lazy_supervisor: Supervisor
) -> None:
    """Each hostile hub cache or hf:// name ends with its classified outcome and code."""
    tamper, outcome, code = HOSTILE_CACHES[case]
    report = await lazy_supervisor.load(LoadRequest(source=tamper(hub_cache)))
    assert (report.outcome, report.error and report.error.code) == (outcome, code), report.error
    # Only the corrupted blob gets as far as a child: its digest is known only by reading it.
    assert lazy_supervisor.forkserver.spawned == (1 if case == "corrupted-blob" else 0)


@pytest.mark.timeout(240)  # six command runs, each a fresh interpreter (10 s on a busy node)
def test_cli_loads_and_inspects_checkpoints(checkpoint: Path, hub_cache: Path) -> None:
    """`load` of a folder, an index and hf:// prints one ok report with shards; so does inspect."""
    env = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    for source in (str(checkpoint) + "/", str(checkpoint / INDEX), f"hf://{REPO}"):
        result = run("load", source, "--json", env=env)
        assert result.returncode == 0, result.stderr
        assert_whole(LoadReport.model_validate_json(result.stdout), checkpoint)
    human = run("load", str(checkpoint), env=env)
    assert "model-00001-of-" in human.stdout and "BF16" in human.stdout
    inspected = run("inspect", f"hf://{REPO}", "--json", env=env)
    assert inspected.returncode == 0, inspected.stderr
    model = json.loads(inspected.stdout)["model"]
    assert [s["file"] for s in model["shards"]] == sorted(
        p.name for p in checkpoint.glob("model-*.safetensors")
    )
    assert model["bytes"] == sum(s["bytes"] for s in model["shards"])
    bad = run("inspect", "hf://../x", "--json", env=env)
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["error"]["code"] == "bad_hf_name"


@pytest.mark.timeout(180)  # a worker process, five loads and a command run
async def test_worker_loads_checkpoints_and_survives_hostile_ones(
    redis_url: str,
    checkpoint: Path,
    hub_cache: Path,
    tmp_path: Path,
    start_worker: Callable[..., object],
) -> None:
    """A real worker over Redis loads hf:// and folder checkpoints, refuses hostile ones."""
    hostile = tmp_path / "hostile"
    save_pretrained(hostile, state_dict(), SHARD_BYTES)
    index = read_index(hostile)
    _rename_shard("../escape.safetensors")(hostile, index, hub_cache)
    write_index(hostile, index)
    start_worker(redis_url)  # finds the cache through HF_HUB_CACHE, like a user's worker
    async with Client(redis_url) as client:
        handles = [
            await client.enqueue(LoadRequest(source=source))
            for source in (f"hf://{REPO}", str(hostile), "hf://../x", str(checkpoint))
        ]
        reports = [await h.report(timeout_s=60) for h in handles]
    assert_whole(reports[0], checkpoint)
    assert (reports[1].outcome, reports[1].error and reports[1].error.code) == (
        Outcome.INVALID,
        "bad_shard_name",
    )
    assert (reports[2].outcome, reports[2].error and reports[2].error.code) == (
        Outcome.REFUSED,
        "bad_hf_name",
    )
    assert_whole(reports[3], checkpoint)
    # The CLI enqueues an hf:// source as it is (no path rewriting) and waits for its report.
    cli = await asyncio.to_thread(
        run, "enqueue", f"hf://{REPO}", "--wait", "--json", "--redis", redis_url
    )
    assert cli.returncode == 0, cli.stderr
    assert_whole(LoadReport.model_validate_json(cli.stdout), checkpoint)


def test_catalog_takes_checkpoints(checkpoint: Path, tmp_path: Path) -> None:
    """Catalog entries may name a checkpoint folder, an index or hf://; a bad hf:// is a defect."""
    good = tmp_path / "good.toml"
    good.write_text(
        '[[model]]\nname = "folder"\nsource = "ckpt"\n'
        '[[model]]\nname = "index"\nsource = "ckpt/model.safetensors.index.json"\n'
        f'[[model]]\nname = "hub"\nsource = "hf://{REPO}@main"\n'
    )
    sources = [r.source for _, r in load_catalog(good).requests()]
    assert sources == [str(checkpoint), str(checkpoint / INDEX), f"hf://{REPO}@main"]
    bad = tmp_path / "bad.toml"
    bad.write_text('[[model]]\nname = "x"\nsource = "hf://../x"\n')
    with pytest.raises(CatalogError) as info:
        load_catalog(bad)
    assert any("repository id" in d for d in info.value.defects), info.value.defects


async def test_calibrate_measures_checkpoints(checkpoint: Path, hub_cache: Path) -> None:
    """calibrate loads a checkpoint folder and an hf:// model and recommends limits for each."""
    results = await calibrate(
        [
            ("folder", LoadRequest(source=str(checkpoint))),
            ("hub", LoadRequest(source=f"hf://{REPO}")),
        ],
        Settings(),
    )
    assert [r.report.outcome for r in results] == [Outcome.OK, Outcome.OK]
    assert all(r.recommended is not None for r in results)
