"""Text for people: untrusted text made safe to show on a terminal, and sizes in binary units
(stdlib only: the logs use it too)."""

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


def human_bytes(n: float) -> str:
    """A size in binary units, as the CLI and the console show it (``1.5 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
