"""A child forked ahead rehearses a tiny load while it waits for its spec (_child._rehearse)."""

from __future__ import annotations

import os
import socket

from loadwarden.worker.sandbox import _child


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_waiting_child_rehearses_and_keeps_no_descriptor() -> None:
    """With no spec waiting the rehearsal runs to its end, sends nothing, and closes its memfd."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        before = _open_fds()
        assert _child._rehearse(theirs) is True
        assert _open_fds() == before
        ours.setblocking(False)
        try:
            sent = ours.recv(64)
        except BlockingIOError:
            sent = None
        assert sent is None  # nothing reached the supervisor's end


def test_a_spec_already_waiting_goes_first() -> None:
    """A spec that is already there skips the rehearsal and is left for the load to read."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        ours.send(b"spec")
        assert _child._rehearse(theirs) is False
        assert theirs.recv(64) == b"spec"


def test_a_closed_supervisor_end_skips_the_rehearsal() -> None:
    """EOF (the supervisor gone) is left for the load's own receive, which then ends the child."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.close()
    with theirs:
        assert _child._rehearse(theirs) is False
        assert theirs.recv(64) == b""
