"""The `loadwarden` console script: stdlib only, so a missing worker extra gets one clear line.

``pip install loadwarden`` is the producer alone; the command line runs on the worker's
dependencies (``pip install 'loadwarden[worker]'``). Without them, importing the command
would end in a traceback naming some module; this says what to install instead.
"""

from __future__ import annotations

import atexit
import gc
import importlib.util
import os
import sys
import threading

#: The top-level modules of the `worker` extra's distributions (pyproject.toml), each looked
#: up before the command is imported: some are imported only when a command needs them.
WORKER_MODULES = (
    "fastapi",
    "httpx",
    "jinja2",
    "ml_dtypes",
    "numpy",
    "prometheus_client",
    "psutil",
    "rich",
    "structlog",
    "tomli_w",
    "typer",
    "uvicorn",
)

#: Exit status of a command that cannot start as installed: a usage error (README, exit codes).
EXIT_USAGE = 2

#: The commands that hold the garbage collector through their start (``hold_collector``):
#: each releases it once imported (``release_collector``), before its work.
HOLDING = ("inspect", "load")

_held = False


def missing_worker_module() -> str | None:
    """The first worker module that cannot be imported here, or None when all can."""
    for name in WORKER_MODULES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # a broken install, or a finder refusing it
            spec = None
        if spec is None:
            return name
    return None


def main() -> None:
    """Run the command line, or say in one line which install it needs (exit 2)."""
    missing = missing_worker_module()
    if missing is not None:
        print(
            f"loadwarden: the command line needs the worker's dependencies ({missing} is not "
            "installed): pip install 'loadwarden[worker]'",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_USAGE)
    hold_collector(sys.argv[1:])
    from loadwarden.worker.cli import _ahead

    _ahead.launch_for(sys.argv[1:])  # first: it starts while the command imports
    from loadwarden.worker.cli.main import main as run

    try:
        run()
    except SystemExit as done:
        exit_now(done)
        raise


def hold_collector(argv: list[str]) -> None:
    """Turn the cyclic garbage collector off while ``inspect`` or ``load`` imports.

    Why: their start (typer, pydantic and the models it builds, the supervisor's stack)
    allocates ~45,000 lasting objects and next to no garbage: the collector ran ~100
    times during an ``inspect`` of a tiny file, ~40 ms of its ~450 ms on this machine,
    and freed ~540 objects (``gc.callbacks``; held, peak RSS is 0.5 MiB more). Only these
    two commands: each turns it back on (``release_collector``) once imported, so a long
    load or a hostile file's inspection runs collected as ever; the others (a worker runs
    for days) never hold it, but for the group's own help, which runs nothing.
    """
    global _held
    helps = argv in ([], ["--help"])  # the group's help: printed, then the process ends
    if (helps or argv[0] in HOLDING) and gc.isenabled():
        gc.disable()
        _held = True


def release_collector() -> None:
    """The collector back on, if ``hold_collector`` held it; what start imported frozen.

    Frozen (``gc.freeze``): the modules, classes and schemas imported so far live until
    exit, and would otherwise all sit in the youngest generation, each rescanned by the
    next collections; frozen, no collection scans them again.
    """
    global _held
    if _held:
        _held = False
        gc.freeze()
        gc.enable()


def exit_now(done: SystemExit) -> None:
    """End the process at once, as the interpreter would but without its teardown; or return.

    Why by hand: after a command the interpreter's finalization (freeing every module,
    pydantic's and typer's included, and a last garbage collection) took ~40 ms of a
    ~250 ms ``load`` or ``inspect`` (measured from the last atexit handler to the parent
    seeing the exit). Nothing in it is ours to wait for once the exit handlers have run
    (logging's flush, ``_ahead``'s unclaimed fork server) and stdout and stderr are
    flushed; the fork server ends the same way. Returns, for the ordinary exit, when
    another thread still runs (the interpreter would wait for it), the exit is a
    message, or a flush fails (the interpreter reports a broken stdout itself).
    """
    code = done.code
    if threading.active_count() > 1 or not (code is None or isinstance(code, int)):
        return
    atexit._run_exitfuncs()  # each runs once: the list is cleared
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        return
    os._exit(code or 0)
