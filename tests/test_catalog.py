"""Catalog files: valid ones become LoadRequests; invalid ones are refused whole."""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from loadwarden.producer import catalog as catalog_module
from loadwarden.producer.catalog import MAX_CATALOG_BYTES, load_catalog, parse_catalog
from loadwarden.producer.contract import LimitOverrides, LoadRequest, ModelFormat, RetryPolicy
from loadwarden.producer.errors import CatalogError

DIGEST = "ab" * 32

GOOD = f"""
version = 1

[defaults]
format = "safetensors"
labels = {{ team = "search", tier = "silver" }}
limits = {{ timeout_seconds = 120, memory_bytes = 1_000_000 }}
retry = {{ max_attempts = 5, retry_on = ["timeout"] }}

[[model]]
name = "bert-base"
source = "models/bert.safetensors"
sha256 = "{DIGEST.upper()}"
labels = {{ tier = "gold" }}
[model.limits]
memory_bytes = 4_294_967_296
cpu_seconds = 30

[[model]]
name = "remote.v2"
source = "https://models.example.com/remote.safetensors"

[[model]]
name = "abs_path"
source = "/srv/models/abs.safetensors"
"""

ENTRY = '[[model]]\nname = "m"\nsource = "m.safetensors"\n'


def refused(text: str) -> CatalogError:
    with pytest.raises(CatalogError) as info:
        parse_catalog(text, name="catalog.toml")
    return info.value


def test_valid_catalog_becomes_requests(tmp_path: Path) -> None:
    """Sources resolve against the catalog's folder; labels and limits merge, the entry winning."""
    path = tmp_path / "node-a.toml"
    path.write_text(GOOD)
    requests = load_catalog(path).requests()
    retry = RetryPolicy(max_attempts=5, retry_on=("timeout",))  # type: ignore[arg-type]
    default_limits = LimitOverrides(timeout_seconds=120, memory_bytes=1_000_000)
    assert requests == [
        (
            "bert-base",
            LoadRequest(
                source=str(tmp_path / "models" / "bert.safetensors"),
                sha256=DIGEST,
                format=ModelFormat.SAFETENSORS,
                limits=LimitOverrides(
                    memory_bytes=4_294_967_296, cpu_seconds=30, timeout_seconds=120
                ),
                retry=retry,
                labels={
                    "team": "search",
                    "tier": "gold",
                    "catalog": "node-a",
                    "model": "bert-base",
                },
            ),
        ),
        (
            "remote.v2",
            LoadRequest(
                source="https://models.example.com/remote.safetensors",
                format=ModelFormat.SAFETENSORS,
                limits=default_limits,
                retry=retry,
                labels={
                    "team": "search",
                    "tier": "silver",
                    "catalog": "node-a",
                    "model": "remote.v2",
                },
            ),
        ),
        (
            "abs_path",
            LoadRequest(
                source="/srv/models/abs.safetensors",
                format=ModelFormat.SAFETENSORS,
                limits=default_limits,
                retry=retry,
                labels={
                    "team": "search",
                    "tier": "silver",
                    "catalog": "node-a",
                    "model": "abs_path",
                },
            ),
        ),
    ]


def test_minimal_catalog_uses_request_defaults() -> None:
    """An entry with only name and source gets LoadRequest's own defaults plus the two labels."""
    [(name, request)] = parse_catalog(ENTRY, base_dir=Path("/cat"), name="x.toml").requests()
    assert name == "m"
    assert request == LoadRequest(
        source="/cat/m.safetensors", labels={"catalog": "x", "model": "m"}
    )


def test_relative_source_without_base_dir_resolves_against_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """parse_catalog without base_dir makes relative sources absolute against the working dir."""
    monkeypatch.chdir(tmp_path)
    [(_, request)] = parse_catalog(ENTRY).requests()
    assert request.source == str(tmp_path / "m.safetensors")


