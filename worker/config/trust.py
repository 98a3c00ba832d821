"""Whom a worker trusts: where a model may come from (SourcePolicy) and who signed it."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loadwarden.producer.contract import SignedBy, SignerName
from loadwarden.worker._xdg import xdg_dir
from loadwarden.worker.config.policies import GiB


def _default_cache_dir() -> Path:
    return xdg_dir("XDG_CACHE_HOME", ".cache") / "loadwarden"


class SourcePolicy(BaseModel):
    """Where a model may come from: local roots, URL hosts and networks, download bounds.

    From the environment, tuples are JSON lists, e.g.
    ``LOADWARDEN_SOURCES__ALLOW_ROOTS='["/models", "/srv/models"]'`` and
    ``LOADWARDEN_SOURCES__ALLOW_HOSTS='["huggingface.co"]'``. pydantic-settings JSON-decodes
    every tuple-typed variable, so a comma-separated value (``/models,/srv/models``) is an
    error, not a list: splitting needs its ``NoDecode`` marker, which arrived in
    pydantic-settings 2.7 while we support 2.3 and later.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Empty: the worker's cwd at resolve time, so `loadwarden load FILE` works where it is run.
    # A deployed worker should name its model folders. Roots must be absolute.
    allow_roots: tuple[Path, ...] = ()
    # A hard link into a root looks, by its path, like a file that belongs there, and
    # Linux lets any user link a file they can read (unless fs.protected_hardlinks is on).
    # False: models in ordinary folders often carry links (deduplicating stores, hub caches
    # hardlinked into place); set it where the roots are writable by someone less trusted.
    refuse_hard_links: bool = False
    # Empty: no URL is fetched at all until an operator names the hosts it trusts (exact
    # names, compared case-insensitively; no wildcards, so a typo cannot open a whole domain).
    allow_hosts: tuple[str, ...] = ()
    # Empty: private, loopback, link-local and other non-global addresses are refused (SSRF);
    # name CIDRs (e.g. "10.20.0.0/16" for an in-cluster mirror) to allow them.
    allow_networks: tuple[str, ...] = ()
    # A TCP + TLS handshake with a reachable host takes well under a second; 10 s rides out a
    # slow resolver or a lost SYN while still failing a dead host quickly (it is retried).
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    # The longest silence allowed between two reads of a body; 30 s tolerates a busy CDN but
    # frees a job held by a server that stopped sending.
    read_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    # 64 GiB: the default memory ceiling (LimitPolicy.memory_ceiling_bytes); a larger file
    # could not be loaded under the default limits anyway, so it is not worth the disk.
    max_download_bytes: Annotated[int, Field(gt=0)] = 64 * GiB
    # Model hubs redirect once or twice (to a CDN); each hop is checked against the host and
    # address rules again. More than 5 is a loop or a trick.
    max_redirects: Annotated[int, Field(ge=0, le=20)] = 5
    # Per user, survives restarts, and is where cache cleaners look (XDG base directories).
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    # None: huggingface_hub's own rule (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub),
    # so hf:// finds the models a user already downloaded. Read by hf:// sources only.
    hf_cache_dir: Path | None = None
    # The cache's size cap: before each download, least recently used entries are evicted
    # until max_download_bytes more fit under it. None: no cap (a workstation's cache is the
    # user's disk); a deployment on a size-limited volume sets it below the volume's limit.
    cache_max_bytes: Annotated[int, Field(gt=0)] | None = None

    @field_validator("allow_roots", "cache_dir", "hf_cache_dir")
    @classmethod
    def _absolute(cls, value: Path | tuple[Path, ...] | None) -> Path | tuple[Path, ...] | None:
        for path in value if isinstance(value, tuple) else (value,) if value else ():
            if not path.is_absolute():
                raise ValueError(f"{str(path)!r} is not an absolute path")
        return value

    @model_validator(mode="after")
    def _one_download_fits_the_cache(self) -> SourcePolicy:
        if self.cache_max_bytes is not None and self.cache_max_bytes < self.max_download_bytes:
            raise ValueError(
                "cache_max_bytes must be at least max_download_bytes: the largest allowed "
                "download could never fit in the cache"
            )
        return self

    @field_validator("allow_hosts")
    @classmethod
    def _exact_hosts(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for host in hosts:
            name = host.strip().lower().rstrip(".")
            if not name or (any(c in name for c in "*/:@ ") and not _is_ip(name)):
                raise ValueError(f"{host!r} is not a host name (exact names only, no wildcards)")
            out.append(name)
        return tuple(out)

    @field_validator("allow_networks")
    @classmethod
    def _cidrs(cls, networks: tuple[str, ...]) -> tuple[str, ...]:
        # strict: "127.0.0.1/8" (host bits set) is more likely a typo than a network.
        try:
            return tuple(str(ipaddress.ip_network(n.strip(), strict=True)) for n in networks)
        except ValueError as exc:
            raise ValueError(f"not a CIDR network: {exc}") from None


class TrustedSigner(BaseModel):
    """A key (or a certificate authority) whose model signatures this worker accepts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # A PEM public key (EC P-256, P-384 or P-521: the curves model-signing signs with).
    public_key: Path | None = None
    # PEM certificates (a CA and its intermediates): a signature whose bundle carries a
    # signing certificate that chains to them (and may sign code) is this signer's.
    certificate_chain: tuple[Path, ...] = ()

    @model_validator(mode="after")
    def _one_kind(self) -> TrustedSigner:
        if (self.public_key is None) == (not self.certificate_chain):
            raise ValueError("give either public_key or certificate_chain, not both or neither")
        for path in (self.public_key, *self.certificate_chain):
            if path is not None and not path.is_absolute():
                raise ValueError(f"{str(path)!r} is not an absolute path")
        return self


class SigningPolicy(BaseModel):
    """Which models must carry a valid signature (OpenSSF model signing), and by whom.

    Each rule is "signed by one of these signers" (names from ``signers``; ``*``: any of
    them). Every rule that applies to a load must hold, so a load may only be signed by a
    signer in all of them; a request's or catalog's ``signed_by`` is one more rule, and
    it names signers, never keys: only the keys configured here can ever verify a model.
    From the environment, each is JSON, e.g.
    ``LOADWARDEN_SIGNING__SIGNERS='{"acme": {"public_key": "/keys/acme.pub"}}'`` and
    ``LOADWARDEN_SIGNING__ROOTS='{"/models/prod": ["acme"]}'``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # None trusted: a load that must be signed is then refused (unknown signer).
    signers: dict[SignerName, TrustedSigner] = {}
    # Every load (None: no rule for all loads; loads are signed only where a rule says).
    require: SignedBy | None = None
    # Loads whose files lie under one of these folders (a root or any folder inside one), or
    # whose source names a path under one (a symlink there to a model elsewhere too).
    roots: dict[Path, SignedBy] = {}
    # hf:// loads of these organisations (the ORG of hf://ORG/NAME, in any case: the hub's
    # names are case-insensitive, and a cache keeps whichever spelling it was fetched by).
    hf_orgs: dict[str, SignedBy] = {}

    @model_validator(mode="after")
    def _known_signers(self) -> SigningPolicy:
        if "*" in self.signers:
            raise ValueError('"*" means any signer; it cannot name one')
        rules = [self.require or (), *self.roots.values(), *self.hf_orgs.values()]
        for name in {n for rule in rules for n in rule} - {"*", *self.signers}:
            raise ValueError(f"signer {name!r} is required by a rule but not in signers")
        for root in self.roots:
            if not root.is_absolute():
                raise ValueError(f"{str(root)!r} is not an absolute path")
        return self

    @property
    def requires_any(self) -> bool:
        """Whether some rule of the worker's own requires signatures."""
        return bool(self.require or self.roots or self.hf_orgs)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
