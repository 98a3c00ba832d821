"""A child forked ahead rehearses a tiny load while it waits for its spec (_child._rehearse)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

from loadwarden.producer.contract import LoadReport, LoadRequest, Outcome
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.sandbox import _child
from tests.conftest import eventually


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


def _rehearsed(report: LoadReport) -> bool:
    """Whether a ``report_rehearsed`` child rehearsed a load before its spec."""
    assert report.error is not None and report.error.code == "loader_error", report.error
    return report.error.message.rsplit("rehearsed=", 1)[1] == "True"


def _waits_for_its_spec(pid: int) -> bool:
    """The child sleeps waiting for its spec (a poll on its socket, which has a timeout, or
    the receive itself): whatever it did before is done; nothing before it blocks."""
    where = Path(f"/proc/{pid}/wchan").read_text()
    return "poll" in where or "skb_wait" in where


async def test_only_a_child_forked_to_wait_while_idle_rehearses(
    make_supervisor: Callable[..., Supervisor], small_model: Path
) -> None:
    """The first load's child is forked for it (its spec follows at once): no rehearsal.
    The next one is forked ahead once that load is over (no load of ours runs): it
    rehearses while it waits, and the load it then serves ends as any other."""
    request = LoadRequest(source=str(small_model))
    async with make_supervisor("report_rehearsed") as sup:
        first = await sup.load(request)
        (waiting,) = await eventually(lambda: sup.forkserver.waiting, what="a child forked ahead")
        await eventually(lambda: _waits_for_its_spec(waiting), what="the child at its receive")
        second = await sup.load(request)
    assert not _rehearsed(first)
    assert _rehearsed(second)
    async with make_supervisor() as sup:
        for _ in range(2):
            report = await sup.load(request)
            assert report.outcome is Outcome.OK, report.error
