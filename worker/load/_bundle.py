"""Model-signing bundles, verified: the worker's trusted signers, and which of them (if any)
signed a bundle, by model-signing's own verifiers (see ``loadwarden.worker.load.signing``).

model-signing is imported here only, and only when a ``Trust`` is built.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from loadwarden.producer.contract import SignatureInfo
from loadwarden.producer.errors import SourceRefused
from loadwarden.worker._files import SignatureFile
from loadwarden.worker.config import SigningPolicy, TrustedSigner

#: JSON objects, arrays and their separators a bundle may hold: model-signing's holds
#: about 15, a Sigstore bundle with a transparency log entry and its inclusion proof ~100.
MAX_BUNDLE_VALUES = 1024
#: A key hint, as model-signing writes it: the sha256 (hex) of the signer's PEM public key.
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class TrustError(Exception):
    """The trusted signers cannot be loaded: model-signing (``loadwarden[signing]``) is not
    installed, or a key or certificate file cannot be read. The worker refuses to start."""


@dataclass(frozen=True, slots=True)
class Requirement:
    """The signers a load may be signed by (every applicable rule accepts them), and why."""

    allowed: frozenset[str]
    rules: tuple[str, ...]

    def describe(self) -> str:
        return "; ".join(self.rules)


@dataclass(frozen=True, slots=True)
class _Signer:
    name: str
    verifier: Any  # model_signing's ec_key.Verifier or sign_certificate.Verifier
    key_sha256: str | None  # a public key's hint (sha256 of its PEM); None for a CA
    # A certificate verifier sets its X509Store's time to each bundle's signing time:
    # two loads verifying at once (threads) must not see each other's.
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False)


class Trust:
    """The worker's trusted signers, loaded once (keys read, model-signing imported)."""

    def __init__(self, policy: SigningPolicy) -> None:
        try:
            from model_signing._signing import sign_certificate, sign_ec_key
        except ImportError as exc:
            raise TrustError(
                f"signing.signers is set, but model-signing is not installed ({exc}); "
                "install loadwarden[signing]"
            ) from None
        self.signers: dict[str, _Signer] = {}
        for name, signer in policy.signers.items():
            try:
                self.signers[name] = self._load(name, signer, sign_ec_key, sign_certificate)
            except (OSError, ValueError, TypeError) as exc:
                raise TrustError(f"signing.signers[{name}] cannot be loaded: {exc}") from None

    @staticmethod
    def _load(name: str, signer: TrustedSigner, sign_ec_key: Any, sign_certificate: Any) -> _Signer:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        if signer.public_key is not None:
            key = serialization.load_pem_public_key(signer.public_key.read_bytes())
            if not isinstance(key, ec.EllipticCurvePublicKey):
                # model-signing's own check assumes a curve (AttributeError on RSA, Ed25519).
                raise ValueError(
                    f"{type(key).__name__} is no EC public key: model-signing "
                    "signs with EC keys only (P-256, P-384, P-521)"
                )
            verifier = sign_ec_key.Verifier(signer.public_key)
            # The bundle's key hint, computed as model-signing's signer does.
            pem = key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            return _Signer(name, verifier, hashlib.sha256(pem).hexdigest())
        return _Signer(name, sign_certificate.Verifier(list(signer.certificate_chain)), None)


@dataclass(slots=True)
class Found:
    """What is known of a signature so far (the report shows it, refused or not)."""

    info: SignatureInfo | None = None


