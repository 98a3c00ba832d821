"""Make checkpoints the way real ones are made: split by huggingface_hub's own splitter, the
index written as ``save_pretrained`` writes it, the hub cache laid out by huggingface_hub."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
from huggingface_hub import split_state_dict_into_shards_factory
from huggingface_hub.file_download import (
    _cache_commit_hash_for_specific_revision,
    _create_symlink,
    repo_folder_name,
)
from safetensors.numpy import save_file

#: save_pretrained's names.
INDEX = "model.safetensors.index.json"
PATTERN = "model{suffix}.safetensors"


def state_dict(
    layers: int = 4, width: int = 64, dtype: type[np.generic] = ml_dtypes.bfloat16
) -> dict[str, np.ndarray]:
    """A small transformer-shaped state dict (embedding, layers, head), deterministic, cast
    with ml_dtypes (BF16 by default, as most checkpoints ship)."""
    rng = np.random.default_rng(7)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((128, width)).astype(dtype)}
    for i in range(layers):
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = rng.standard_normal(
            (width, width)
        ).astype(dtype)
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = rng.standard_normal(
            (2 * width, width)
        ).astype(dtype)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = np.ones(width, dtype=dtype)
    tensors["lm_head.weight"] = rng.standard_normal((128, width)).astype(dtype)
    return tensors


def save_pretrained(
    folder: Path, tensors: dict[str, np.ndarray], max_shard_size: int | str = 20_000
) -> list[str]:
    """Write ``tensors`` as save_pretrained does: shards and (if sharded) the index.

    Returns the shard file names in order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    split = split_state_dict_into_shards_factory(
        tensors,
        get_storage_size=lambda t: int(t.nbytes),
        filename_pattern=PATTERN,
        max_shard_size=max_shard_size,
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        parameters = sum(int(t.size) for t in tensors.values())
        index = {
            "metadata": {"total_parameters": parameters, **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        write_index(folder, index)
    return list(split.filename_to_tensors)


def write_index(folder: Path, index: dict[str, object], name: str = INDEX) -> Path:
    """An index as transformers' save_pretrained writes it (sorted keys, indent 2)."""
    path = folder / name
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_index(folder: Path) -> dict[str, object]:
    return json.loads((folder / INDEX).read_text())


def git_blob_sha1(data: bytes) -> str:
    """How the hub names a non-LFS file's blob."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_snapshot(
    cache: Path, repo_id: str, folder: Path, *, revision: str = "main", commit: str | None = None
) -> Path:
    """Put every file of ``folder`` in a hub cache as huggingface_hub does: blobs named by
    sha256 (LFS: *.safetensors) or git sha1, relative snapshot symlinks, refs/<revision>.

    Returns the repository's cache folder.
    """
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        lfs = path.suffix == ".safetensors"
        etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = storage / "snapshots" / commit / path.name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(pointer), new_blob=True)
    _cache_commit_hash_for_specific_revision(str(storage), revision, commit)
    return storage


def hf_env(cache: Path) -> dict[str, str]:
    """Environment of a process that must find ``cache`` and never call the hub."""
    return {"HF_HUB_CACHE": os.fspath(cache), "HF_HUB_OFFLINE": "1"}
