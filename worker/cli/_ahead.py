"""``load``'s fork server, launched before the command line imports anything else.

``loadwarden load`` needs a fork server (a fresh interpreter importing numpy and the
loaders, ~100 ms) and imports typer, pydantic, the contract and the supervisor's
stack itself (~200 ms). Launched first, by the console script (``entry``) before
those imports, the fork server starts on the other core meanwhile; ``_local.load``
hands it to its ``ForkServer`` (``launched=``), which checks it exactly as one it
launched (the READY packet, then ``Supervisor.start``). Stdlib only, like ``entry``.

A command line that turns out not to run a load (a usage error) leaves it unclaimed:
it is killed and reaped at exit, before it has forked anything.
"""

from __future__ import annotations

import atexit
import itertools

from loadwarden.worker.sandbox._launch import Launched, launch, preloads

_launched: Launched | None = None


def runs_load(argv: list[str]) -> bool:
    """Whether these arguments (after the program's name) run ``load``, not its help."""
    options = itertools.takewhile(lambda a: a != "--", argv[1:])
    return argv[:1] == ["load"] and "--help" not in options


def launch_for(argv: list[str]) -> None:
    """Launch a fork server now if ``argv`` runs ``load``; ``take`` claims it."""
    global _launched
    if _launched is None and runs_load(argv):
        _launched = launch(preloads())
        atexit.register(_abandon)


def take() -> Launched | None:
    """The fork server launched ahead, once (None: none was, or it was taken)."""
    global _launched
    taken, _launched = _launched, None
    return taken


def _abandon() -> None:
    taken = take()
    if taken is not None:
        taken.abandon()
