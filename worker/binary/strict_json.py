"""Strict JSON for headers and indexes: UTF-8 only, unique keys, finite numbers, real Unicode.

Stdlib only: the load child parses safetensors headers with it too.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

#: Builds the error to raise from a defect's ``(code, message)``.
Invalid = Callable[[str, str], Exception]

_UTF8_BOM = b"\xef\xbb\xbf"
# A \uD800-\uDFFF escape: only then can the parsed value hold an unpaired surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# Values quoted from a hostile file are cut so a message stays readable and small.
_SHOW_CHARS = 80


def show(value: object) -> str:
    """``repr(value)``, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= _SHOW_CHARS else f"{text[: _SHOW_CHARS - 3]}..."


def json_type(value: object) -> str:
    """How a message names the JSON type of ``value``."""
    if value is None:
        return "null"
    kinds = ((bool, "a boolean"), (str, "a string"), (list, "an array"), (dict, "an object"))
    return next((label for kind, label in kinds if isinstance(value, kind)), "a number")


def parse_object(raw: bytes, invalid: Invalid, what: str, *, padding: str = "") -> dict[str, Any]:
    """``raw`` as one JSON object (``padding`` characters allowed before it), or
    ``invalid(code, message)`` raised.

    ``json.loads`` on bytes would also take UTF-16, duplicate keys (last wins),
    NaN and Infinity, and lone surrogate escapes; each is a defect here (and ``-0`` is
    the float ``-0.0``, as serde_json reads it, so no count accepts it). Codes are
    ``{what}_not_utf8``, ``{what}_not_json``, ``{what}_not_object``,
    ``duplicate_key`` and ``non_finite_number``.
    """
    if raw.startswith(_UTF8_BOM):
        raise invalid(f"{what}_not_utf8", f"{what} starts with a UTF-8 byte order mark")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(
            f"{what}_not_utf8", f"{what} is not UTF-8: {exc.reason} at byte {exc.start}"
        ) from exc
    # str.lstrip() with no argument would also skip form feeds and Unicode spaces.
    start = text.lstrip(padding)[:1]
    if start != "{":
        raise invalid(
            f"{what}_not_object", f"{what} must start with '{{', not {start or text[:1]!r}"
        )
    value = _load(text, invalid, what)
    if _SURROGATE_ESCAPE.search(text):
        _require_unicode(value, invalid, what)
    return value


def _load(text: str, invalid: Invalid, what: str) -> dict[str, Any]:
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            key = next(k for k, count in Counter(k for k, _ in pairs).items() if count > 1)
            raise invalid("duplicate_key", f"key {show(key)} appears twice in one object")
        return result

    def no_constant(name: str) -> Any:
        raise invalid("non_finite_number", f"{what} holds the non-finite number {name}")

    def finite(number: str) -> float:
        value = float(number)
        if not math.isfinite(value):
            raise invalid("non_finite_number", f"number {number[:40]} overflows to {value}")
        return value

    def serde_int(number: str) -> int | float:
        # serde_json reads "-0" as the float -0.0, which no shape or offset (u64) accepts.
        return -0.0 if number == "-0" else int(number)

    try:
        value = json.loads(
            text,
            object_pairs_hook=unique,
            parse_constant=no_constant,
            parse_float=finite,
            parse_int=serde_int,
        )
    except RecursionError as exc:
        raise invalid(f"{what}_not_json", f"{what} JSON is nested too deeply") from exc
    except json.JSONDecodeError as exc:
        raise invalid(f"{what}_not_json", f"{what} is not valid JSON: {exc}") from exc
    except ValueError as exc:  # int() refuses more digits than sys.get_int_max_str_digits()
        raise invalid(f"{what}_not_json", f"{what} holds an integer with too many digits") from exc
    if not isinstance(value, dict):
        raise invalid(f"{what}_not_object", f"{what} is {json_type(value)}, not an object")
    return value


def _require_unicode(value: dict[str, Any], invalid: Invalid, what: str) -> None:
    # "\ud800" is valid JSON syntax but not Unicode text; the Rust loader rejects it.
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except RecursionError as exc:
        raise invalid(f"{what}_not_json", f"{what} JSON is nested too deeply") from exc
    except UnicodeEncodeError as exc:
        near = exc.object[max(0, exc.start - 30) : exc.end + 30]
        raise invalid(
            f"{what}_not_utf8", f"{what} holds an unpaired surrogate escape in {near!r}"
        ) from exc
