"""Signed models: verify an OpenSSF model-signing bundle before any child starts.

A load that some rule requires to be signed (the worker's ``signing`` settings, a
catalog entry's or a request's ``signed_by``) goes on only if the signature file
the source opener read (``FILE.sig`` beside a single file, ``model.sig`` in a
checkpoint's folder) verifies under a key the worker trusts, that key belongs to
a signer every rule accepts, and the signed manifest names every file we load
with the sha256 we compute, from the very descriptors the child will be given.
The supervisor hashes them again while the child loads (``_digest``) and checks
those digests against the manifest too, so a file rewritten in place after the
check is caught as a changed file is.

Why not ``model_signing.verifying.Config.verify``: it takes paths, and opens and
hashes every file of the folder by name, so what it checks need not be what we
load (a shard renamed over between its hash and our open), and it follows no
rule of ours about symlinks, FIFOs or sizes. We use the library for what it is
for: parsing the Sigstore bundle and verifying its DSSE signature and the
manifest it signs (``Verifier.verify``); the files' digests are ours. That keeps
us to what both sides agree on: the default ``files`` serialization with
sha256 (the only one whose digests are whole-file sha256s, as ours are).

model-signing (with sigstore, protobuf and pyOpenSSL: ~1 s and ~600 modules to
import) is the ``loadwarden[signing]`` extra, imported (``_bundle``) only by a worker
that trusts a signer; a worker without it refuses to start with trusted signers
(``TrustError``), and refuses any load that must be signed (``signing_unavailable``).

Outcomes, all ``refused`` (``SourceRefused``), each with its code::

    signature_missing         required, and no signature file is there
    signature_invalid         the file is no bundle, its signature does not verify
                              under the key it names, or a certificate of its chain
                              has expired
    signature_unknown_signer  signed by a key no accepted signer holds
    signature_mismatch        the manifest does not cover a loaded file, or names
                              another digest (also: a serialization we cannot check)
    signing_unavailable       required, but model-signing is not installed here
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadwarden.producer.contract import LoadRequest
from loadwarden.producer.errors import InvalidModel, LoadError, SourceRefused
from loadwarden.producer.sources import is_hf, parse_hf
from loadwarden.worker._files import OpenedModel
from loadwarden.worker.config import SigningPolicy
from loadwarden.worker.load._bundle import (
    Found,
    Requirement,
    Trust,
    TrustError,
    unknown_signer,
    verify_bundle,
)

__all__ = [
    "Requirement",
    "SignatureCheck",
    "Trust",
    "TrustError",
    "check_signature",
    "may_require",
    "note_writes",
    "recheck",
    "required_signers",
    "settled_status",
    "signature_status",
    "signing_installed",
]

#: How a single file's own signature names it (model-signing hashes a file as ".").
_SELF = "."


def may_require(policy: SigningPolicy, request: LoadRequest) -> bool:
    """Whether any rule could ask this load for a signature (``required_signers`` only
    then: it may stat folders, so it runs in a thread, a hop a tiny load should not pay)."""
    return policy.requires_any or bool(request.signed_by)


def required_signers(
    policy: SigningPolicy, request: LoadRequest, opened: OpenedModel
) -> Requirement | None:
    """The requirement on this load, or None when no rule asks for a signature.

    Rules: the worker's ``require``, ``roots`` holding the model's files (by their real
    paths, as opened, whatever the source) or the path the source names, ``hf_orgs`` for
    hf:// sources, and the request's ``signed_by``.
    ``*`` is every signer the worker trusts; a name it does not trust admits nothing.
    """
    rules: list[tuple[str, Sequence[str]]] = []
    if policy.require:
        rules.append(("signing.require", policy.require))
    if is_hf(request.source):
        # The hub's names are case-insensitive (it serves Org/x as org/x, and a cache keeps
        # the spelling it was downloaded with): a rule for an organisation holds for any.
        org = parse_hf(request.source)[0].split("/")[0].casefold()
        for name, names in policy.hf_orgs.items():
            if name.casefold() == org:
                rules.append((f"signing.hf_orgs[{name}]", names))
    # By the files' opened paths, whatever the source's spelling (a local path may hold
    # "://": ROOT/x://../m.safetensors is ROOT/m.safetensors, through a folder "x:"), and
    # by the path the source names: a symlink planted under a root, to a model outside
    # it, is a model of that root as requested.
    paths = [shard.file.path for shard in opened.files]
    if request.source.startswith("/"):
        # "//ROOT" is ROOT to the kernel, but normpath keeps a leading "//" (POSIX).
        paths.append(os.path.normpath("/" + request.source.lstrip("/")))
    for root, names in policy.roots.items():
        if _under(paths, root):
            rules.append((f"signing.roots[{root}]", names))
    if request.signed_by:
        rules.append(("the request's signed_by", request.signed_by))
    if not rules:
        return None
    trusted = frozenset(policy.signers)
    allowed = trusted
    for _, accepted in rules:
        allowed &= trusted if "*" in accepted else frozenset(accepted)
    return Requirement(allowed, tuple(f"{where}: {', '.join(n)}" for where, n in rules))


def _under(paths: Iterable[str], root: Path) -> bool:
    """Whether a path lies under ``root``: by its spelling, else by the identity (device,
    inode) of a folder on its way. A path names a folder by another name on a
    case-insensitive filesystem (a CIFS share: ROOT/../PROD for ROOT/../prod) or through a
    bind mount; a rule must not be left behind by a spelling."""
    paths = list(paths)
    spellings = {os.path.normpath(root), os.path.realpath(root)}
    if any(p == r or p.startswith(r.rstrip("/") + "/") for p in paths for r in spellings):
        return True
    try:
        st = os.stat(root)
    except OSError:
        return False
    folders = {a for p in paths for a in _ancestors(p)}
    return any(_same_folder(folder, st) for folder in folders)


def _ancestors(path: str) -> Iterator[str]:
    while (parent := os.path.dirname(path)) != path:
        yield parent
        path = parent


def _same_folder(path: str, root: os.stat_result) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (root.st_dev, root.st_ino)


def signing_installed() -> bool:
    """Whether model-signing can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec("model_signing") is not None
    except (ImportError, ValueError):  # a broken install is not an install
        return False


