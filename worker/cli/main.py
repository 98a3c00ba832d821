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

from loadwarden.worker.cli import _jobs, _local, _queue
from loadwarden.worker.cli._common import DEFAULT_WAIT_S, app

__all__ = ["DEFAULT_WAIT_S", "app", "main"]

# --help lists the commands in this order: the local ones first, then the queue's.
for _command in (
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
):
    app.command()(_command)
app.add_typer(_queue.dead_app, name="dead")
app.add_typer(_queue.failures_app, name="failures")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
