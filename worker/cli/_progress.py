"""Preload progress on stderr: a live table on a terminal, plain lines (or JSON) without one."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from loadwarden.producer.preload import PreloadEntry
from loadwarden.worker.cli import _render

if TYPE_CHECKING:
    from rich.live import Live


class Progress:
    """Preload progress on stderr: a live table on a terminal, else one line per finished entry.

    The total is the catalog's size from the first line on. Without a terminal (a log
    file, CI) each entry is printed as it finishes: plain text, or with --json one JSON
    object per line, so stdout stays the one result document.
    """

    def __init__(self, total: int, as_json: bool) -> None:
        self.total = total
        self.as_json = as_json
        self.view: dict[int, PreloadEntry] = {}  # every entry, in catalog order, by identity
        self.done: set[int] = set()
        self.live: Live | None = None
        if _render.err_console.is_terminal and not as_json:
            from rich.live import Live

            self.live = Live(console=_render.err_console, transient=True, auto_refresh=False)

    def __enter__(self) -> Progress:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def update(self, entry: PreloadEntry) -> None:
        self.view.setdefault(id(entry), entry)
        if self.live is not None:
            if len(self.view) < self.total:
                return  # the batch announces every entry first: draw once all are known
            self.live.update(
                _render.preload_progress(list(self.view.values()), self.total), refresh=True
            )
            return
        finished = entry.report is not None or entry.state in ("skipped", "unfinished")
        if not finished or id(entry) in self.done:
            return
        self.done.add(id(entry))
        if self.as_json:
            event = {
                "event": "preload_progress",
                "done": len(self.done),
                "total": self.total,
                "name": entry.name,
                "job_id": entry.job_id,
                "state": str(entry.state),
                "outcome": str(entry.report.outcome) if entry.report else None,
                "cached": entry.cached,
            }
            print(json.dumps(event), file=sys.stderr, flush=True)
        else:
            line = _render.preload_line(entry, len(self.done), self.total)
            print(line, file=sys.stderr, flush=True)
