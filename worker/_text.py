"""Untrusted text made safe to show on a terminal (stdlib only: the logs use it too)."""

from __future__ import annotations

import unicodedata


def _visible(ch: str) -> str:
    # Control, format (bidi overrides, zero-width), line/paragraph separators, private use
    # and unassigned characters: shown as an escape, never sent to the terminal as they are.
    category = unicodedata.category(ch)
    if category[0] == "C" or category in ("Zl", "Zp"):
        code = ord(ch)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return ch


def clean(value: object) -> str:
    """Untrusted text as plain characters: every control or format character escaped."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(_visible(ch) for ch in text)
