"""Where per-user files go: the XDG Base Directory rule, written once."""

from __future__ import annotations

import os
from pathlib import Path


def xdg_dir(variable: str, fallback: str) -> Path:
    """``$variable`` when it is set and absolute, else ``~/fallback``.

    The specification calls a relative value invalid and says to ignore it: a
    relative base would name a different folder from every working directory.
    """
    base = os.environ.get(variable, "")
    return Path(base) if os.path.isabs(base) else Path.home() / fallback
