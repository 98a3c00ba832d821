"""Launch a fork server's process: stdlib only, so a command can launch it before its imports.

``forkserver.ForkServer`` launches through this and then waits for the READY packet. The
``load`` command launches one ahead (``worker/cli/_ahead.py``) before it imports anything
else: the fork server's own start (a fresh interpreter importing numpy and the loaders)
then runs on the other core while the command imports and checks, and ``ForkServer``
adopts the running process (``launched=``): the same command, environment and checks.
``launch(fork_ahead=True)`` also queues a spawn request on the control socket at once: the
fork server serves it as soon as it is ready (as any request: a fork like every other), so
the load's child is forked and waiting for its spec before the command asks for one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence

#: Modules every fork server imports before it forks: the child's own code
#: (which imports its loaders, numpy and ml_dtypes).
BASE_PRELOAD = ("loadwarden.worker.sandbox._child",)

#: The token of the spawn request queued at launch (``ForkServer``'s own start at 1).
AHEAD_TOKEN = 0

#: The only variables a child inherits from the supervisor: never its secrets
#: (a Redis password, cloud credentials), which a loader could read in /proc/self/environ.
INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "HOME")


def child_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in INHERITED_ENV}
    # The fork server imports what the supervisor imports (tests, editable installs).
    # Absolute: it starts in "/" (below), and "" (the supervisor's working directory, for
    # `python -c` or `-m`) must stay what it is to the supervisor, as much and no more.
    env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in sys.path)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    # `python -m` would put the working directory first on sys.path, ahead of the standard
    # library: a `socket.py` or `numpy.py` in the folder a user runs `loadwarden load` from
    # (a cloned model repository) would run in the fork server, unconfined, and be inherited
    # by every child. Safe path (3.11+) leaves it out; the server also starts in "/".
    env["PYTHONSAFEPATH"] = "1"
    return env


def preloads(extra: Sequence[str] = ()) -> tuple[str, ...]:
    """What a fork server imports: the base modules, then ``extra``, each once."""
    return tuple(dict.fromkeys((*BASE_PRELOAD, *extra)))


class Launched:
    """A fork server's process, launched, and our end of its control socket (blocking).

    A plain class, not a dataclass: ``dataclasses`` imports ``inspect`` (6-17 ms here,
    ``-X importtime``), which would delay the launch it is imported for.
    """

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        control: socket.socket,
        preload: tuple[str, ...],
        ahead: socket.socket | None = None,
    ) -> None:
        self.process = process
        self.control = control
        self.preload = preload
        #: Our end of the socket of the child requested at launch (``AHEAD_TOKEN``), if any.
        self.ahead = ahead

    def abandon(self) -> None:
        """Stop it unused: it is ours, holding nothing yet but the child it may have forked
        ahead, which dies with it (``PR_SET_PDEATHSIG``) (SIGKILL, then reaped)."""
        if self.ahead is not None:
            self.ahead.close()
        self.control.close()
        self.process.kill()
        self.process.wait()


def launch(preload: tuple[str, ...], *, fork_ahead: bool = False) -> Launched:
    """Start ``python -m loadwarden.worker.sandbox._forkserver`` (a plain fork+exec, a few ms);
    with ``fork_ahead``, queue the request for one child (``AHEAD_TOKEN``) behind its READY."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    cmd = [
        sys.executable,
        "-m",
        "loadwarden.worker.sandbox._forkserver",
        str(theirs.fileno()),
        str(os.getpid()),
        *preload,
    ]
    try:
        process = subprocess.Popen(
            cmd,
            pass_fds=[theirs.fileno()],
            env=child_environment(),
            stdin=subprocess.DEVNULL,
            cwd="/",
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    launched = Launched(process, ours, preload)
    if fork_ahead:
        launched.ahead = _request_child(ours)
    return launched


def _request_child(control: socket.socket) -> socket.socket | None:
    """Queue a spawn request (``AHEAD_TOKEN``) and return our end of the child's socket.

    Only an optimisation: where it cannot be sent, None, and the first load forks its
    child as it would have (the request is one small packet on an empty socket).
    """
    # Imported here, once the fork server is on its way (hashlib and json: ~4 ms).
    from loadwarden.worker.sandbox import _protocol

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        message = _protocol.SPAWN + _protocol.TOKEN.pack(AHEAD_TOKEN)
        socket.send_fds(control, [message], [theirs.fileno()], socket.MSG_DONTWAIT)
    except OSError:
        ours.close()
        return None
    finally:
        theirs.close()
    return ours
