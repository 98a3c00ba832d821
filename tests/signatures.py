"""Sign models as their publishers would: an EC key made with ``cryptography``, and the
OpenSSF ``model_signing`` API (what its CLI calls), default ``files`` / sha256 manifest."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import model_signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from loadwarden.producer.settings import SigningPolicy, TrustedSigner

#: model-signing's own name for a folder's signature; loadwarden looks for it there.
FOLDER_SIGNATURE = "model.sig"


def make_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A P-256 key pair as PEM files ``NAME.pem`` (private) and ``NAME.pub``."""
    key = ec.generate_private_key(ec.SECP256R1())
    private = folder / f"{name}.pem"
    public = folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def sign(model: Path, private_key: Path, *, ignore: Iterable[str] = ()) -> Path:
    """Sign a single file (into ``FILE.sig``) or a folder (into its ``model.sig``)."""
    signature = model / FOLDER_SIGNATURE if model.is_dir() else model.with_name(model.name + ".sig")
    hashing = model_signing.hashing.Config().set_ignored_paths(
        paths=[FOLDER_SIGNATURE, *ignore], ignore_git_paths=True
    )
    (
        model_signing.signing.Config()
        .use_elliptic_key_signer(private_key=private_key)
        .set_hashing_config(hashing)
        .sign(model, signature)
    )
    return signature


def policy(signers: dict[str, Path], **rules: object) -> SigningPolicy:
    """A signing policy trusting each named public key, with ``rules`` (require, roots...)."""
    return SigningPolicy.model_validate(
        {
            "signers": {name: TrustedSigner(public_key=key) for name, key in signers.items()},
            **rules,
        }
    )
