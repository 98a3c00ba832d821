"""A sharded checkpoint's ``*.safetensors.index.json``: parsed strictly, then checked
against what its shards really hold.

``save_pretrained`` (and huggingface_hub's ``save_torch_state_dict``) write
``{"metadata": {"total_size": N, ...}, "weight_map": {tensor: shard file, ...}}``,
where ``total_size`` is what huggingface_hub's ``split_state_dict_into_shards_factory``
sums: each stored tensor's storage bytes, once. A safetensors file stores every
tensor contiguously and unshared, so for a checkpoint we can load it equals the
sum of the shards' tensor bytes; we require exactly that. Errors (``InvalidModel``,
outcome ``invalid``), by code::

    index_too_large          the file is over ``max_index_bytes`` (checked before reading)
    index_not_utf8 / index_not_json / index_not_object / duplicate_key / non_finite_number
    bad_index                unknown top-level key, no ``weight_map``, a value of the wrong type
    bad_shard_name           a shard that is not a plain ``*.safetensors`` file name in the
                             index's folder (a separator, ``..``, an absolute path, NUL)
    too_many_shards          more distinct shards than ``max_shards``
    too_many_tensors         more entries than ``max_tensors``
    tensor_in_two_shards     two shards hold a tensor of the same name
    missing_tensor           the index names a tensor its shard does not hold
    unlisted_tensor          a shard holds a tensor the index does not name (or names elsewhere)
    total_size_mismatch      ``metadata.total_size`` differs from the shards' tensor bytes
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loadwarden.producer.errors import InvalidModel
from loadwarden.worker.binary.strict_json import json_type, parse_object, show
from loadwarden.worker.config import InspectionCaps

#: How an index file is named (``model.safetensors.index.json``, diffusers'
#: ``diffusion_pytorch_model.safetensors.index.json``, ...).
INDEX_SUFFIX = ".safetensors.index.json"
#: The one extension a shard of a safetensors index may have: a ``.bin`` (pickle)
#: shard named by a safetensors index is refused like huggingface_hub refuses it.
SHARD_SUFFIX = ".safetensors"
# A plain file name: no separator of any OS, no NUL or control character.
_BAD_NAME_CHARS = re.compile(r"[/\\\x00-\x1f\x7f]")
# Longest file name Linux allows (NAME_MAX).
_NAME_MAX = 255
# Index metadata values are carried into reports as strings, cut to this length.
_METADATA_CHARS = 256


def _invalid(code: str, message: str) -> InvalidModel:
    return InvalidModel(f"checkpoint index: {message}", code=code)


@dataclass(frozen=True, slots=True)
class ShardIndex:
    """A checked index: which shard holds each tensor, and the shards in first-seen order."""

    weight_map: dict[str, str]
    shards: tuple[str, ...]
    total_size: int | None
    metadata: dict[str, str]


def check_shard_name(name: object) -> str:
    """``name`` if it is a plain ``*.safetensors`` file name; raise ``bad_shard_name``."""
    if (
        not isinstance(name, str)
        or not name.endswith(SHARD_SUFFIX)
        or name.startswith(".")
        or len(name.encode("utf-8", "surrogatepass")) > _NAME_MAX
        or _BAD_NAME_CHARS.search(name)
        or (len(name) >= 2 and name[1] == ":")  # a Windows drive, as huggingface_hub refuses
    ):
        raise _invalid(
            "bad_shard_name",
            f"shard {show(name)} is not a plain '*{SHARD_SUFFIX}' file name in the index's folder",
        )
    return name


def parse_index(raw: bytes, caps: InspectionCaps) -> ShardIndex:
    """Check the bytes of an index file; raise ``InvalidModel`` naming the first defect."""
    if len(raw) > caps.max_index_bytes:
        raise too_large(len(raw), caps)
    document = parse_object(raw, _invalid, "index")
    unknown = sorted(set(document) - {"metadata", "weight_map"})
    if unknown:
        raise _invalid("bad_index", f"unknown top-level key {show(unknown[0])}")
    weight_map = document.get("weight_map")
    if not isinstance(weight_map, dict):
        raise _invalid("bad_index", f"weight_map is {json_type(weight_map)}, not an object")
    if len(weight_map) > caps.max_tensors:
        raise _invalid(
            "too_many_tensors",
            f"weight_map has {len(weight_map)} entries, over the cap of {caps.max_tensors}",
        )
    shards: dict[str, None] = {}
    for shard in weight_map.values():
        if shard not in shards:
            shards[check_shard_name(shard)] = None
            if len(shards) > caps.max_shards:
                raise _invalid("too_many_shards", f"more than {caps.max_shards} shards (the cap)")
    if not shards:
        raise _invalid("bad_index", "weight_map is empty")
    metadata = document.get("metadata", {})
    if not isinstance(metadata, dict):
        raise _invalid("bad_index", f"metadata is {json_type(metadata)}, not an object")
    return ShardIndex(
        weight_map=weight_map,
        shards=tuple(sorted(shards)),
        total_size=_total_size(metadata.get("total_size")),
        metadata=_as_strings(metadata, caps.max_metadata_entries),
    )


def too_large(size: int, caps: InspectionCaps) -> InvalidModel:
    """The refusal of an index file over ``max_index_bytes``."""
    return _invalid("index_too_large", f"{size} bytes, over the cap of {caps.max_index_bytes}")


def _total_size(value: object) -> int | None:
    if value is None:
        return None
    # Integral floats: older writers summed sizes as floats (e.g. 26953662464.0).
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _invalid("bad_index", f"metadata.total_size is {show(value)}, not a byte count")
    return value


def _as_strings(metadata: Mapping[str, Any], cap: int) -> dict[str, str]:
    items = list(metadata.items())[:cap]
    return {
        key: (value if isinstance(value, str) else json.dumps(value))[:_METADATA_CHARS]
        for key, value in items
    }


def check_coverage(index: ShardIndex, held: Mapping[str, Sequence[str]], tensor_bytes: int) -> None:
    """Every tensor of every shard (``held``: shard -> tensor names) named in the index
    exactly once, with the right shard, and vice versa; ``total_size`` equal to
    ``tensor_bytes``. Raise ``InvalidModel`` otherwise."""
    owner: dict[str, str] = {}
    for shard, names in held.items():
        for name in names:
            first = owner.setdefault(name, shard)
            if first != shard:
                raise _invalid(
                    "tensor_in_two_shards",
                    f"tensor {show(name)} is in both {show(first)} and {show(shard)}",
                )
    for name, shard in owner.items():
        listed = index.weight_map.get(name)
        if listed != shard:
            where = "does not name it" if listed is None else f"names {show(listed)}"
            raise _invalid(
                "unlisted_tensor",
                f"shard {show(shard)} holds tensor {show(name)}, but the index {where}",
            )
    if len(owner) != len(index.weight_map):
        name = next(n for n in index.weight_map if n not in owner)
        raise _invalid(
            "missing_tensor",
            f"the index puts tensor {show(name)} in {show(index.weight_map[name])}, "
            "which does not hold it",
        )
    if index.total_size is not None and index.total_size != tensor_bytes:
        raise _invalid(
            "total_size_mismatch",
            f"metadata.total_size is {index.total_size}, the shards hold {tensor_bytes} "
            "bytes of tensor data",
        )
