"""Open a checkpoint held in a folder: its index, then every shard the index names.

A folder is opened as a descriptor, and each file in it by name relative to that
descriptor, with ``O_NOFOLLOW``: nothing is reached by a path that could be
swapped, and no shard name can lead out (``formats.index.check_shard_name``
already refused separators and ``..``; a symlink is refused here). The Hugging
Face cache plugs in its own ``Opener``, which follows a snapshot's symlinks into
its ``blobs/`` and nowhere else.

A folder holds a checkpoint when it has exactly one ``*.safetensors.index.json``,
else a ``model.safetensors``, else exactly one ``*.safetensors`` file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable

from loadwarden.producer.errors import InvalidModel, LoadError, SourceRefused, SourceUnavailable
from loadwarden.worker._files import (
    ModelFile,
    OpenedModel,
    Shard,
    SignatureFile,
    _os_error,
    _refuse_special,
)
from loadwarden.worker.config import InspectionCaps
from loadwarden.worker.formats._common import read_at
from loadwarden.worker.formats.index import (
    INDEX_SUFFIX,
    SHARD_SUFFIX,
    parse_index,
    too_large,
)

#: Opens one file of the checkpoint by its plain name.
Opener = Callable[[str], Shard]

#: The single-file checkpoint save_pretrained writes.
SINGLE_FILE = "model.safetensors"
#: Where a model's signature lies (model-signing's own default name): in a checkpoint's
#: folder, and beside a single file as ``FILE.sig`` (several files may share a folder).
FOLDER_SIGNATURE = "model.sig"
SIGNATURE_SUFFIX = ".sig"
#: A signed manifest costs ~250 bytes of bundle per file: 4 MiB is ~17,000 files, far
#: more than any model folder. Verifying holds ~7 times the bundle's size at its peak
#: (text, parsed JSON, the decoded payload, DSSE's encoding of it: 27 MiB for 4 MiB,
#: measured), so this bounds a job's signature to well under 64 MiB of the supervisor.
MAX_SIGNATURE_BYTES = 4 * 1024 * 1024
#: Entries read from a folder while looking for its checkpoint: a model folder holds
#: tens of files; one with more is not a checkpoint we should scan to the end.
MAX_FOLDER_ENTRIES = 100_000

# O_NONBLOCK: a FIFO swapped in after the fstatat does not block the open; fstat sees it.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def folder_opener(dir_fd: int, folder: str, source: str) -> Opener:
    """Open regular files directly in the folder on ``dir_fd``; a symlink is refused."""

    def open_file(name: str) -> Shard:
        return Shard(name, open_regular(dir_fd, name, os.path.join(folder, name), source))

    return open_file


def open_regular(dir_fd: int, name: str, path: str, source: str) -> ModelFile:
    """Open ``name`` in ``dir_fd`` if it is a regular file, checked before and after the open."""
    try:
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        raise _os_error(path, exc) from exc
    if stat.S_ISLNK(before.st_mode):
        raise SourceRefused(
            f"{path!r} (in {source!r}) is a symlink; files of a checkpoint folder are not"
            " followed (name the files themselves, or use hf:// for a Hugging Face cache)",
            code="symlink",
        )
    _refuse_special(path, before.st_mode)
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise SourceRefused(
                f"{path!r} changed while it was opened", code="file_changed"
            ) from exc
        raise _os_error(path, exc) from exc
    try:
        after = os.fstat(fd)
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino) or not stat.S_ISREG(
            after.st_mode
        ):
            raise SourceRefused(f"{path!r} changed while it was opened", code="file_changed")
        return ModelFile.adopt(path, fd, after)
    except BaseException:
        os.close(fd)
        raise


def open_folder(
    dir_fd: int, folder: str, source: str, caps: InspectionCaps, opener: Opener
) -> OpenedModel:
    """The checkpoint in the folder on ``dir_fd`` (readable, not ``O_PATH``), opened."""
    name = choose_entry(list_names(dir_fd, folder), folder)
    if name.endswith(INDEX_SUFFIX):
        return open_indexed(opener(name), caps, opener)
    opened = OpenedModel([opener(name)], checkpoint=True)
    opened.signature = read_signature(opener, FOLDER_SIGNATURE, opened)
    return opened


def read_signature(opener: Opener, name: str, opened: OpenedModel) -> SignatureFile | None:
    """The signature file ``name`` the opener finds (None when there is none), read whole,
    bounded; an unusable one keeps its error. On a bug, ``opened`` is closed."""
    try:
        with opener(name).file as file:
            if file.size > MAX_SIGNATURE_BYTES:
                raise SourceRefused(
                    f"{name} holds {file.size} bytes, over {MAX_SIGNATURE_BYTES}",
                    code="signature_invalid",
                )
            return SignatureFile(name, raw=read_at(file.fd, file.size, 0))
    except SourceUnavailable as exc:
        return None if exc.code == "not_found" else SignatureFile(name, problem=exc)
    except LoadError as exc:
        return SignatureFile(name, problem=exc)
    except BaseException:
        opened.close()
        raise


def list_names(dir_fd: int, folder: str) -> list[str]:
    """Names in a folder, at most ``MAX_FOLDER_ENTRIES`` of them."""
    names: list[str] = []
    try:
        with os.scandir(dir_fd) as entries:
            for entry in entries:
                names.append(entry.name)
                if len(names) > MAX_FOLDER_ENTRIES:
                    raise InvalidModel(
                        f"{folder!r} holds more than {MAX_FOLDER_ENTRIES} entries; "
                        "not a checkpoint folder",
                        code="no_checkpoint",
                    )
    except OSError as exc:
        raise _os_error(folder, exc) from exc
    return names


def choose_entry(names: list[str], folder: str) -> str:
    """Which file of a folder names its checkpoint (see the module docstring)."""
    indexes = sorted(n for n in names if n.endswith(INDEX_SUFFIX))
    if len(indexes) > 1:
        raise InvalidModel(
            f"{folder!r} holds {len(indexes)} checkpoint indexes ({', '.join(indexes[:4])}); "
            "name the one to load",
            code="ambiguous_checkpoint",
        )
    if indexes:
        return indexes[0]
    if SINGLE_FILE in names:
        return SINGLE_FILE
    singles = sorted(n for n in names if n.endswith(SHARD_SUFFIX))
    if len(singles) == 1:
        return singles[0]
    found = f"{len(singles)} .safetensors files but no index" if singles else "no safetensors file"
    raise InvalidModel(
        f"{folder!r} holds no checkpoint: {found} (expected one *{INDEX_SUFFIX} "
        f"or a {SINGLE_FILE})",
        code="no_checkpoint",
    )


def open_indexed(index: Shard, caps: InspectionCaps, opener: Opener) -> OpenedModel:
    """Read and check the index open in ``index``, then open every shard it names."""
    opened = OpenedModel([], checkpoint=True, index_name=index.name)
    try:
        with index.file:
            raw = read_index_bytes(index.file, caps, index.expected_git_sha1)
            opened.index = parsed = parse_index(raw, caps)
            opened.index_sha256 = hashlib.sha256(raw).hexdigest()
        seen: dict[tuple[int, int], str] = {}
        for name in parsed.shards:
            shard = opener(name)
            opened.files.append(shard)
            identity = (shard.file.dev, shard.file.ino)
            if identity in seen:
                raise InvalidModel(
                    f"checkpoint index: shards {seen[identity]!r} and {name!r} are one file",
                    code="duplicate_shard",
                )
            seen[identity] = name
    except BaseException:
        opened.close()
        raise
    opened.signature = read_signature(opener, FOLDER_SIGNATURE, opened)
    return opened


def read_index_bytes(index: ModelFile, caps: InspectionCaps, git_sha1: str | None = None) -> bytes:
    """The index's bytes (size checked before any read), checked against the git blob
    sha1 that names it in a hub cache."""
    if index.size > caps.max_index_bytes:
        raise too_large(index.size, caps)
    raw = read_at(index.fd, index.size, 0)
    if len(raw) != index.size:
        raise InvalidModel(
            "checkpoint index: the file shrank while it was read", code="file_changed"
        )
    if git_sha1 is not None:
        # How git names a blob: sha1 of "blob <size>\0" and the content.
        actual = hashlib.sha1(b"blob %d\0" % len(raw) + raw, usedforsecurity=False).hexdigest()
        if actual != git_sha1:
            raise InvalidModel(
                f"checkpoint index: its cache blob is named {git_sha1}, its content is {actual}",
                code="blob_mismatch",
            )
    return raw
