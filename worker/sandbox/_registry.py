"""The load child's registry of loaders and readers, and what every loader answers with.

Stdlib only, like everything the child imports. ``loaders`` (and the tests' extra
loaders, preloaded into the fork server) register here; ``_child`` looks them up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loadwarden.worker.sandbox import _protocol
from loadwarden.worker.sandbox.spec import ChildSpec

Spec = ChildSpec
Loader = Callable[[int, Spec], dict[str, Any]]

#: Loaders by name; tests register extra ones from a module preloaded into the fork server.
LOADERS: dict[str, Loader] = {}


class FileChanged(Exception):
    """The file handed to the child is not the one the supervisor inspected."""


class ManifestMismatch(Exception):
    """The loader returned other tensors than the header inspection found."""


def register_loader(name: str) -> Callable[[Loader], Loader]:
    def decorate(fn: Loader) -> Loader:
        LOADERS[name] = fn
        return fn

    return decorate


#: Readers by loader name: every tensor of one file in memory, with its manifest entries
#: (``loaders`` registers them).
#: A checkpoint's shards are read one after the other and all kept (``load_files``).
Entry = tuple[str, str, list[int], int]
Reader = Callable[[int, Spec], tuple[list[Entry], object]]
READERS: dict[str, Reader] = {}


def register_reader(name: str) -> Callable[[Reader], Reader]:
    def decorate(fn: Reader) -> Reader:
        READERS[name] = fn
        return fn

    return decorate


def load_files(fds: list[int], spec: Spec) -> dict[str, Any]:
    """Load every file of a checkpoint into memory, all held at once (the model must fit
    whole), and say what each shard held. No digests: the supervisor hashes every shard
    itself (``loadwarden.worker.load._digest``) and checks what its source promised."""
    read = READERS[spec.loader]
    held: list[object] = []
    shards: list[list[Entry]] = []
    for fd in fds:
        entries, arrays = read(fd, spec)
        held.append(arrays)
        shards.append(entries)
    files = [
        {
            "name": entry.name,
            "tensors": len(entries),
            "bytes": sum(nbytes for _, _, _, nbytes in entries),
        }
        for entry, entries in zip(spec.files or (), shards, strict=True)
    ]
    result = finish([e for entries in shards for e in entries], spec)
    del held
    return {**result, "files": files}


def finish(entries: list[tuple[str, str, list[int], int]], spec: Spec) -> dict[str, Any]:
    """A loader's answer: its manifest digest, checked against the spec.

    The file's sha256 is not the loader's business: the supervisor hashes the file
    itself (``loadwarden.worker.load._digest``), where a compromised loader cannot lie.
    """
    result: dict[str, Any] = {
        "tensors": len(entries),
        "bytes": sum(nbytes for _, _, _, nbytes in entries),
        "manifest_digest": _protocol.manifest_digest(entries),
        "sha256": None,
    }
    expected = spec.manifest_digest
    if expected and result["manifest_digest"] != expected:
        raise ManifestMismatch("the loader returned other tensors than the header declares")
    return result
