"""One model, many files: inspect every shard, sum them into one summary, check the index,
and fill in the digests the supervisor computed."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from loadwarden.producer.contract import Limits, ModelFormat, ModelSummary, ShardInfo
from loadwarden.producer.errors import InvalidModel, LoadError, SourceRefused
from loadwarden.worker._files import ModelFile, OpenedModel
from loadwarden.worker.config import InspectionCaps
from loadwarden.worker.formats import inspect_model
from loadwarden.worker.formats._common import over_budget
from loadwarden.worker.formats.index import check_coverage
from loadwarden.worker.sandbox.spec import ChildSpec, FileIdentity, SpecFile

if TYPE_CHECKING:
    from loadwarden.worker.config import Settings
    from loadwarden.worker.load._outcome import LoadedModel


def shard_format(opened: OpenedModel, declared: ModelFormat | None) -> ModelFormat | None:
    """The format each file must have: an index names safetensors shards."""
    return ModelFormat.SAFETENSORS if opened.index is not None else declared


def inspect_opened(
    opened: OpenedModel,
    *,
    declared: ModelFormat | None,
    caps: InspectionCaps,
    budget_bytes: int | None,
    inspected: Sequence[ModelSummary | None] | None = None,
) -> ModelSummary:
    """Inspect every file (no loader, no child); a checkpoint's summary sums its shards.

    ``inspected`` holds the summaries already found elsewhere (a confined child's, for
    a header that may be large), by file; the files without one are inspected here.
    Raises what ``inspect_model`` raises, the index's coverage errors, ``format_mismatch``
    for a checkpoint whose shards are not all of one format, and ``over_budget`` on the
    total.
    """
    found = list(inspected) if inspected is not None else [None] * len(opened.files)
    summaries = [
        summary
        if summary is not None
        else inspect_model(
            shard.file.fd,
            shard.file.size,
            path=shard.file.path,
            declared=shard_format(opened, declared),
            caps=caps,
            budget_bytes=budget_bytes,
        ).summary
        for shard, summary in zip(opened.files, found, strict=True)
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
    """The spec's part about the files (``ChildSpec``'s ``expect`` or ``files``): one file's
    identity, or each shard's name and identity. No digest: the loader never learns what
    the file should hash to (the supervisor hashes every file and checks them,
    ``with_digests``)."""

    def identity(f: ModelFile) -> FileIdentity:
        return FileIdentity(dev=f.dev, ino=f.ino, size=f.size)

    if not opened.checkpoint:
        return {"expect": identity(opened.first)}
    return {"files": tuple(SpecFile(s.name, identity(s.file)) for s in opened.files)}


def child_spec(
    opened: OpenedModel,
    loader: str,
    manifest: str,
    limits: Limits,
    settings: Settings,
    *,
    landlock: bool,
) -> ChildSpec:
    """What the child is told: its loader, limits, confinement, the files and the manifest
    digest its answer must repeat."""
    return ChildSpec(
        loader=loader,
        memory_bytes=limits.memory_bytes,
        cpu_seconds=limits.cpu_seconds,
        max_fds=settings.child_max_fds,
        address_space_limit=settings.use_address_space_limit,
        landlock=landlock,
        manifest_digest=manifest,
        **child_files(opened),
    )


def needs_digests(opened: OpenedModel, expected_sha256: str | None) -> bool:
    """Whether the supervisor hashes this model's files: a pinned digest, a cache blob
    named by its digest, or a checkpoint (whose report lists each shard's sha256)."""
    return (
        expected_sha256 is not None
        or opened.checkpoint
        or any(s.expected_sha256 for s in opened.files)
    )


def checkpoint_digest(files: list[tuple[str, str]]) -> str:
    """The sha256 of ``sha256sum``'s output for the shards, sorted by file name: a
    checkpoint's own digest, which a request's ``sha256`` pins
    (``LC_ALL=C sha256sum $(ls model-*.safetensors) | sha256sum``)."""
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def with_digests(
    summary: ModelSummary,
    opened: OpenedModel,
    loaded: LoadedModel,
    digests: Sequence[str] | None,
    expected_sha256: str | None,
) -> tuple[ModelSummary, LoadError | None]:
    """The summary with the digests the supervisor computed (``digests``, one per file; a
    checkpoint's own derived from its shards'), and the error if the child answered for
    other files, or a digest contradicts a cache blob's name or the request's ``sha256``."""
    if summary.shards is not None and (
        loaded.files is None
        or [f.name for f in loaded.files] != [shard.file for shard in summary.shards]
    ):
        return summary, InvalidModel(
            "the loader answered for other files than it was given", code="manifest_mismatch"
        )
    if digests is None:
        return summary, None
    # Here, not at the top: _digest imports asyncio, which ``inspect`` (it imports this
    # module for ``inspect_opened``) runs without.
    from loadwarden.worker.load._digest import check_digest

    for shard, digest in zip(opened.files, digests, strict=True):
        if shard.expected_sha256 not in (None, digest):
            return summary, InvalidModel(
                f"sha256 of {shard.name} is {digest}, its source names it {shard.expected_sha256}",
                code="sha256_mismatch",
            )
    if summary.shards is None:
        summary = summary.model_copy(update={"sha256": digests[0]})
        mismatch = check_digest(digests[0], expected_sha256) if expected_sha256 else None
        return summary, mismatch
    shards = [
        shard.model_copy(update={"sha256": digest})
        for shard, digest in zip(summary.shards, digests, strict=True)
    ]
    digest = checkpoint_digest([(s.name, d) for s, d in zip(opened.files, digests, strict=True)])
    summary = summary.model_copy(update={"shards": shards, "sha256": digest})
    if expected_sha256 not in (None, digest):
        return summary, InvalidModel(
            f"the checkpoint's digest (sha256 of its shards' sha256sum lines) is {digest}, "
            f"the request expects {expected_sha256}",
            code="sha256_mismatch",
        )
    return summary, None
