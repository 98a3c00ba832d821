"""``load``'s fork server, launched before the command line imports anything else.

``loadwarden load`` needs a fork server (a fresh interpreter importing numpy and the
loaders, ~100 ms) and imports typer, pydantic, the contract and the supervisor's
stack itself (~200 ms). Launched first, by the console script (``entry``) before
those imports, the fork server starts on the other core meanwhile; ``_local.load``
hands it to its ``ForkServer`` (``launched=``), which checks it exactly as one it
launched (the READY packet, then ``Supervisor.start``). Stdlib only, like ``entry``.

It is launched with the load's spawn request already queued (``fork_ahead``): once ready,
it forks the child while the command still imports, and the load takes that child.
A command line that turns out not to run a load (a usage error) leaves it unclaimed:
it is killed and reaped at exit, and the child it may have forked dies with it.

``importing`` overlaps another import (the renderer) with the load's wait on its child.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import itertools
import sys
import threading
from collections.abc import Iterator

from loadwarden.worker.sandbox._launch import Launched, launch, preloads

_launched: Launched | None = None


def runs_load(argv: list[str]) -> bool:
    """Whether these arguments (after the program's name) run ``load``, not its help."""
    options = itertools.takewhile(lambda a: a != "--", argv[1:])
    return argv[:1] == ["load"] and "--help" not in options


def launch_for(argv: list[str]) -> None:
    """Launch a fork server now if ``argv`` runs ``load`` (and ``starts_first``);
    ``take`` claims it."""
    global _launched
    if _launched is None and runs_load(argv) and starts_first():
        _launched = launch(preloads(), fork_ahead=True)
        atexit.register(_abandon)


def starts_first(path: str = "/proc/self/cgroup") -> bool:
    """Whether a load's fork server may start before its supervisor finds its cgroups.

    Not where that search would delegate cgroup v2 (``CgroupManager.detect``: no v1
    memory controller, a unified hierarchy): ``delegate_v2`` moves the supervisor into
    the leaf ``<tag>-supervisor`` and then enables controllers in the cgroup it left,
    which the kernel refuses (EBUSY, the no-internal-process rule) while any other
    process is still in it: a fork server started first, or the child it forked ahead,
    would leave every load without cgroups (or refused, with ``require_cgroups``).
    Started by ``Supervisor.start`` after the search, it is launched from the leaf.

    Read as ``memory_limit.own_cgroups`` reads it (a test holds them together), but
    without importing it: its dataclasses import would delay the launch ~15 ms.
    """
    try:
        with open(path, encoding="utf-8") as lines:
            fields = [line.rstrip("\n").split(":", 2) for line in lines]
    except OSError:
        return True  # detect finds no cgroups: nothing to delegate
    controllers = {c for f in fields if len(f) == 3 for c in (f[1].split(",") if f[1] else [""])}
    return "memory" in controllers or "" not in controllers


def take() -> Launched | None:
    """The fork server launched ahead, once (None: none was, or it was taken)."""
    global _launched
    taken, _launched = _launched, None
    return taken


def _abandon() -> None:
    taken = take()
    if taken is not None:
        taken.abandon()


#: The interpreter's switch interval while ``importing`` runs (its default is 5 ms).
_SWITCH_S = 0.0005


@contextlib.contextmanager
def importing(names: tuple[str, ...]) -> Iterator[None]:
    """Import ``names`` in a thread while the block runs; joined when it ends.

    Why: a tiny load spends ~15-20 ms of the command's wall time waiting on its child
    (the supervisor's loop idle in select), and the human-readable report then imports
    rich (~15 ms) after it. Imported in a thread meanwhile, the two overlap. The thread
    holds the GIL while the loop waits; the switch interval is lowered meanwhile so that
    the loop, woken by the child's replies, gets it back within half a millisecond instead
    of five. An import that fails here is imported again (and raises) where it is used.
    """
    if not names:
        yield
        return
    previous = sys.getswitchinterval()
    sys.setswitchinterval(_SWITCH_S)
    thread = threading.Thread(target=_import_all, args=(names,), name="loadwarden-import")
    thread.start()
    try:
        yield
    finally:
        thread.join()
        sys.setswitchinterval(previous)


def _import_all(names: tuple[str, ...]) -> None:
    with contextlib.suppress(Exception):
        for name in names:
            importlib.import_module(name)
