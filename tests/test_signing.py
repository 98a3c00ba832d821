"""Signed models: a signature policy admits models signed by a trusted key (a single file and
a sharded checkpoint, local and hf://) and refuses the rest before any child starts."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from safetensors.numpy import load_file, save_file

from loadwarden.producer.catalog import parse_catalog
from loadwarden.producer.contract import LoadReport, LoadRequest, Outcome
from loadwarden.producer.errors import SourceRefused
from loadwarden.worker._files import OpenedModel, open_model_file
from loadwarden.worker.config import Settings, SigningPolicy, TrustedSigner
from loadwarden.worker.load import _checks as checks_module
from loadwarden.worker.load.signing import may_require, required_signers
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.sandbox.children import SandboxError
from tests.checkpoints import INDEX, cache_snapshot, save_pretrained, state_dict
from tests.signatures import expired_certificates, make_certificates, make_key, policy, sign
from tests.test_cli import run

REPO = "example-org/tiny-llama"
SHARD_BYTES = 40_000
Keys = dict[str, tuple[Path, Path]]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """Key pairs: acme and beta are trusted by the worker, mallory is not."""
    folder = tmp_path_factory.mktemp("keys")
    return {name: make_key(folder, name) for name in ("acme", "beta", "mallory")}


def trusting(keys: Keys, **rules: Any) -> SigningPolicy:
    return policy({name: keys[name][1] for name in ("acme", "beta")}, **rules)


async def load(
    signing: SigningPolicy, source: Path | str, **request: Any
) -> tuple[LoadReport, int]:
    """One load by a supervisor with this policy, and how many children its fork server
    started (it starts only when a load needs a child)."""
    sup = Supervisor(Settings(signing=signing))
    try:
        report = await sup.load(LoadRequest(source=str(source), **request))
        return report, sup.forkserver.spawned
    finally:
        await sup.close()


def refused(report: LoadReport, code: str) -> None:
    assert report.outcome is Outcome.REFUSED, report.error
    assert report.error is not None and report.error.code == code, report.error


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A sharded BF16 checkpoint as save_pretrained writes it (and its config, unloaded)."""
    folder = tmp_path / "ckpt"
    assert len(save_pretrained(folder, state_dict(), SHARD_BYTES)) >= 3
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def rewrite_tensor_data(shard: Path) -> None:
    """Same header, same size, other tensor values: a shard swapped for a doctored one."""
    tensors = load_file(str(shard))
    first = next(iter(tensors))
    tensors[first] = np.zeros_like(tensors[first])
    shard.unlink()  # a new file (new inode), as a swap is
    save_file(tensors, str(shard), metadata={"format": "pt"})


# --- admitted -----------------------------------------------------------------------------


async def test_signed_single_file_loads_and_names_its_signer(small_model: Path, keys: Keys) -> None:
    """A single file signed into FILE.sig by a trusted key loads; the report names the signer,
    the signature file's digest and the manifest's root digest."""
    signature = sign(small_model, keys["acme"][0])
    report, spawned = await load(trusting(keys, require=["acme"]), small_model)
    assert report.outcome is Outcome.OK, report.error
    sig = report.signature
    assert sig is not None and sig.verified and sig.signer == "acme"
    assert sig.file == small_model.name + ".sig" and sig.files == 1
    assert sig.sha256 == hashlib.sha256(signature.read_bytes()).hexdigest()
    assert sig.model_sha256 is not None and len(sig.model_sha256) == 64
    assert spawned == 1


