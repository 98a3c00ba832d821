"""Preloaded by a test's fork server: it dies at once on start while ``$TMPDIR/forkserver-dies``
exists (TMPDIR is one of the few variables the fork server inherits), and starts otherwise."""

from __future__ import annotations

import os
import tempfile

MARKER = "forkserver-dies"

if os.path.exists(os.path.join(tempfile.gettempdir(), MARKER)):
    os._exit(1)
