"""A load child as the supervisor holds it: its socket, its spec, its exit, and how it is stopped.

The fork server (``forkserver``) makes children; this module is what a load does with
one: hand it its spec and descriptors, read its messages, and stop it. ``stop_child`` is
the only function that stops a child (kill discipline in one place).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import structlog

from loadwarden.producer.errors import LoadwardenError
from loadwarden.worker.sandbox import _protocol
from loadwarden.worker.sandbox.cgroups import Cgroup
from loadwarden.worker.sandbox.spec import ChildSpec

log = structlog.get_logger("loadwarden.sandbox")

#: Packets up to this size fit any Linux socket's default send buffer (wmem_default is
#: 208 KiB on most kernels); a larger spec raises the buffer for its own socket.
DEFAULT_SEND_BYTES = 64 * 1024
#: How long to wait for the fork server to report a killed child's exit.
REAP_TIMEOUT_S = 10.0


class SandboxError(LoadwardenError):
    """The sandbox machinery itself failed (fork server gone, fork failed, protocol broken)."""


@dataclass(frozen=True, slots=True)
class ChildExit:
    """How a child ended, from the kernel's accounting (``wait4``) in the fork server."""

    pid: int
    exit_code: int | None
    signal: int | None
    cpu_user_s: float
    cpu_system_s: float
    maxrss_bytes: int
    killed: bool = False

    @classmethod
    def from_wait(
        cls, pid: int, status: int, utime_us: int, stime_us: int, maxrss_kib: int
    ) -> ChildExit:
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        return cls(pid, code, sig, utime_us / 1e6, stime_us / 1e6, maxrss_kib * 1024)

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signal).name if self.signal else None


class Child:
    """One load child: its pid (also its process group), its socket, its exit."""

    def __init__(self, pid: int, sock: socket.socket, exited: asyncio.Future[ChildExit]) -> None:
        self.pid = pid
        self.sock = sock
        self.exited = exited
        #: The cgroup it waited in, when it was forked ahead and placed (``on_ready``).
        self.cgroup: Cgroup | None = None

    async def send_spec(self, spec: ChildSpec, fds: int | Sequence[int]) -> None:
        """Hand the child its job and the model's open descriptors (never a path to reopen)."""
        data = json.dumps(spec.to_json(), separators=(",", ":")).encode()
        if len(data) > _protocol.MAX_SPEC_BYTES:
            raise SandboxError(f"spec of {len(data)} bytes is too large")
        if len(data) > DEFAULT_SEND_BYTES:
            # One packet must fit the socket's send buffer (the kernel doubles what we ask).
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, len(data) + 4096)
        handed = [fds] if isinstance(fds, int) else list(fds)
        step = _protocol.FDS_PER_MESSAGE
        await send_with_fds(self.sock, data, handed[:step])
        for start in range(step, len(handed), step):
            await send_with_fds(self.sock, b"fds", handed[start : start + step])

    async def receive(self) -> dict[str, Any] | None:
        """The child's next message, or None once it has closed its socket (exited)."""
        loop = asyncio.get_running_loop()
        data = await loop.sock_recv(self.sock, _protocol.MAX_REPLY_BYTES + 1)
        if not data:
            return None
        if len(data) > _protocol.MAX_REPLY_BYTES:
            raise SandboxError("the child sent an oversized message")
        try:
            message = json.loads(data.decode("utf-8", errors="strict"))
        except (UnicodeDecodeError, ValueError):
            raise SandboxError("the child sent a message that is not JSON") from None
        if not isinstance(message, dict):
            raise SandboxError("the child sent a message that is not a JSON object")
        return message


def kill_group(pid: int) -> bool:
    """SIGKILL the child's process group, and the child itself in case it has not called setsid.

    The one way a child is killed (a load child by ``stop_child``, the inspection child by
    ``inspector``); whether it is gone yet is for the caller's reaping to say.
    """
    sent = False
    for kill, target in ((os.killpg, pid), (os.kill, pid)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(target, signal.SIGKILL)
            sent = True
    return sent


async def stop_child(child: Child) -> ChildExit:
    """Stop a child and everything in its process group, reap it, and say how it ended.

    The only function that stops a child: every wait on a child sits in a
    ``try/finally`` that calls it. A load child holds nothing worth a graceful
    stop, so it gets SIGKILL at once; then the group is killed again, for any
    grandchild left behind by a leader that already exited.
    """
    killed = False
    try:
        if not child.exited.done():
            killed = kill_group(child.pid)
        try:
            async with asyncio.timeout(REAP_TIMEOUT_S):
                ended = await asyncio.shield(child.exited)
        except TimeoutError:
            raise SandboxError(
                f"child {child.pid} was not reaped within {REAP_TIMEOUT_S} s"
            ) from None
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        child.sock.close()
    if killed:
        log.debug("child_killed", child_pid=child.pid, signal=ended.signal_name)
    return replace(ended, killed=killed)


def resolve(future: asyncio.Future[None]) -> None:
    """Set ``future``'s result unless it is done (a reader's or writer's callback)."""
    if not future.done():
        future.set_result(None)


async def one_exits(pids: Sequence[int]) -> None:
    """Return once one of ``pids`` (our children) has exited, without reaping it: its pidfd
    becomes readable; at once if one is gone already."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    fds: list[int] = []
    try:
        for pid in pids:
            try:
                fds.append(os.pidfd_open(pid))
            except ProcessLookupError:
                return
            loop.add_reader(fds[-1], resolve, exited)
        await exited
    finally:
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)


async def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            socket.send_fds(sock, [data], fds)
            return
        except BlockingIOError:
            writable: asyncio.Future[None] = loop.create_future()
            loop.add_writer(sock.fileno(), resolve, writable)
            try:
                await writable
            finally:
                loop.remove_writer(sock.fileno())