def verify_bundle(
    sig: SignatureFile, requirement: Requirement, trust: Trust, found: Found
) -> dict[str, tuple[str, str]]:
    """Parse the bundle, find its signer, verify it; the manifest as name -> (algorithm, hex).
    ``found.info`` holds what is known of the signature so far, for the report."""
    assert sig.raw is not None
    found.info = SignatureInfo(file=sig.name, sha256=hashlib.sha256(sig.raw).hexdigest())
    signature, hint, has_chain = _parse(sig)
    found.info = found.info.model_copy(update={"key_sha256": hint})
    candidates = [trust.signers[n] for n in sorted(requirement.allowed) if n in trust.signers]
    if hint is not None:
        by_key = [s for s in candidates if s.key_sha256 == hint]
        if not by_key:
            other = [
                f"{s.name!r}'s key (by its hint)"
                for s in trust.signers.values()
                if s.key_sha256 == hint
            ]
            raise unknown_signer(requirement, other[0] if other else "a key")
        signer, manifest = by_key[0], _verify_with(by_key[0], signature)
    elif has_chain:
        signer, manifest = _verify_chain(signature, candidates, requirement)
    else:  # a bundle from before key hints: any accepted key that verifies it is its signer
        matches = [(s, m) for s in candidates if (m := _try_hinted(s, signature)) is not None]
        if not matches:
            raise unknown_signer(requirement, "a key with no hint")
        signer, manifest = matches[0]
    params = manifest.serialization_type
    resources = {str(rd.identifier): rd.digest for rd in manifest.resource_descriptors()}
    found.info = found.info.model_copy(
        update={
            "signer": signer.name,
            "model_sha256": _root_digest(signature),
            "files": len(resources),
        }
    )
    if has_chain and hint is None:
        _check_unexpired(signature, sig.name)
    if params.get("method") != "files" or params.get("hash_type") != "sha256":
        raise SourceRefused(
            f"{sig.name} signs a {params.get('method')}/{params.get('hash_type')} manifest; "
            "loadwarden checks whole-file sha256 digests (model-signing's default 'files' "
            "serialization with sha256): sign it that way",
            code="signature_mismatch",
        )
    return {name: (d.algorithm, d.digest_hex) for name, d in resources.items()}


def _parse(sig: SignatureFile) -> tuple[Any, str | None, bool]:
    """The bundle as model-signing's ``Signature``, its key hint, and whether it carries a
    certificate chain. As ``sign_sigstore_pb.Signature.read`` does, from our bytes (it
    takes a path, which we would have to open again: the bytes we read are the ones we
    verify), with strict UTF-8 first."""
    from model_signing._signing import sign_sigstore_pb
    from sigstore_models.bundle import v1 as bundle_pb

    assert sig.raw is not None
    _check_shape(sig)
    try:
        parsed = json.loads(sig.raw.decode("utf-8"))
        material = parsed["verificationMaterial"]
        material.setdefault("tlogEntries", [])
        if "publicKey" in material:
            material["publicKey"].setdefault("hint", None)
            for key in ("rawBytes", "keyDetails"):
                material["publicKey"].pop(key, None)
        bundle = bundle_pb.Bundle.from_dict(parsed)
        public_key = bundle.verification_material.public_key
        hint = public_key.hint if public_key is not None else None
        chain = bundle.verification_material.x509_certificate_chain
    except Exception as exc:  # whatever the parser raised, the file is no bundle of ours
        raise SourceRefused(
            f"{sig.name} is not a model-signing bundle: {type(exc).__name__}: {exc}"[:500],
            code="signature_invalid",
        ) from None
    if hint and not _SHA256_HEX.match(hint):
        # Never reported: the report names the hint, and this one may be megabytes of anything.
        raise SourceRefused(
            f"{sig.name} is not a model-signing bundle: its key hint is no sha256 "
            f"({len(hint)} characters)",
            code="signature_invalid",
        )
    return sign_sigstore_pb.Signature(bundle), hint or None, chain is not None


def _check_shape(sig: SignatureFile) -> None:
    """Refuse, before parsing, a file that is no bundle and would cost us far more memory
    than its bytes once parsed: a bundle (model-signing's, or Sigstore's with a log entry)
    is ASCII JSON of a few dozen values, its payload, signature and certificates base64
    strings; 16 MiB of ``{},`` is millions of Python objects (over 1 GiB), and one
    non-ASCII character makes the decoded text 4 bytes a character."""
    assert sig.raw is not None
    values = sig.raw.count(b"{") + sig.raw.count(b"[") + sig.raw.count(b",")
    if not sig.raw.isascii() or values > MAX_BUNDLE_VALUES:
        what = "non-ASCII bytes" if not sig.raw.isascii() else f"over {MAX_BUNDLE_VALUES} values"
        raise SourceRefused(
            f"{sig.name} is not a model-signing bundle: it holds {what}",
            code="signature_invalid",
        )