def test_symlinked_catalog_resolves_against_its_real_folder(tmp_path: Path) -> None:
    """A catalog reached through a symlink resolves relative sources in the real file's folder."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "c.toml").write_text(ENTRY)
    (tmp_path / "link.toml").symlink_to(tmp_path / "real" / "c.toml")
    [(_, request)] = load_catalog(tmp_path / "link.toml").requests()
    assert request.source == str(tmp_path.resolve() / "real" / "m.safetensors")
    assert request.labels["catalog"] == "link"


@pytest.mark.parametrize(
    ("text", "defect"),
    [
        pytest.param('[[model]]\nsource = "a"\n', "model[0] name: required", id="missing-name"),
        pytest.param('[[model]]\nname = "a"\n', 'model[0] "a" source: required', id="no-source"),
        pytest.param(
            '[[model]]\nname = "a b"\nsource = "a"\n',
            'model[0] "a b" name: must be 1-128 characters of A-Z a-z 0-9 . _ -',
            id="bad-name",
        ),
        pytest.param(
            '[[model]]\nname = "a\\u001b[31m"\nsource = "a"\n',
            'model[0] "a\\u001b[31m" name: must be 1-128 characters of A-Z a-z 0-9 . _ -',
            id="name-escaped-in-output",
        ),
        pytest.param(
            ENTRY + 'sha256 = "abc"\n',
            'model[0] "m" sha256: must be 64 lower- or upper-case hex digits',
            id="bad-sha256",
        ),
        pytest.param(
            ENTRY + 'format = "onnx"\n',
            "model[0] \"m\" format: must be 'safetensors', 'npy', 'npz' or 'gguf'",
            id="bad-format",
        ),
        pytest.param(
            ENTRY + "limits = { memory_bytes = -1 }\n",
            'model[0] "m" limits.memory_bytes: must be > 0',
            id="negative-limit",
        ),
        pytest.param(
            "[defaults]\nlimits = { timeout_seconds = 0 }\n" + ENTRY,
            "defaults.limits.timeout_seconds: must be > 0",
            id="zero-default-limit",
        ),
        pytest.param(
            ENTRY + 'limits = { cpu_seconds = "60" }\n',
            'model[0] "m" limits.cpu_seconds: must be a valid number',
            id="string-for-number",
        ),
        pytest.param(
            ENTRY + "limits = { memory_bytes = true }\n",
            'model[0] "m" limits.memory_bytes: must be a valid integer',
            id="bool-for-integer",
        ),
        pytest.param(
            ENTRY + 'source2 = "x"\n',
            'model[0] "m": unknown key "source2"',
            id="unknown-key-in-entry",
        ),
        pytest.param(
            ENTRY + "memory_bytes = 5\n",
            'model[0] "m": unknown key "memory_bytes"',
            id="flat-limit-in-entry",
        ),
        pytest.param(
            ENTRY + "limits = { memroy_bytes = 5 }\n",
            'model[0] "m" limits: unknown key "memroy_bytes"',
            id="unknown-key-in-limits",
        ),
        pytest.param(
            '[defaults]\nfromat = "safetensors"\n' + ENTRY,
            'defaults: unknown key "fromat"',
            id="unknown-key-in-defaults",
        ),
        pytest.param('colour = "red"\n' + ENTRY, 'unknown key "colour"', id="unknown-top-key"),
        pytest.param(
            ENTRY + ENTRY, 'model[1] "m": duplicate name (first at model[0])', id="duplicate"
        ),
        pytest.param(
            "[[model]]\nname = \n",
            "TOML syntax error at line 2, column 8: Invalid value",
            id="toml-syntax",
        ),
        pytest.param(
            "version = 2\n" + ENTRY, "version: must be 1 (the only catalog version)", id="v2"
        ),
        pytest.param('version = "1"\n' + ENTRY, "version: must be a valid integer", id="v-str"),
        pytest.param("version = 1\n", "model: the catalog has no [[model]] entries", id="empty"),
        pytest.param('[model]\nname = "m"\n', "model: must be an array", id="model-not-array"),
        pytest.param(
            ENTRY + "labels = { team = 3 }\n",
            'model[0] "m" labels.team: must be a valid string',
            id="non-string-label",
        ),
        pytest.param(
            ENTRY + 'labels = { "team name" = 2024-01-01 }\n',
            'model[0] "m" labels["team name"]: must be a valid string',
            id="date-label",
        ),
        pytest.param(
            '[defaults]\nlabels = { model = "x" }\n' + ENTRY,
            'defaults.labels: "model" is reserved (loadwarden sets it)',
            id="reserved-label",
        ),
        pytest.param(
            '[[model]]\nname = "m"\nsource = "s3://bucket/m"\n',
            'model[0] "m" source: must be a local path, an http(s) URL or hf://ORG/NAME[@REVISION]',
            id="unsupported-url",
        ),
        pytest.param(
            '[defaults]\nretry = { retry_on = ["ok"], max_attempts = 0 }\n' + ENTRY,
            "defaults.retry.max_attempts: must be >= 1",
            id="bad-retry",
        ),
    ],
)
def test_each_defect_is_named(text: str, defect: str) -> None:
    """Each kind of defect is refused with one readable line naming the entry and the field."""
    error = refused(text)
    assert (error.message, error.defects) == ("catalog.toml: 1 defect", [defect])


def test_every_defect_is_listed() -> None:
    """A catalog with several defects lists all of them, not just the first."""
    text = """
    version = 3
    [defaults]
    memory_bytes = 5
    [[model]]
    name = "bert-base"
    source = "a"
    sha256 = "nothex"
    [[model]]
    source = "b"
    [[model]]
    name = "bert-base"
    source = "c"
    limits = { timeout_seconds = -5 }
    """
    error = refused(text)
    assert error.message == "catalog.toml: 6 defects"
    assert error.defects == [
        "version: must be 1 (the only catalog version)",
        'defaults: unknown key "memory_bytes"',
        'model[0] "bert-base" sha256: must be 64 lower- or upper-case hex digits',
        "model[1] name: required",
        'model[2] "bert-base" limits.timeout_seconds: must be > 0',
        'model[2] "bert-base": duplicate name (first at model[0])',
    ]


def test_labels_past_the_request_bound_are_a_defect() -> None:
    """Defaults and entry labels that merge past LoadRequest's 64 are refused, not left to crash."""
    defaults = ", ".join(f"d{i} = 'x'" for i in range(40))
    entry = ", ".join(f"e{i} = 'x'" for i in range(40))
    error = refused(f"[defaults]\nlabels = {{ {defaults} }}\n{ENTRY}labels = {{ {entry} }}\n")
    assert error.defects == ['model[0] "m" labels: 82 once merged, at most 64']


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "absent.toml"


