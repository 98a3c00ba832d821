"""The rows of a "name  value" table (a report, an inspection), and the text rich prints for
them off a terminal, written here without importing rich when that text is plain.

Why: rich (~15-20 ms to import) is the last import of ``loadwarden inspect``, whose output
off a terminal (a pipe, a file, CI) is plain text: no colour, no style, nothing wrapped
when every row fits the width. ``plain`` writes exactly that text, or says it cannot
(``None``), and ``_render`` prints the same rows through rich: on a terminal (styles),
where a value must wrap or fold, and for anything but printable ASCII (wide characters,
escapes). ``tests/test_cli_render.py`` holds the two to the same output.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loadwarden.producer.outcomes import Outcome
from loadwarden.worker._text import clean
from loadwarden.worker._text import human_bytes as _size

if TYPE_CHECKING:
    from loadwarden.producer.contract import ModelSummary


@dataclass(frozen=True, slots=True)
class Shown:
    """Text shown as written (rich's ``Text``: never read as markup), in ``style``."""

    text: str
    style: str = ""


#: A value: rich markup (a ``str``, which ``Table.add_row`` renders), or text ``Shown``.
Value = str | Shown
Row = tuple[str, Value]

#: Shards listed one per line; a larger checkpoint's list is cut (--json has them all).
SHOWN_SHARDS = 32


def safe(value: object, style: str = "") -> Shown:
    """Untrusted text: shown as written, control characters escaped (``clean``)."""
    return Shown(clean(value), style)


def outcome(value: Outcome) -> Shown:
    return Shown(str(value), "green" if value is Outcome.OK else "red")


def model_rows(model: ModelSummary) -> list[Row]:
    count = model.tensor_count if model.tensor_count is not None else len(model.tensors)
    listed = f"; {len(model.tensors):,} listed" if len(model.tensors) < count else ""
    rows: list[Row] = [
        ("format", str(model.format)),
        ("tensors", f"{count:,} ({model.parameters:,} parameters{listed})"),
        ("tensor bytes", _size(model.bytes)),
        ("dtypes", safe(", ".join(f"{d}: {n:,}" for d, n in sorted(model.dtypes.items())))),
    ]
    if model.sha256:
        rows.append(("sha256", model.sha256))
    if model.shards is not None:
        rows.extend(_shard_rows(model))
    return rows


def _shard_rows(model: ModelSummary) -> list[Row]:
    shards = model.shards or []
    rows: list[Row] = [("shards", f"{len(shards)} files, {_size(model.file_bytes)}")]
    for shard in shards[:SHOWN_SHARDS]:
        # Names come from an untrusted index: shown, so "[...]" is never read as markup.
        line = f"{shard.file}  {_size(shard.bytes)}, {shard.tensors} tensors"
        if shard.sha256:
            line += f", sha256 {shard.sha256[:16]}…"
        rows.append(("", Shown(line)))
    if len(shards) > SHOWN_SHARDS:
        rows.append(("", f"… and {len(shards) - SHOWN_SHARDS} more (--json lists them all)"))
    return rows


def inspection_rows(document: dict[str, Any]) -> list[Row]:
    """``loadwarden inspect``'s rows for its JSON ``document``."""
    from loadwarden.producer.contract import ModelSummary

    rows: list[Row] = [("outcome", outcome(Outcome(document["outcome"])))]
    if document["error"]:
        err = document["error"]
        rows.append(("error", safe(f"{err['type']} ({err['code']}): {err['message']}")))
    if document["model"]:
        rows.extend(model_rows(ModelSummary.model_validate(document["model"])))
    sig = document.get("signature") or {}
    status = sig.get("status", "none")
    what = {"none": "none", "unchecked": f"{sig.get('file')}, unchecked: {sig.get('reason')}"}
    if status in ("verified", "refused"):
        what[status] = (
            f"{status}{' (required)' if sig.get('required') else ''}: {sig.get('file')}, "
            f"signer {sig.get('signer') or 'unknown'}, {sig.get('files', 0)} files signed"
            + (f"; {sig.get('code')}: {sig.get('message')}" if status == "refused" else "")
        )
    rows.append(("signature", safe(what[status])))
    return rows


#: Printable ASCII: one terminal cell per character, nothing rich would escape or expand.
_ASCII = re.compile(r"[ -~]*")
#: What rich reads in markup: a tag ("[bold]") or an emoji code (":smile:").
_MARKUP = re.compile(r"[\[:]")


def _as_written(value: Value) -> str | None:
    """The value's text when rich prints it unchanged, one cell per character; else None."""
    if isinstance(value, Shown):
        text = value.text
    elif _MARKUP.search(value):
        return None
    else:
        text = value
    return text if _ASCII.fullmatch(text) else None


def plain(rows: Sequence[Row], width: int) -> str | None:
    """The text rich prints for ``rows`` (``_render.pairs``) ``width`` columns wide with no
    colour, or None when it might differ: a value to wrap, or one not plainly ASCII."""
    cells: list[tuple[str, str]] = []
    for name, value in rows:
        left, right = _as_written(name), _as_written(value)
        if left is None or right is None:
            return None
        cells.append((left, right))
    left_w = max(len(left) for left, _ in cells)
    right_w = max(len(right) for _, right in cells)
    # One space of padding on each side of the gap (none at the edges), no box.
    if left_w + 2 + right_w > width:
        return None
    return "".join(f"{left:<{left_w}}  {right:<{right_w}}\n" for left, right in cells)


def plain_width() -> int | None:
    """The width rich's console (``_render.console``) renders at when it writes no styles,
    or None when it would write them (it sees a terminal) or there is no stdout.

    As rich decides: TTY_COMPATIBLE, then FORCE_COLOR, then ``isatty``; the width of the
    first of stdin, stdout and stderr that is a terminal, COLUMNS over it, else 80.
    """
    if sys.stdout is None or _terminal():
        return None
    columns = os.environ.get("COLUMNS")
    if columns is not None and columns.isdigit():
        return int(columns)  # as rich's Console takes it: as given, 0 included (no "or 80")
    width = None
    for fd in (0, 1, 2):
        try:
            width = os.get_terminal_size(fd).columns
        except (AttributeError, ValueError, OSError):
            continue
        break
    return width or 80


def _terminal() -> bool:
    compatible = os.environ.get("TTY_COMPATIBLE", "")
    if compatible in ("0", "1"):
        return compatible == "1"
    force = os.environ.get("FORCE_COLOR")
    if force is not None:
        return force != ""
    try:
        return sys.stdout.isatty()
    except ValueError:  # closed: rich sees no terminal either
        return False


def show(rows: Sequence[Row]) -> None:
    """Print ``rows`` as ``_render.pairs`` does: written here when the text is plain."""
    width = plain_width()
    text = plain(rows, width) if width is not None else None
    if text is None:
        from loadwarden.worker.cli import _render  # rich: styles, wrapping, wide characters

        _render.pairs(rows)
        return
    sys.stdout.write(text)
    sys.stdout.flush()
