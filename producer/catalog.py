"""Catalog files: the models an operator preloads, checked whole before anything is enqueued.

A catalog is TOML, one ``[[model]]`` table per model::

    version = 1                           # optional; if present it must be 1

    [defaults]                            # optional; every model inherits it
    format = "safetensors"
    labels = { team = "search" }          # merged under each model's labels (the model wins)
    limits = { timeout_seconds = 120 }    # memory_bytes, cpu_seconds, timeout_seconds
    retry = { max_attempts = 5 }          # a RetryPolicy
    signed_by = ["acme"]                  # require a signature by one of these signers (the
                                          # worker's signing.signers names them; "*": any)

    [[model]]
    name = "bert-base"                    # required, unique, 1-128 of A-Z a-z 0-9 . _ -
    source = "models/bert.safetensors"    # a file, a checkpoint folder or index (relative: to
                                          # this file's folder), an http(s) URL, or hf://ORG/NAME
    sha256 = "9f2c..."                    # optional, 64 hex digits
    format = "safetensors"                # optional, overrides the default
    labels = { tier = "gold" }            # optional
    signed_by = ["acme", "beta"]          # optional, overrides the default
    [model.limits]                        # optional; each limit set here wins over the default
    memory_bytes = 4_294_967_296

Limits live only in a ``limits`` table, as in ``LoadRequest``: a limit written directly
in ``[[model]]`` or ``[defaults]`` is an unknown key, and unknown keys are defects.
Values keep their TOML types (``"60"`` is not a number, ``true`` is not 1). The labels
``catalog`` (the file's stem) and ``model`` (the entry's name) are set by loadwarden.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from loadwarden.producer.contract import (
    LimitOverrides,
    LoadRequest,
    ModelFormat,
    RetryPolicy,
    SignedBy,
)
from loadwarden.producer.errors import CatalogError
from loadwarden.producer.sources import is_hf, is_url, parse_hf

#: A hand-written catalog of tens of thousands of models fits in well under 4 MiB.
MAX_CATALOG_BYTES = 4 * 1024 * 1024
#: Labels loadwarden sets on every request it makes from a catalog.
RESERVED_LABELS = ("catalog", "model")
_MAX_LABELS = 64  # LoadRequest's own bound, after the merge

_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_WHERE = re.compile(r"(?P<msg>.*) \((?P<where>at line \d+, column \d+|at end of document)\)")
_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
_MESSAGES = {
    "missing": "required",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "list_type": "must be an array",
    "tuple_type": "must be an array",
}


def _check_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError("must be 1-128 characters of A-Z a-z 0-9 . _ -")
    return value


def _check_source(value: str) -> str:
    if not value or "\0" in value or len(value) > 4096:
        raise ValueError("must be a path or URL of 1-4096 characters, without NUL")
    if is_hf(value):
        parse_hf(value)  # its ValueError names the defect
    elif is_url(value):
        url = urlsplit(value)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("must be a local path, an http(s) URL or hf://ORG/NAME[@REVISION]")
    return value


def _check_sha256(value: str) -> str:
    if not _SHA256.fullmatch(value):
        raise ValueError("must be 64 lower- or upper-case hex digits")
    return value.lower()


def _check_labels(value: dict[str, str]) -> dict[str, str]:
    for key in RESERVED_LABELS:
        if key in value:
            raise ValueError(f'"{key}" is reserved (loadwarden sets it)')
    return value


def _check_version(value: int) -> int:
    if value != 1:
        raise ValueError("must be 1 (the only catalog version)")
    return value


Labels = Annotated[
    dict[str, Annotated[str, Field(max_length=256)]],
    Field(max_length=_MAX_LABELS),
    AfterValidator(_check_labels),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CatalogDefaults(_Strict):
    """What every entry of a catalog inherits unless it sets its own."""

    format: ModelFormat | None = None
    limits: LimitOverrides = LimitOverrides()
    labels: Labels = {}
    retry: RetryPolicy = RetryPolicy()
    signed_by: SignedBy | None = None


class CatalogEntry(_Strict):
    """One ``[[model]]`` of a catalog, as written (its source is not resolved yet)."""

    name: Annotated[str, AfterValidator(_check_name)]
    source: Annotated[str, AfterValidator(_check_source)]
    sha256: Annotated[str, AfterValidator(_check_sha256)] | None = None
    format: ModelFormat | None = None
    limits: LimitOverrides = LimitOverrides()
    labels: Labels = {}
    signed_by: SignedBy | None = None


class Catalog(_Strict):
    """A validated catalog; ``requests()`` turns it into the loads to enqueue."""

    name: str = "<catalog>"
    path: Path | None = None
    base_dir: Path | None = Field(default=None, description="relative sources resolve here")
    defaults: CatalogDefaults = CatalogDefaults()
    models: list[CatalogEntry]

    def requests(self) -> list[tuple[str, LoadRequest]]:
        """``(entry name, LoadRequest)`` per entry, in catalog order, defaults merged in."""
        return [(entry.name, self._request(entry)) for entry in self.models]

    def _request(self, entry: CatalogEntry) -> LoadRequest:
        defaults = self.defaults
        limits = defaults.limits.model_dump(exclude_none=True)
        limits |= entry.limits.model_dump(exclude_none=True)
        stem = Path(self.path or self.name).stem
        return LoadRequest(
            source=self._resolve(entry.source),
            sha256=entry.sha256,
            format=entry.format or defaults.format,
            limits=LimitOverrides(**limits),
            retry=defaults.retry,
            signed_by=entry.signed_by or defaults.signed_by,
            labels={**defaults.labels, **entry.labels, "catalog": stem, "model": entry.name},
        )

    def _resolve(self, source: str) -> str:
        # The worker resolves paths on its own side: never send it a relative one.
        if is_url(source) or Path(source).is_absolute():
            return source
        return str((self.base_dir or Path.cwd()).absolute() / source)


class _Document(_Strict):
    """The TOML document itself; ``Catalog`` adds where it came from."""

    version: Annotated[int, AfterValidator(_check_version)] = 1
    defaults: CatalogDefaults = CatalogDefaults()
    models: list[CatalogEntry] = Field(default=[], alias="model")


def parse_catalog(text: str, *, base_dir: Path | None = None, name: str = "<catalog>") -> Catalog:
    """Validate a catalog's text; raise ``CatalogError`` listing every defect.

    Relative sources resolve against ``base_dir`` (default: the working directory).
    """
    return _parse(text, name=name, base_dir=base_dir, path=None)


def load_catalog(path: str | Path) -> Catalog:
    """Read (at most 4 MiB of UTF-8) and validate the catalog file at ``path``.

    Relative sources resolve against the folder of the real file (symlinks resolved),
    the same folder ``loadwarden preload`` lets its embedded worker read.
    """
    path = Path(path)
    text = _read_text(path)
    try:
        real = path.resolve()
    except (RuntimeError, OSError, ValueError):  # swapped for a symlink loop since it was read
        raise CatalogError(f"{str(path)!r} cannot be resolved to a real path") from None
    return _parse(text, name=str(path), base_dir=real.parent, path=path)


def _read_text(path: Path) -> str:
    try:
        # O_NONBLOCK: a FIFO must not hang us; it is refused below as not a regular file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                _refuse_file(path, "not a regular file")
            data = file.read(MAX_CATALOG_BYTES + 1)
    except OSError as exc:
        _refuse_file(path, f"cannot read: {exc.strerror or exc}")
    if len(data) > MAX_CATALOG_BYTES:
        _refuse_file(path, f"larger than {MAX_CATALOG_BYTES // (1024 * 1024)} MiB")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        _refuse_file(path, f"not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})")


def _refuse_file(path: Path, reason: str) -> NoReturn:
    raise CatalogError(f"{path}: {reason}", [reason])


def _parse(text: str, *, name: str, base_dir: Path | None, path: Path | None) -> Catalog:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{name}: 1 defect", [_syntax_defect(exc)]) from None
    document, defects = _validate(raw)
    defects += _entry_defects(raw)
    if document is None or defects:
        count = len(defects)
        raise CatalogError(f"{name}: {count} defect{'s' * (count != 1)}", defects)
    base = Path(base_dir).absolute() if base_dir is not None else None
    return Catalog(
        name=name, path=path, base_dir=base, defaults=document.defaults, models=document.models
    )


def _syntax_defect(exc: tomllib.TOMLDecodeError) -> str:
    found = _TOML_WHERE.fullmatch(str(exc))
    if found is None:
        return f"TOML syntax error: {exc}"
    return f"TOML syntax error {found['where']}: {found['msg']}"


def _validate(raw: dict[str, Any]) -> tuple[_Document | None, list[str]]:
    # Strict JSON validation keeps TOML's types: "60" is no number, true is no 1, while
    # strings still become enums and arrays tuples. Dates have no JSON form: an array
    # stands in, which every field of ours refuses.
    doc = json.dumps(raw, default=lambda value: [str(value)])
    try:
        return _Document.model_validate_json(doc, strict=True), []
    except ValidationError as exc:
        return None, [_describe(error, raw) for error in exc.errors(include_url=False)]


def _describe(error: ErrorDetails, raw: dict[str, Any]) -> str:
    loc, kind = error["loc"], error["type"]
    if kind == "extra_forbidden":
        where, message = _where(loc[:-1], raw), f"unknown key {_quote(loc[-1])}"
    else:
        where, message = _where(loc, raw), _message(error)
    return f"{where}: {message}" if where else message


def _message(error: ErrorDetails) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "value_error":
        return str(ctx["error"])
    for key, op in _BOUNDS:
        if key in ctx:
            return f"must be {op} {ctx[key]:g}"
    if kind in ("enum", "literal_error"):
        return f"must be {ctx['expected']}"
    if kind == "too_long":
        return f"must have at most {ctx['max_length']} entries"
    return _MESSAGES.get(kind) or error["msg"].replace("Input should be", "must be")


def _where(loc: tuple[int | str, ...], raw: dict[str, Any]) -> str:
    head, rest = "", loc
    if len(loc) >= 2 and loc[0] == "model" and isinstance(loc[1], int):
        head, rest = _entry_label(raw, loc[1]), loc[2:]
    tail = "".join(_step(part) for part in rest).removeprefix(".")
    return " ".join(part for part in (head, tail) if part)


def _step(key: int | str) -> str:
    if isinstance(key, int):
        return f"[{key}]"
    return f".{key}" if _BARE_KEY.fullmatch(key) else f"[{_quote(key)}]"


def _entry_label(raw: dict[str, Any], index: int) -> str:
    models = raw.get("model")
    entry = models[index] if isinstance(models, list) and index < len(models) else None
    name = entry.get("name") if isinstance(entry, dict) else None
    return f"model[{index}] {_quote(name[:64])}" if isinstance(name, str) else f"model[{index}]"


def _quote(value: object) -> str:
    # ASCII-only: a catalog must not be able to put terminal escapes into our output.
    return json.dumps(str(value))


def _entry_defects(raw: dict[str, Any]) -> list[str]:
    """Defects across entries: none at all, duplicate names, too many labels once merged."""
    models = raw.get("model", [])
    if not isinstance(models, list):
        return []  # the validation reports the type
    if not models:
        return ["model: the catalog has no [[model]] entries"]
    defects: list[str] = []
    first: dict[str, int] = {}
    default_labels = _labels_of(raw.get("defaults"))
    for index, entry in enumerate(models):
        label = _entry_label(raw, index)
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name in first:
            defects.append(f"{label}: duplicate name (first at model[{first[name]}])")
        elif isinstance(name, str):
            first[name] = index
        merged = len(default_labels | _labels_of(entry)) + len(RESERVED_LABELS)
        if merged > _MAX_LABELS:
            defects.append(f"{label} labels: {merged} once merged, at most {_MAX_LABELS}")
    return defects


def _labels_of(table: object) -> set[str]:
    labels = table.get("labels") if isinstance(table, dict) else None
    return set(labels) if isinstance(labels, dict) else set()
