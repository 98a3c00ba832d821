"""Sign models as their publishers would: an EC key made with ``cryptography``, and the
OpenSSF ``model_signing`` API (what its CLI calls), default ``files`` / sha256 manifest."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from pathlib import Path

import model_signing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from loadwarden.worker.config import SigningPolicy, TrustedSigner

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


def make_certificates(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA (``NAME-ca.crt``) and a code-signing certificate it issued (``NAME.crt``, key
    ``NAME.pem``): what an organisation's PKI hands a release pipeline."""
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    private, _ = make_key(folder, name)
    key = serialization.load_pem_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} release")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, leaf_path = folder / f"{name}-ca.crt", folder / f"{name}.crt"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaf_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    return private, leaf_path, ca_path


def sign(
    model: Path,
    private_key: Path,
    *,
    ignore: Iterable[str] = (),
    certificate: tuple[Path, Path] | None = None,
) -> Path:
    """Sign a single file (into ``FILE.sig``) or a folder (into its ``model.sig``), with a
    key, or with ``certificate`` = (signing certificate, its CA) and the certificate's key."""
    signature = model / FOLDER_SIGNATURE if model.is_dir() else model.with_name(model.name + ".sig")
    hashing = model_signing.hashing.Config().set_ignored_paths(
        paths=[FOLDER_SIGNATURE, *ignore], ignore_git_paths=True
    )
    config = model_signing.signing.Config()
    if certificate is None:
        config.use_elliptic_key_signer(private_key=private_key)
    else:
        config.use_certificate_signer(
            private_key=private_key,
            signing_certificate=certificate[0],
            certificate_chain=[certificate[1]],
        )
    config.set_hashing_config(hashing).sign(model, signature)
    return signature


def policy(signers: dict[str, Path], **rules: object) -> SigningPolicy:
    """A signing policy trusting each named public key, with ``rules`` (require, roots...)."""
    return SigningPolicy.model_validate(
        {
            "signers": {name: TrustedSigner(public_key=key) for name, key in signers.items()},
            **rules,
        }
    )


def expired_certificates(folder: Path, which: str) -> tuple[Path, Path, Path, Path]:
    """A signing certificate under a root CA that has expired (``which="leaf"``), or whose
    intermediate CA has (``"intermediate"``; the leaf was issued while it was valid).
    Returns (the leaf's key, the leaf, the chain the bundle carries, the root CA)."""
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=300)

    def issue(
        subject: str,
        issuer: str,
        public: ec.EllipticCurvePublicKey,
        by: ec.EllipticCurvePrivateKey,
        *,
        ca: bool,
        days: int,
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(past)
            .not_valid_after(past + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                critical=True,
            )
        return builder.sign(by, hashes.SHA256())

    root_key, middle_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    root = issue("root", "root", root_key.public_key(), root_key, ca=True, days=3 * 365)
    private, _ = make_key(folder, f"expired-{which}")
    key = serialization.load_pem_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    if which == "leaf":  # valid for 100 days, 200 days ago
        chain = [root]
        leaf = issue("leaf", "root", key.public_key(), root_key, ca=False, days=100)
    else:
        middle = issue("middle", "root", middle_key.public_key(), root_key, ca=True, days=100)
        chain = [middle]
        leaf = issue("leaf", "middle", key.public_key(), middle_key, ca=False, days=365)
    paths = [folder / f"expired-{which}-{part}.crt" for part in ("leaf", "chain", "root")]
    paths[0].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    paths[2].write_bytes(root.public_bytes(serialization.Encoding.PEM))
    return private, paths[0], paths[1], paths[2]