@dataclass(slots=True)
class SignatureCheck(Found):
    """One load's signature: what is known of it so far (for the report), and the manifest."""

    #: The signed sha256 of each file the load reads, by its name in the model.
    expected: dict[str, str] = field(default_factory=dict)
    #: Each file's (size, mtime, ctime) as its digest was taken for the check.
    stamps: list[tuple[int, int, int]] = field(default_factory=list)
    #: The first file written since (``note_writes``, once the child loaded), if any.
    written: str | None = None


def _stamp(fd: int) -> tuple[int, int, int]:
    """What a write to the file moves, even one written back: its size and times."""
    st = os.fstat(fd)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def recheck(
    check: SignatureCheck | None, opened: OpenedModel, digests: Sequence[str] | None
) -> LoadError | None:
    """The error if a digest the supervisor took while the child loaded is not the signed
    one, or a file was written since it was hashed for the check (even if written back
    since: the child may have read it meanwhile, and our second hash can miss a byte
    flipped and restored between its reads); None without a signature.

    ``note_writes`` compares the times. They are the kernel's (a clock tick, ~1-4 ms,
    unless the filesystem keeps finer ones): a write within a tick of the check's
    ``fstat`` is caught only by the digest."""
    if check is None:
        return None
    if digests is None:
        return InvalidModel("the signed files were not hashed while loading", code="internal")
    for shard, digest in zip(opened.files, digests, strict=True):
        if check.expected[shard.name] != digest:
            return InvalidModel(
                f"{shard.name} changed after its signature was verified: sha256 {digest} "
                f"while loading, {check.expected[shard.name]} signed",
                code="file_changed",
            )
    if check.written is not None:
        return InvalidModel(
            f"{check.written} was written after its signature was verified (its size or "
            "times moved), while the load could read it",
            code="file_changed",
        )
    return None


def note_writes(check: SignatureCheck | None, opened: OpenedModel) -> None:
    """Note (for ``recheck``) the first file written since the check, while the files are
    still open: call it once the child has loaded them."""
    if check is None:
        return
    for shard, stamp in zip(opened.files, check.stamps, strict=True):
        if _stamp(shard.file.fd) != stamp:
            check.written = shard.name
            return