@pytest.mark.parametrize("how", ["folder", "index", "hf"])
async def test_signed_checkpoint_loads(
    how: str, checkpoint: Path, keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint whose folder's model.sig covers every shard and the index loads, named
    by its folder, its index or hf:// (an organisation's rule); the manifest may also cover
    files the load does not read (config.json)."""
    sign(checkpoint, keys["beta"][0])
    if how == "hf":
        cache = tmp_path / "hub"
        cache_snapshot(cache, REPO, checkpoint)
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        source, rules = f"hf://{REPO}", {"hf_orgs": {"example-org": ["*"]}}
    else:
        source = str(checkpoint / INDEX) if how == "index" else str(checkpoint)
        rules = {"roots": {str(checkpoint.parent): ["beta"]}}
    report, spawned = await load(trusting(keys, **rules), source)
    assert report.outcome is Outcome.OK, report.error
    assert report.signature is not None and report.signature.signer == "beta"
    assert report.signature.files == len(shards(checkpoint)) + 2  # the index and config.json
    assert spawned == 1


@pytest.mark.parametrize("pki", ["corp", "rogue"])
async def test_certificate_signed_model_is_checked_against_the_trusted_chain(
    small_model: Path, tmp_path: Path, pki: str
) -> None:
    """A signature by a certificate issued under a trusted CA (certificate_chain) names that
    signer; one issued under another CA is an unknown signer, with no child."""
    trusted_key, trusted_cert, trusted_ca = make_certificates(tmp_path, "corp")
    key, cert, ca = (
        (trusted_key, trusted_cert, trusted_ca)
        if pki == "corp"
        else make_certificates(tmp_path, "rogue")
    )
    sign(small_model, key, certificate=(cert, ca))
    signing = SigningPolicy(
        signers={"corp": TrustedSigner(certificate_chain=(trusted_ca,))}, require=("corp",)
    )
    report, spawned = await load(signing, small_model)
    if pki == "corp":
        assert report.outcome is Outcome.OK, report.error
        assert report.signature is not None and report.signature.signer == "corp"
        assert spawned == 1
    else:
        refused(report, "signature_unknown_signer")
        assert spawned == 0


# --- refused, no child --------------------------------------------------------------------


async def test_unsigned_model_is_refused_where_a_signature_is_required(
    small_model: Path, keys: Keys
) -> None:
    """No FILE.sig where the worker requires one: refused, signature_missing, no child."""
    report, spawned = await load(trusting(keys, require=["*"]), small_model)
    refused(report, "signature_missing")
    assert report.signature is None and spawned == 0


@pytest.mark.parametrize("damage", ["not_json", "flipped_signature", "other_payload"])
async def test_bad_signature_is_refused(small_model: Path, keys: Keys, damage: str) -> None:
    """A signature file that is no bundle, whose signature bytes were altered, or whose
    payload was swapped for another model's: signature_invalid, no child."""
    signature = sign(small_model, keys["acme"][0])
    bundle = json.loads(signature.read_bytes())
    envelope = bundle["dsseEnvelope"]
    if damage == "not_json":
        signature.write_bytes(b"\xff not a bundle")
    elif damage == "flipped_signature":
        raw = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
        raw[-1] ^= 1
        envelope["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()
        signature.write_text(json.dumps(bundle))
    else:
        other = small_model.with_name("other.safetensors")
        shutil.copy(small_model, other)
        other.write_bytes(other.read_bytes() + b" ")
        envelope["payload"] = json.loads(sign(other, keys["acme"][0]).read_bytes())["dsseEnvelope"][
            "payload"
        ]
        signature.write_text(json.dumps(bundle))
    report, spawned = await load(trusting(keys, require=["acme"]), small_model)
    refused(report, "signature_invalid")
    assert spawned == 0


@pytest.mark.parametrize("kind", ["symlink", "fifo", "huge"])
async def test_hostile_signature_file_is_refused_when_required_and_ignored_otherwise(
    small_model: Path, keys: Keys, kind: str
) -> None:
    """A FILE.sig that is a symlink (to a real signature), a FIFO or over 16 MiB is never
    followed, waited on or read: signature_invalid where one is required (no child), and
    no effect on a load that requires none."""
    signature = small_model.with_name(small_model.name + ".sig")
    if kind == "symlink":
        real = sign(small_model, keys["acme"][0]).rename(small_model.with_name("real.sig"))
        signature.symlink_to(real)
    elif kind == "fifo":
        os.mkfifo(signature)
    else:
        signature.touch()
        os.truncate(signature, 17 * 1024 * 1024)  # sparse: no disk, all size
    report, spawned = await load(trusting(keys, require=["acme"]), small_model)
    refused(report, "signature_invalid")
    assert spawned == 0
    report, _ = await load(trusting(keys), small_model)
    assert report.outcome is Outcome.OK and report.signature is None, report.error


@pytest.mark.parametrize(
    ("signer", "rules", "request_signed_by"),
    [
        ("mallory", {"require": ["*"]}, None),  # a key the worker does not trust
        ("beta", {"require": ["acme"]}, None),  # trusted, but not by this rule
        ("acme", {"require": ["*"]}, ("beta",)),  # the request narrows the worker's rule
        ("acme", {}, ("mallory",)),  # the request names a signer the worker does not trust
    ],
)
async def test_unknown_signer_is_refused(
    small_model: Path,
    keys: Keys,
    signer: str,
    rules: dict[str, Any],
    request_signed_by: tuple[str, ...] | None,
) -> None:
    """A valid signature by a signer no applicable rule accepts: signature_unknown_signer."""
    sign(small_model, keys[signer][0])
    report, spawned = await load(trusting(keys, **rules), small_model, signed_by=request_signed_by)
    refused(report, "signature_unknown_signer")
    assert spawned == 0


async def test_manifest_that_misses_a_shard_is_refused(checkpoint: Path, keys: Keys) -> None:
    """A folder signed without one of its shards: signature_mismatch naming it, no child."""
    left_out = shards(checkpoint)[1].name
    sign(checkpoint, keys["acme"][0], ignore=[left_out])
    report, spawned = await load(trusting(keys, require=["acme"]), checkpoint)
    refused(report, "signature_mismatch")
    assert report.error is not None and left_out in report.error.message
    assert report.signature is not None and report.signature.signer == "acme"
    assert not report.signature.verified and spawned == 0


@pytest.mark.parametrize("swapped", ["shard", "index"])
async def test_file_swapped_after_signing_is_refused(
    checkpoint: Path, keys: Keys, swapped: str
) -> None:
    """A shard (or the index) replaced after signing, by a valid file of the same size:
    signature_mismatch from the digests of our own descriptors, no child."""
    sign(checkpoint, keys["acme"][0])
    if swapped == "shard":
        rewrite_tensor_data(shards(checkpoint)[1])
    else:
        index = checkpoint / INDEX
        index.write_text(index.read_text() + "\n")  # the same JSON, other bytes
    report, spawned = await load(trusting(keys, require=["acme"]), checkpoint)
    refused(report, "signature_mismatch")
    assert spawned == 0


@pytest.mark.parametrize("restored", [False, True])
async def test_file_changed_after_verification_is_caught(
    checkpoint: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch, restored: bool
) -> None:
    """A shard rewritten in place (same inode, same size) after its signature verified and
    before the child reads it: the supervisor's digest taken during the load differs from
    the signed one, and the load ends invalid (file_changed). So does one written back
    before that digest reads it (an attacker flipping bytes while the child reads them):
    the write moved the file's times."""
    sign(checkpoint, keys["acme"][0])
    target = shards(checkpoint)[0]
    if restored:  # any write now moves its mtime, whatever the clock's tick
        day_ago = target.stat().st_mtime_ns - 86_400 * 10**9
        os.utime(target, ns=(day_ago, day_ago))
    real = checks_module.check_signature

    async def then_rewrite(opened: OpenedModel, *args: Any) -> None:
        await real(opened, *args)
        data = target.read_bytes()
        fd = os.open(target, os.O_WRONLY)  # the same inode, rewritten in place
        try:
            os.pwrite(fd, bytes([data[-1] ^ 0xFF]), len(data) - 1)  # a tensor byte
            if restored:
                os.pwrite(fd, data[-1:], len(data) - 1)
        finally:
            os.close(fd)

    monkeypatch.setattr(checks_module, "check_signature", then_rewrite)
    report, spawned = await load(trusting(keys, require=["acme"]), checkpoint)
    assert report.outcome is Outcome.INVALID, report.error
    assert report.error is not None and report.error.code == "file_changed"
    assert target.name in report.error.message and spawned == 1


# --- where a rule applies -----------------------------------------------------------------


def test_rules_apply_by_root_and_organisation(tmp_path: Path, keys: Keys) -> None:
    """A root's rule applies to files under it (by their opened paths) and not elsewhere;
    every applicable rule must hold, so the signers are their intersection."""
    prod, other = tmp_path / "prod", tmp_path / "other"
    prod.mkdir()
    other.mkdir()
    signing = trusting(keys, roots={str(prod): ["acme", "beta"]}, hf_orgs={"org": ["beta"]})
    for folder in (prod, other):
        (folder / "m.safetensors").write_bytes(b"x")

    def requirement(source: str, path: Path, **request: Any) -> frozenset[str] | None:
        with OpenedModel.single(open_model_file(path)) as opened:
            found = required_signers(signing, LoadRequest(source=source, **request), opened)
        return None if found is None else found.allowed

    assert requirement(str(prod / "m.safetensors"), prod / "m.safetensors") == {"acme", "beta"}
    assert requirement(str(other / "m.safetensors"), other / "m.safetensors") is None
    narrowed = requirement(str(prod / "m.safetensors"), prod / "m.safetensors", signed_by=["acme"])
    assert narrowed == {"acme"}
    assert requirement("hf://org/name", other / "m.safetensors") == {"beta"}
    assert requirement("hf://else/name", other / "m.safetensors") is None


def test_no_rule_no_requirement_looked_for(tmp_path: Path, keys: Keys) -> None:
    """With no rule in the settings and no signed_by, no load is asked for a signature (and
    the supervisor skips looking: a thread hop per load); any rule or signed_by may ask."""
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"x")
    plain, named = LoadRequest(source=str(path)), LoadRequest(source=str(path), signed_by=["acme"])
    assert not may_require(trusting(keys), plain)
    for signing, request in [
        (trusting(keys), named),
        (trusting(keys, require=["acme"]), plain),
        (trusting(keys, roots={str(tmp_path): ["acme"]}), plain),
        (trusting(keys, hf_orgs={"org": ["beta"]}), plain),
    ]:
        assert may_require(signing, request)
    for signing in (trusting(keys), trusting(keys, hf_orgs={"org": ["beta"]})):
        with OpenedModel.single(open_model_file(path)) as opened:
            assert required_signers(signing, plain, opened) is None


def test_a_request_names_signers_never_keys() -> None:
    """signed_by takes signer names only: a path or PEM key in it is a contract error."""
    for bad in ("/tmp/evil.pub", "-----BEGIN PUBLIC KEY-----", ""):
        with pytest.raises(ValidationError):
            LoadRequest(source="/m.safetensors", signed_by=[bad])
    assert LoadRequest(source="/m.safetensors", signed_by=["*"]).signed_by == ("*",)


def test_settings_refuse_rules_naming_untrusted_signers(keys: Keys) -> None:
    """A rule naming a signer absent from signing.signers is a settings error, as is a
    signer with neither or both of a key and a certificate chain."""
    with pytest.raises(ValidationError, match="not in signers"):
        trusting(keys, require=["carol"])
    with pytest.raises(ValidationError, match="either public_key or certificate_chain"):
        TrustedSigner()


async def test_worker_refuses_to_start_with_a_signer_it_cannot_load(tmp_path: Path) -> None:
    """A trusted key that cannot be read fails the start: never run without the signers a
    policy names."""
    signing = policy({"acme": tmp_path / "missing.pub"}, require=["acme"])
    sup = Supervisor(Settings(signing=signing))
    try:
        with pytest.raises(SandboxError, match=r"signing\.signers"):
            await sup.start()
    finally:
        await sup.close()


def _without_model_signing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make model-signing unimportable here, as on a worker installed without the extra."""
    for name in [n for n in sys.modules if n == "model_signing" or n.startswith("model_signing.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "model_signing", None)


async def test_worker_without_the_extra_never_loads_unverified(
    small_model: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without model-signing, a worker with trusted signers refuses to start, and a request
    that requires a signature is refused (signing_unavailable) with no child."""
    sign(small_model, keys["acme"][0])
    _without_model_signing(monkeypatch)
    sup = Supervisor(Settings(signing=trusting(keys, require=["acme"])))
    try:
        with pytest.raises(SandboxError, match=r"loadwarden\[signing\]"):
            await sup.start()
    finally:
        await sup.close()
    report, spawned = await load(SigningPolicy(), small_model, signed_by=["*"])
    refused(report, "signing_unavailable")
    assert spawned == 0


def test_catalog_carries_the_policy(tmp_path: Path) -> None:
    """A catalog's signed_by (default, or per entry, which wins) reaches each request."""
    catalog = parse_catalog(
        '[defaults]\nsigned_by = ["acme"]\n'
        '[[model]]\nname = "a"\nsource = "a.safetensors"\n'
        '[[model]]\nname = "b"\nsource = "b.safetensors"\nsigned_by = ["beta", "*"]\n',
        base_dir=tmp_path,
    )
    assert [r.signed_by for _, r in catalog.requests()] == [("acme",), ("beta", "*")]


def test_inspect_shows_the_signature(small_model: Path, keys: Keys) -> None:
    """`loadwarden inspect --json` reports the signature verified, with its signer; with a
    required signer it did not sign, the outcome is refused and the status says why."""
    sign(small_model, keys["acme"][0])
    env = {
        "LOADWARDEN_SIGNING__SIGNERS": json.dumps(
            {name: {"public_key": str(keys[name][1])} for name in ("acme", "beta")}
        )
    }
    ok = run("inspect", str(small_model), "--json", env=env)
    document = json.loads(ok.stdout)
    assert ok.returncode == 0 and document["outcome"] == "ok", ok.stderr
    assert document["signature"]["status"] == "verified"
    assert document["signature"]["signer"] == "acme" and not document["signature"]["required"]
    no = run("inspect", str(small_model), "--signed-by", "beta", "--json", env=env)
    document = json.loads(no.stdout)
    assert document["outcome"] == "refused" and document["error"]["code"] == (
        "signature_unknown_signer"
    )
    assert document["signature"]["status"] == "refused" and document["signature"]["required"]


# --- hostile signatures, requests and spellings -------------------------------------------


async def test_hf_organisation_rule_holds_whatever_its_spelling(
    checkpoint: Path, keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub's organisation names are case-insensitive (it serves Example-ORG/x as
    example-org/x, and a cache keeps the spelling it was downloaded with): an unsigned
    snapshot cached as Example-ORG is still under a rule for example-org."""
    cache = tmp_path / "hub"
    cache_snapshot(cache, "Example-ORG/tiny-llama", checkpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    rules = {"hf_orgs": {"example-org": ["acme"]}}
    report, spawned = await load(trusting(keys, **rules), "hf://Example-ORG/tiny-llama")
    refused(report, "signature_missing")
    assert spawned == 0


async def test_root_rule_holds_for_a_path_with_a_url_like_part(
    small_model: Path, keys: Keys
) -> None:
    """A local path is local however it is spelled: ``ROOT/x://../m.safetensors`` (a folder
    named ``x:``, then ``//``) names a file under ROOT, and ROOT's rule applies to it."""
    (small_model.parent / "x:").mkdir()
    source = f"{small_model.parent}/x://../{small_model.name}"
    report, spawned = await load(trusting(keys, roots={str(small_model.parent): ["acme"]}), source)
    refused(report, "signature_missing")
    assert spawned == 0


async def test_key_hint_that_is_no_sha256_is_refused_and_never_reported(
    small_model: Path, keys: Keys
) -> None:
    """A bundle's key hint is the sha256 of a PEM key: one that is anything else (here
    100 kB with a terminal escape) is no model-signing bundle, and the report, which
    names the hint it read, never carries it."""
    signature = sign(small_model, keys["acme"][0])
    bundle = json.loads(signature.read_bytes())
    bundle["verificationMaterial"]["publicKey"]["hint"] = "\x1b[2J" + "a" * 100_000
    signature.write_text(json.dumps(bundle))
    report, spawned = await load(trusting(keys, require=["acme"]), small_model)
    refused(report, "signature_invalid")
    assert report.signature is not None and report.signature.key_sha256 is None
    assert len(report.model_dump_json()) < 10_000 and spawned == 0


#: Two MiB each: JSON of 700,000 values, and ASCII that a single emoji widens to 4 bytes
#: a character once decoded.
HOSTILE_BUNDLES = {
    "many_values": b'{"verificationMaterial": {}, "x": [' + b"{}," * 700_000 + b"{}]}",
    "wide_text": b'{"verificationMaterial": {}, "x": "' + b"a" * 2_000_000 + "😀".encode() + b'"}',
}


@pytest.mark.parametrize("shape", sorted(HOSTILE_BUNDLES))
async def test_hostile_signature_json_is_refused_in_bounded_memory(
    small_model: Path, keys: Keys, shape: str
) -> None:
    """A signature file that is JSON of many values or of text that widens when decoded is
    refused (signature_invalid) while the supervisor holds little more than its bytes: a
    job's signature never costs it tens of MiB of Python objects."""
    from loadwarden.worker._files import SignatureFile
    from loadwarden.worker.load._bundle import Found, Requirement, Trust, verify_bundle

    raw = HOSTILE_BUNDLES[shape]
    signing = trusting(keys, require=["acme"])
    trust = Trust(signing)
    tracemalloc.start()
    try:
        with pytest.raises(SourceRefused) as refusal:
            verify_bundle(
                SignatureFile("m.sig", raw=raw),
                Requirement(frozenset({"acme"}), ("test",)),
                trust,
                Found(),
            )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refusal.value.code == "signature_invalid"
    assert peak < 2 * len(raw), f"{peak / 2**20:.0f} MiB to refuse {len(raw) / 2**20:.0f} MiB"
    small_model.with_name(small_model.name + ".sig").write_bytes(raw)
    report, spawned = await load(signing, small_model)
    refused(report, "signature_invalid")
    assert spawned == 0


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
async def test_worker_refuses_to_start_with_a_key_model_signing_cannot_verify_with(
    tmp_path: Path, kind: str
) -> None:
    """A trusted public key that is valid PEM but no EC key (RSA, Ed25519: model-signing
    signs with EC keys only) fails the start with a clear reason, not a traceback."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key = (
        rsa.generate_private_key(65537, 2048)
        if kind == "rsa"
        else ed25519.Ed25519PrivateKey.generate()
    )
    public = tmp_path / f"{kind}.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    sup = Supervisor(Settings(signing=policy({"acme": public}, require=["acme"])))
    try:
        with pytest.raises(SandboxError, match=r"signing\.signers\[acme\].*no EC public key"):
            await sup.start()
    finally:
        await sup.close()


@pytest.mark.parametrize("expired", ["leaf", "intermediate"])
async def test_signature_by_an_expired_certificate_is_refused(
    small_model: Path, tmp_path: Path, expired: str
) -> None:
    """model-signing checks a chain at its signing certificate's start date, so one that
    expired long ago (or whose intermediate did) verifies forever, for whoever holds its
    key: with no timestamp to show when it signed, a certificate must be valid now."""
    key, leaf, chain, root = expired_certificates(tmp_path, expired)
    sign(small_model, key, certificate=(leaf, chain))
    signing = SigningPolicy(
        signers={"corp": TrustedSigner(certificate_chain=(root,))}, require=("corp",)
    )
    report, spawned = await load(signing, small_model)
    refused(report, "signature_invalid")
    assert report.error is not None and "expired" in report.error.message
    assert report.signature is not None and report.signature.signer == "corp"
    assert spawned == 0


@pytest.mark.parametrize("what", ["file", "checkpoint"])
async def test_root_rule_holds_for_a_symlink_under_the_root_to_a_model_outside(
    small_model: Path, checkpoint: Path, keys: Keys, tmp_path: Path, what: str
) -> None:
    """A symlink planted under a root that requires signatures, to an unsigned model outside
    it (elsewhere under the allowed roots), is a model of that root as requested: loaded by
    the root's path (here spelled //ROOT/...), it must be signed."""
    prod = tmp_path / "prod"
    prod.mkdir()
    target = small_model if what == "file" else checkpoint
    (prod / target.name).symlink_to(target)
    report, spawned = await load(
        trusting(keys, roots={str(prod): ["acme"]}), f"/{prod}/{target.name}"
    )
    refused(report, "signature_missing")
    assert spawned == 0


def test_hintless_bundle_is_verified_without_touching_the_process_streams(
    small_model: Path, keys: Keys, capfd: pytest.CaptureFixture[str]
) -> None:
    """A bundle from before key hints is verified by trying each accepted key, without
    model-signing's warning on stdout and without swapping sys.stdout (process-wide: two
    loads verifying at once in threads could leave it pointing at stderr for good, and
    ``load --json`` and the logs print there)."""
    from loadwarden.worker._files import SignatureFile
    from loadwarden.worker.load._bundle import Found, Requirement, Trust, verify_bundle

    bundle = json.loads(sign(small_model, keys["beta"][0]).read_bytes())
    bundle["verificationMaterial"]["publicKey"]["hint"] = ""
    raw = json.dumps(bundle).encode()
    trust = Trust(trusting(keys))
    requirement = Requirement(frozenset({"acme", "beta"}), ("test",))
    stdout, swapped, signers = sys.stdout, False, list[str | None]()

    def verify_many() -> None:
        for _ in range(50):
            found = Found()
            verify_bundle(SignatureFile("m.sig", raw=raw), requirement, trust, found)
            assert found.info is not None
            signers.append(found.info.signer)

    thread = threading.Thread(target=verify_many)
    thread.start()
    while thread.is_alive():
        swapped = swapped or sys.stdout is not stdout
    thread.join()
    assert signers == ["beta"] * 50 and not swapped
    assert capfd.readouterr() == ("", "")


@pytest.fixture
def bind_mounted(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A folder and another name for it: a bind mount (root only; skipped elsewhere)."""
    folder, alias = tmp_path / "prod", tmp_path / "alias"
    folder.mkdir()
    alias.mkdir()
    mounted = subprocess.run(
        ["mount", "--bind", str(folder), str(alias)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"no bind mount here: {mounted.stderr.decode().strip()}")
    try:
        yield folder, alias
    finally:
        subprocess.run(["umount", str(alias)], check=True)


async def test_root_rule_holds_for_the_root_reached_by_another_name(
    small_model: Path, keys: Keys, bind_mounted: tuple[Path, Path]
) -> None:
    """A root reached by another name (a bind mount here; a case-insensitive share's
    ROOT/../PROD for ROOT/../prod likewise) is the same folder: its rule applies."""
    prod, alias = bind_mounted
    shutil.copy(small_model, prod / small_model.name)
    report, spawned = await load(
        trusting(keys, roots={str(prod): ["acme"]}), alias / small_model.name
    )
    refused(report, "signature_missing")
    assert spawned == 0
