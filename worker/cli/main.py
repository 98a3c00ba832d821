"""The ``loadwarden`` command line.

Exit status: 0 when the command did what it says and every load it reports is
``ok``; 1 when a load ended in any other outcome; 2 for a usage error (a missing
Redis URL included); 3 when no answer could be had (Redis unreachable, unknown job
id, wait timed out). Under ``--json`` stdout holds exactly one document, an error
included (``_common._Commands``).

The commands live by concept: ``_jobs`` (worker, enqueue, preload: jobs through a
queue), ``_local`` (load, inspect, calibrate: here, no Redis), ``_queue`` (what looks
at a queue). Each imports what it runs when it runs, so ``--help`` starts fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from loadwarden.worker.cli import _jobs, _local, _queue
from loadwarden.worker.cli._common import DEFAULT_WAIT_S, app, new_app

__all__ = ["DEFAULT_WAIT_S", "app", "main"]

#: The commands, in the order --help lists them: the local ones first, then the queue's.
COMMANDS: tuple[Callable[..., Any], ...] = (
    _jobs.worker,
    _jobs.enqueue,
    _local.load,
    _local.inspect,
    _jobs.preload,
    _local.calibrate,
    _queue.report,
    _queue.show,
    _queue.status,
    _queue.cancel,
    _queue.autoscale,
    _queue.exporter,
    _queue.serve,
)
for _command in COMMANDS:
    app.command()(_command)
app.add_typer(_queue.dead_app, name="dead")
app.add_typer(_queue.failures_app, name="failures")


def _group() -> None:
    """No options of its own: only what makes ``alone`` a group, as ``app`` is."""


def alone(name: str) -> Any:
    """A group holding only the command ``name`` (typer's name for it), or None.

    Why: typer builds every command's click parameters before it runs one (~9 ms of
    ``loadwarden load``, measured); the command named on the command line is built
    alone instead, in the same group class, so it parses, helps and fails exactly
    as in ``app``. A group (the empty callback) and not a lone command: typer would
    otherwise make it the program itself, without its name.
    """
    for command in COMMANDS:
        if command.__name__.replace("_", "-") == name:
            one = new_app()
            one.callback()(_group)
            one.command()(command)
            return one
    return None


def main() -> None:
    """Console-script entry point."""
    one = alone(sys.argv[1]) if len(sys.argv) > 1 else None
    (one or app)()


if __name__ == "__main__":
    main()