async def check_signature(
    opened: OpenedModel,
    requirement: Requirement,
    trust: Trust | None,
    check: SignatureCheck,
) -> None:
    """Verify ``opened``'s signature against ``requirement``, filling ``check``; raise the
    refusal. Hashes every file from its descriptor (cancellable) once the bundle verified."""
    sig = opened.signature
    if sig is None:
        raise SourceRefused(
            f"a signature is required ({requirement.describe()}), and there is none: "
            f"expected {_where(opened)}",
            code="signature_missing",
        )
    if sig.raw is None:
        assert sig.problem is not None
        raise SourceRefused(
            f"the signature {sig.name} cannot be used: {sig.problem.message}",
            code="signature_invalid",
        )
    if trust is None:
        if not signing_installed():
            raise SourceRefused(
                "a signature is required, but model-signing is not installed on this worker "
                "(loadwarden[signing])",
                code="signing_unavailable",
            )
        raise unknown_signer(requirement, "a key, and this worker trusts none (signing.signers)")
    # asyncio's helpers: imported for a signature to verify (inspect needs no loop before).
    from loadwarden.worker._tasks import in_thread
    from loadwarden.worker.load._digest import digest_files

    manifest = await in_thread(lambda: verify_bundle(sig, requirement, trust, check))
    check.expected = _covered(opened, manifest)
    check.stamps = [_stamp(s.file.fd) for s in opened.files]
    actual = await digest_files([(s.file.fd, s.file.size) for s in opened.files])
    got = {s.name: d for s, d in zip(opened.files, actual, strict=True)}
    if opened.index_name is not None and opened.index_sha256 is not None:
        got[opened.index_name] = opened.index_sha256
    for name, digest in got.items():
        if check.expected[name] != digest:
            raise SourceRefused(
                f"{name} does not match its signature: sha256 {digest}, "
                f"signed {check.expected[name]}",
                code="signature_mismatch",
            )
    assert check.info is not None
    check.info = check.info.model_copy(update={"verified": True})


async def signature_status(
    opened: OpenedModel, request: LoadRequest, policy: SigningPolicy, trust: Trust | None
) -> tuple[dict[str, Any], LoadError | None]:
    """What ``loadwarden inspect`` says of a model's signature, and the refusal a load would
    meet (None when it would pass). A signature no rule requires is still checked against
    every trusted signer, so an operator sees whether signing it would pass."""
    requirement = required_signers(policy, request, opened)
    settled = _nothing_to_check(requirement, opened, trust)
    if settled is not None:
        return settled, None
    if requirement is None:
        assert trust is not None  # else settled
        requirement = Requirement(frozenset(trust.signers), ("any trusted signer",))
        required = False
    else:
        required = True
    check = SignatureCheck()
    try:
        await check_signature(opened, requirement, trust, check)
    except LoadError as exc:
        document = {
            "status": "refused",
            "required": required,
            "rules": list(requirement.rules),
            "code": exc.code,
            "message": exc.message,
            **(check.info.model_dump(mode="json") if check.info else {}),
        }
        return document, exc if required else None
    assert check.info is not None
    info = check.info.model_dump(mode="json")
    return {"status": "verified", "required": required, **info}, None


def settled_status(
    opened: OpenedModel, request: LoadRequest, policy: SigningPolicy, trust: Trust | None
) -> dict[str, Any] | None:
    """``signature_status``'s answer, found without verifying or hashing anything (no rule
    requires a signature, and there is none or no signer to check it against), or None:
    ``loadwarden inspect`` then needs no event loop (``signature_status`` does the rest)."""
    return _nothing_to_check(required_signers(policy, request, opened), opened, trust)


def _nothing_to_check(
    requirement: Requirement | None, opened: OpenedModel, trust: Trust | None
) -> dict[str, Any] | None:
    sig = opened.signature
    if requirement is not None or (sig is not None and trust is not None):
        return None
    if sig is None:
        return {"status": "none", "required": False}
    reason = "this worker trusts no signer (signing.signers)"
    return {"status": "unchecked", "file": sig.name, "reason": reason, "required": False}


def _where(opened: OpenedModel) -> str:
    if opened.checkpoint:
        return "model.sig in the checkpoint's folder"
    return f"{os.path.basename(opened.first.path)}.sig beside the file"


def _covered(opened: OpenedModel, manifest: dict[str, tuple[str, str]]) -> dict[str, str]:
    """The signed sha256 of every file the load reads, by name; refused if one is missing.

    A single file's own signature names it ``.``; a folder's names files relative to it.
    Files the manifest names and we do not load (a config, a tokenizer) are fine.
    """
    wanted = [s.name for s in opened.files]
    if opened.index_name is not None:
        wanted.append(opened.index_name)
    if not opened.checkpoint and _SELF in manifest:
        return {wanted[0]: manifest[_SELF][1]}
    missing = [name for name in wanted if name not in manifest]
    if missing:
        raise SourceRefused(
            f"the signed manifest does not cover {', '.join(missing[:8])}"
            f"{' …' if len(missing) > 8 else ''} (it covers {len(manifest)} files)",
            code="signature_mismatch",
        )
    return {name: manifest[name][1] for name in wanted}
