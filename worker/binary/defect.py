"""The error each binary reader raises: a stable code naming the defect, and a message."""

from __future__ import annotations


class LayoutDefect(Exception):
    """A file's bytes break its format: ``code`` names the defect (stable), ``message`` says
    where and what. Each reader raises its own subclass, so a caller can tell them apart."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
