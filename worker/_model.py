"""One model, many files: inspect every shard, sum them into one summary, check the index,
and fill in the digests the child computed."""

from __future__ import annotations

import hashlib
from typing import Any

from loadwarden.producer.contract import ModelFormat, ModelSummary, ShardInfo
from loadwarden.producer.errors import InvalidModel, SourceRefused
from loadwarden.producer.settings import InspectionCaps
from loadwarden.worker._files import ModelFile, OpenedModel
from loadwarden.worker._outcome import LoadedModel
from loadwarden.worker.formats import inspect_model
from loadwarden.worker.formats._common import over_budget
from loadwarden.worker.formats.index import check_coverage


def inspect_opened(
    opened: OpenedModel,
    *,
    declared: ModelFormat | None,
    caps: InspectionCaps,
    budget_bytes: int | None,
) -> ModelSummary:
    """Inspect every file (no loader, no child); a checkpoint's summary sums its shards.

    Raises what ``inspect_model`` raises, the index's coverage errors, ``format_mismatch``
    for a checkpoint whose shards are not all of one format, and ``over_budget`` on the
    total.
    """
    summaries = [
        inspect_model(
            shard.file.fd,
            shard.file.size,
            path=shard.file.path,
            declared=ModelFormat.SAFETENSORS if opened.index is not None else declared,
            caps=caps,
            budget_bytes=budget_bytes,
        ).summary
        for shard in opened.files
    ]
    if not opened.checkpoint:
        return summaries[0]
    formats = {s.format for s in summaries}
    if len(formats) != 1 or (declared is not None and declared not in formats):
        raise SourceRefused(
            f"the checkpoint's files are {', '.join(sorted(formats))}, not one declared format",
            code="format_mismatch",
        )
    total = sum(s.bytes for s in summaries)
    if opened.index is not None:
        held = {
            shard.name: [t.name for t in s.tensors]
            for shard, s in zip(opened.files, summaries, strict=True)
        }
        check_coverage(opened.index, held, total)
    if budget_bytes is not None and total > budget_bytes:
        raise over_budget("checkpoint", total, budget_bytes)
    dtypes: dict[str, int] = {}
    for s in summaries:
        for dtype, count in s.dtypes.items():
            dtypes[dtype] = dtypes.get(dtype, 0) + count
    return ModelSummary(
        format=summaries[0].format,
        file_bytes=sum(s.file_bytes for s in summaries),
        bytes=total,
        parameters=sum(s.parameters for s in summaries),
        dtypes=dict(sorted(dtypes.items())),
        tensors=[t for s in summaries for t in s.tensors],
        metadata=opened.index.metadata if opened.index is not None else summaries[0].metadata,
        shards=[
            ShardInfo(
                file=shard.name, file_bytes=s.file_bytes, bytes=s.bytes, tensors=len(s.tensors)
            )
            for shard, s in zip(opened.files, summaries, strict=True)
        ],
    )


def child_files(opened: OpenedModel) -> dict[str, Any]:
    """The spec's part about the files: one file's identity, or each shard's name,
    identity and promised digest (every shard is hashed, and checked against a cache
    blob's name, in the child; the checkpoint's own digest is checked by ``with_digests``)."""

    def identity(f: ModelFile) -> dict[str, int]:
        return {"dev": f.dev, "ino": f.ino, "size": f.size}

    if not opened.checkpoint:
        return {"expect": identity(opened.first)}
    files = [
        {"name": s.name, "expect": identity(s.file), "sha256": s.expected_sha256}
        for s in opened.files
    ]
    return {"sha256": None, "files": files}


def checkpoint_digest(files: list[tuple[str, str]]) -> str:
    """The sha256 of ``sha256sum``'s output for the shards, sorted by file name: a
    checkpoint's own digest, which a request's ``sha256`` pins
    (``LC_ALL=C sha256sum $(ls model-*.safetensors) | sha256sum``)."""
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def with_digests(
    summary: ModelSummary, loaded: LoadedModel, expected_sha256: str | None
) -> tuple[ModelSummary, InvalidModel | None]:
    """The summary with the digests the child computed (a checkpoint's, shard by shard),
    and the error if they contradict the request's ``sha256`` or the files handed over."""
    if summary.shards is None or loaded.files is None:
        return summary.model_copy(update={"sha256": loaded.sha256}), None
    if [f.name for f in loaded.files] != [shard.file for shard in summary.shards]:
        return summary, InvalidModel(
            "the loader answered for other files than it was given", code="manifest_mismatch"
        )
    shards = [
        shard.model_copy(update={"sha256": f.sha256})
        for shard, f in zip(summary.shards, loaded.files, strict=True)
    ]
    digest = checkpoint_digest([(f.name, f.sha256) for f in loaded.files])
    summary = summary.model_copy(update={"shards": shards, "sha256": digest})
    if expected_sha256 not in (None, digest):
        return summary, InvalidModel(
            f"the checkpoint's digest (sha256 of its shards' sha256sum lines) is {digest}, "
            f"the request expects {expected_sha256}",
            code="sha256_mismatch",
        )
    return summary, None
