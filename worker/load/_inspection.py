"""The inspection step: every header checked before any loader runs, in-process or confined."""

from __future__ import annotations

import math
from collections.abc import Callable

from loadwarden.producer.contract import LoadRequest, ModelSummary
from loadwarden.worker._files import OpenedModel
from loadwarden.worker._tasks import in_thread
from loadwarden.worker.config import InspectionCaps
from loadwarden.worker.formats import needs_isolation
from loadwarden.worker.load._deadline import JobDeadline
from loadwarden.worker.load._model import inspect_opened, shard_format
from loadwarden.worker.sandbox._protocol import manifest_digest
from loadwarden.worker.sandbox.inspector import inspect_in_child

#: A model of at most this many bytes (all files) is inspected, and its manifest hashed, on
#: the event loop: reading and parsing 64 KiB of already-open regular files costs less than
#: the thread hop (and the thread never protected the loop from a slow parse: the GIL).
INLINE_MAX_BYTES = 64 * 1024


def is_tiny(opened: OpenedModel) -> bool:
    """Whether every file together is small enough to inspect on the event loop."""
    return sum(shard.file.size for shard in opened.files) <= INLINE_MAX_BYTES


def manifest_of(summary: ModelSummary) -> str:
    return manifest_digest([(t.name, t.dtype, t.shape, t.bytes) for t in summary.tensors])


async def manifest_for(opened: OpenedModel, summary: ModelSummary) -> str:
    """The manifest digest the child's answer must repeat: off the event loop (it hashes the
    whole manifest) unless the model is tiny."""
    return (
        manifest_of(summary) if is_tiny(opened) else await in_thread(lambda: manifest_of(summary))
    )


async def inspect_bounded(
    opened: OpenedModel,
    request: LoadRequest,
    caps: InspectionCaps,
    budget_bytes: int,
    deadline: JobDeadline,
    here: Callable[[OpenedModel, LoadRequest], ModelSummary],
) -> ModelSummary:
    """Inspect in-process with ``here`` (a thread; on the loop for a tiny model) when every
    header is small, else each file whose header may be large in its own confined child, one
    after the other, and the rest here."""
    if is_tiny(opened) and caps.isolate_above_bytes >= INLINE_MAX_BYTES:
        return here(opened, request)
    large = await in_thread(
        lambda: [needs_isolation(s.file, caps.isolate_above_bytes) for s in opened.files]
    )
    if not any(large):
        return await in_thread(lambda: here(opened, request))
    found: list[ModelSummary | None] = []
    for shard, isolate in zip(opened.files, large, strict=True):
        if not isolate:
            found.append(None)
            continue
        found.append(
            await inspect_in_child(
                shard.file,
                declared=shard_format(opened, request.format),
                caps=caps,
                budget_bytes=budget_bytes,
                memory_bytes=caps.child_memory_bytes,
                cpu_seconds=max(1, min(caps.child_cpu_seconds, math.ceil(deadline.remaining_s()))),
                max_answer_bytes=caps.max_summary_bytes,
            )
        )
    return await in_thread(
        lambda: inspect_opened(
            opened,
            declared=request.format,
            caps=caps,
            budget_bytes=budget_bytes,
            inspected=found,
        )
    )