def _not_utf8(tmp_path: Path) -> Path:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[[model]]\nname = "caf\xe9"\n')
    return path


def _too_large(tmp_path: Path) -> Path:
    path = tmp_path / "huge.toml"
    path.write_bytes(b"#" * (MAX_CATALOG_BYTES + 1))
    return path


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe.toml"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_missing, "cannot read: No such file or directory"),
        (_not_utf8, "not UTF-8 text (byte 0xe9 at offset 21)"),
        (_too_large, "larger than 4 MiB"),
        (_fifo, "not a regular file"),
    ],
    ids=["missing", "not-utf8", "too-large", "fifo"],
)
def test_unreadable_file_is_refused(
    tmp_path: Path, make: Callable[[Path], Path], reason: str
) -> None:
    """load_catalog refuses a missing, non-UTF-8, oversized or non-regular file, saying which."""
    path = make(tmp_path)
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert (info.value.message, info.value.defects) == (f"{path}: {reason}", [reason])


def test_module_is_import_light() -> None:
    """The catalog module imports only the stdlib, pydantic and our contract."""
    tree = ast.parse(Path(catalog_module.__file__).read_text())
    modules = {
        alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names
    }
    modules |= {node.module or "" for node in tree.body if isinstance(node, ast.ImportFrom)}
    allowed = {"pydantic", "pydantic_core", "__future__"} | set(sys.stdlib_module_names)
    ours = {
        "loadwarden.producer.contract",
        "loadwarden.producer.errors",
        "loadwarden.producer.sources",
    }
    assert {m for m in modules if m.split(".")[0] not in allowed} <= ours