def _verify_with(signer: _Signer, signature: Any) -> Any:
    try:
        return signer.verifier.verify(signature)
    except Exception as exc:  # InvalidSignature, ValueError (payload), KeyError (manifest)...
        raise SourceRefused(
            f"the signature does not verify under {signer.name!r}'s key: "
            f"{type(exc).__name__}: {exc}"[:500],
            code="signature_invalid",
        ) from None


def _try_hinted(signer: _Signer, signature: Any) -> Any:
    """The manifest if ``signer``'s key verifies a bundle that has no key hint, else None.

    model-signing prints a warning to stdout when it verifies a bundle with no hint. We
    give the bundle the hint of the key we try instead (it checks the hint against that
    very key), so nothing is printed: redirecting ``sys.stdout`` would swap it for the
    whole process, and two threads verifying at once could leave it swapped for good
    (``load --json`` and the logs print there)."""
    public_key = signature.bundle.verification_material.public_key
    if signer.key_sha256 is None or public_key is None:
        return None  # a certificate signer: its bundles carry a chain
    public_key.hint = signer.key_sha256
    try:
        return signer.verifier.verify(signature)
    except Exception:
        return None
    finally:
        public_key.hint = None


def _verify_chain(
    signature: Any, candidates: list[_Signer], requirement: Requirement
) -> tuple[_Signer, Any]:
    """The accepted certificate authority the bundle's signing certificate chains to."""
    from OpenSSL import crypto

    for signer in (s for s in candidates if s.key_sha256 is None):
        try:
            with signer.lock:
                return signer, signer.verifier.verify(signature)
        except crypto.X509StoreContextError:
            continue  # not issued under this signer's chain
        except Exception as exc:
            raise SourceRefused(
                f"the signature does not verify under {signer.name!r}'s certificate: "
                f"{type(exc).__name__}: {exc}"[:500],
                code="signature_invalid",
            ) from None
    raise unknown_signer(requirement, "a certificate")


def _check_unexpired(signature: Any, name: str) -> None:
    """Refuse a bundle with a certificate that has expired. model-signing checks the chain
    at its signing certificate's start date (the bundle has no timestamp to say when it
    was signed), so a certificate that expired years ago, or whose intermediate did, would
    verify forever for whoever holds its key; revocation is not checked either. (One not
    valid yet passes, as model-signing has it: a CA's clock may run ahead of ours.)"""
    from cryptography import x509

    now = datetime.now(UTC)
    chain = signature.bundle.verification_material.x509_certificate_chain.certificates
    for place, cert in enumerate(chain):
        end = x509.load_der_x509_certificate(cert.raw_bytes).not_valid_after_utc
        if now > end:
            which = "its signing certificate" if place == 0 else f"certificate {place} of its chain"
            raise SourceRefused(
                f"{name}: {which} expired on {end:%Y-%m-%d}; with no timestamp to show it "
                "signed before then, a certificate must be valid when its signature is checked",
                code="signature_invalid",
            )


def unknown_signer(requirement: Requirement, whom: str) -> SourceRefused:
    accepted = ", ".join(sorted(requirement.allowed)) or "none: the rules share no signer"
    return SourceRefused(
        f"signed by {whom} that this load does not accept (accepted: {accepted}; "
        f"{requirement.describe()})",
        code="signature_unknown_signer",
    )


def _root_digest(signature: Any) -> str | None:
    try:
        payload = json.loads(signature.bundle.dsse_envelope.payload)
        digest = payload["subject"][0]["digest"]["sha256"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return digest if isinstance(digest, str) and len(digest) == 64 else None
