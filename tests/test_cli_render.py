"""`inspect`'s plain output and its settings, read without rich or pydantic-settings, are
exactly what rich and the settings give (``cli._rows``, ``cli._common.local_policies``)."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from loadwarden.worker.cli import _render, _rows
from loadwarden.worker.cli._common import local_policies, settings_from, with_roots
from tests.test_cli import LOADWARDEN

OK_MODEL = {
    "format": "safetensors",
    "file_bytes": 1112,
    "bytes": 1024,
    "parameters": 256,
    "dtypes": {"F32": 256},
    "tensors": [{"name": "weight", "dtype": "F32", "shape": [16, 16], "bytes": 1024}],
}
SHARDS = [
    {"file": f"model-0000{i}-of-00002.safetensors", "file_bytes": 96, "bytes": 16, "tensors": 1}
    for i in (1, 2)
]
ERROR = {"type": "InvalidModel", "code": "header_not_json", "message": "the header is not JSON"}
SIGNATURES: list[dict[str, Any] | None] = [
    None,
    {"status": "unchecked", "file": "m.sig", "reason": "no trusted signers"},
    {"status": "verified", "required": True, "file": "m.sig", "signer": "acme", "files": 1},
    {"status": "refused", "file": "m.sig", "code": "bad_signature", "message": "no", "files": 0},
]


def documents() -> list[dict[str, Any]]:
    """Inspection documents: each outcome, a checkpoint, each signature, hostile text."""
    ok = {"outcome": "ok", "error": None, "model": OK_MODEL}
    checkpoint = {**OK_MODEL, "shards": SHARDS, "sha256": "ab" * 32}
    many = {**OK_MODEL, "shards": SHARDS * 20, "tensor_count": 9, "metadata": {"a": "b"}}
    invalid = {"outcome": "invalid", "error": ERROR, "model": None}
    hostile = {**ERROR, "message": "[bold]x[/] :smile: \x1b[31m\u202e naïve 漢字"}
    long = {**ERROR, "message": "word " * 30}
    return [
        *({**ok, "signature": sig} for sig in SIGNATURES),
        {**ok, "model": checkpoint, "signature": None},
        {**ok, "model": many, "signature": None},
        {**invalid, "signature": None},
        {**invalid, "error": hostile, "signature": None},
        {**invalid, "error": long, "signature": None},
    ]


def rich_prints(rows: list[_rows.Row], width: int, monkeypatch: pytest.MonkeyPatch) -> str:
    """What ``_render.pairs`` prints for ``rows`` off a terminal, ``width`` columns wide."""
    out = io.StringIO()
    monkeypatch.setattr(_render, "console", Console(highlight=False, file=out, width=width))
    _render.pairs(rows)
    return out.getvalue()


@pytest.mark.parametrize("width", [30, 45, 80, 120])
@pytest.mark.parametrize("document", documents())
def test_plain_text_is_what_rich_prints(
    document: dict[str, Any], width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where ``plain`` writes the rows itself, rich would print the very same characters."""
    rows = _rows.inspection_rows(document)
    text = _rows.plain(rows, width)
    if text is not None:
        assert text == rich_prints(rows, width, monkeypatch)


@pytest.mark.parametrize(
    "document", [d for d in documents() if _rows.plain(_rows.inspection_rows(d), 200)]
)
def test_plain_text_at_its_exact_width(
    document: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table exactly as wide as the console is written plain, as rich prints it; one
    column narrower, rich would wrap it, and it is left to rich."""
    rows = _rows.inspection_rows(document)
    width = len((_rows.plain(rows, 200) or "").splitlines()[0])
    assert _rows.plain(rows, width) == rich_prints(rows, width, monkeypatch)
    assert _rows.plain(rows, width - 1) is None
    assert rich_prints(rows, width - 1, monkeypatch) != _rows.plain(rows, width)


def test_plain_text_is_written_for_a_small_model_and_left_to_rich_otherwise() -> None:
    """An ok inspection fits 80 columns as plain ASCII; a value to wrap, markup in a value
    rich reads as markup, or a wide character goes to rich."""
    first, *_ = documents()
    assert _rows.plain(_rows.inspection_rows(first), 80) is not None
    assert _rows.plain(_rows.inspection_rows(first), 20) is None  # a value would wrap
    assert _rows.plain([("a", _rows.Shown("[b]x :y:"))], 80) == "a  [b]x :y:\n"  # as written
    assert _rows.plain([("a", "[b]x")], 80) is None  # markup rich would read
    assert _rows.plain([("a", _rows.Shown("漢字"))], 80) is None  # two cells each


@pytest.mark.parametrize(
    ("environ", "styled"),
    [
        ({}, False),
        ({"COLUMNS": "123"}, False),
        ({"COLUMNS": "0"}, False),  # rich renders 0 wide (prints nothing), not 80
        ({"FORCE_COLOR": "1"}, True),
        ({"FORCE_COLOR": ""}, False),
        ({"TTY_COMPATIBLE": "1"}, True),
        ({"TTY_COMPATIBLE": "0", "FORCE_COLOR": "1"}, False),
    ],
)
def test_plain_width_is_rich_s_off_a_terminal(
    environ: dict[str, str], styled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain exactly where rich writes no styles, at the width rich renders at."""
    for name in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("sys.stdout", io.StringIO())  # not a terminal
    console = Console(highlight=False)  # as _render's: it writes to sys.stdout
    assert (console.color_system is not None) is styled
    width = _rows.plain_width()
    assert (width is None) is styled
    if width is not None:
        assert width == console.width
        assert width == int(environ.get("COLUMNS", width))


def test_inspect_prints_what_rich_prints(
    small_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real command's human output, off a terminal, is rich's table of its --json document."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LOADWARDEN_")}
    env["COLUMNS"] = "80"

    def inspect(*args: str) -> str:
        done = subprocess.run(
            [LOADWARDEN, "inspect", str(small_model), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
        return done.stdout

    rows = _rows.inspection_rows(json.loads(inspect("--json")))
    assert _rows.plain(rows, 80) is not None  # the command wrote it without rich
    assert inspect() == rich_prints(rows, 80, monkeypatch)


def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("LOADWARDEN_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"LOADWARDEN_REDIS_URL": "redis://elsewhere:1/0"},
        {"LOADWARDEN_REPORT_MAX_TENSORS": "7"},
        {"loadwarden_inspection__max_rank": "3"},
        {"LOADWARDEN_SOURCES__REFUSE_HARD_LINKS": "true", "LOADWARDEN_SIGNING__REQUIRE": '["*"]'},
    ],
)
def test_local_policies_are_the_settings(
    environ: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``inspect`` reads of the settings is what the whole settings hold, from the
    environment (any case) or, with none of theirs set, each default."""
    _clean_environ(monkeypatch)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    got = local_policies(tmp_path)
    full = with_roots(settings_from(), tmp_path)
    assert got.inspection == full.inspection
    assert got.sources == full.sources and got.sources.allow_roots == (tmp_path,)
    assert got.signing == full.signing
    assert got.report_max_tensors == full.report_max_tensors


def test_a_bad_setting_is_still_a_usage_error(
    small_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An invalid LOADWARDEN_* variable stops `inspect` with exit 2, as it stops the worker."""
    _clean_environ(monkeypatch)
    env = {**os.environ, "LOADWARDEN_INSPECTION__MAX_RANK": "0"}
    done = subprocess.run(
        [LOADWARDEN, "inspect", str(small_model)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "max_rank" in done.stderr
