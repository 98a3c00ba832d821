"""Start load children from a preloaded fork server (``children``: what a load does with one).

Why a fork server of our own (measured in ``bench/spawn.py``): forking the
supervisor itself is unsafe (it runs threads and an event loop; CPython warns
about fork with threads) and would copy its whole heap into every child;
``spawn`` or a fresh interpreter costs ~240 ms per child; the stdlib
``forkserver`` re-imports the worker's ``__main__`` in every child (1.15 s per
job inside a real arq worker) and pickles its requests. Ours is a fresh
interpreter that imports numpy and the loaders once, forks a ready child in a
few milliseconds, speaks only fixed-size binary packets on its control socket,
and reports each child's exit with the kernel's own accounting from ``wait4``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog

from loadwarden.worker._tasks import cancel_and_wait
from loadwarden.worker.sandbox import _protocol
from loadwarden.worker.sandbox._backoff import Backoff
from loadwarden.worker.sandbox._launch import (
    AHEAD_TOKEN,
    BASE_PRELOAD,
    INHERITED_ENV,
    Launched,
    child_environment,
    launch,
    preloads,
)
from loadwarden.worker.sandbox.children import (
    Child,
    ChildExit,
    SandboxError,
    kill_group,
    send_with_fds,
    stop_child,
)

# What the fork server's launch (``_launch``) defines is still importable from here.
__all__ = ["BASE_PRELOAD", "INHERITED_ENV", "ForkServer", "child_environment"]

log = structlog.get_logger("loadwarden.sandbox")

#: A fork server that has not finished importing in this long is broken.
START_TIMEOUT_S = 60.0
#: A child's pid and the future of its exit, as its FORKED packet gives them.
Forked = tuple[int, "asyncio.Future[ChildExit]"]

#: Children forked ahead, waiting for a spec (bench/tiny.py): loads start one at a time.
READY_CHILDREN = 1
#: A child forked ahead is replaced past this age: it stops waiting for a spec at 60 s.
READY_MAX_AGE_S = 30.0


class ForkServer:
    """A running fork server and the children it forked for us."""

    def __init__(
        self,
        preload: Sequence[str] = (),
        *,
        ready: int = READY_CHILDREN,
        launched: Launched | None = None,
    ) -> None:
        self.preload = preloads(preload)
        #: A process launched ahead (``_launch``), adopted by the first start if it matches.
        self._launched = launched
        self.ready = ready  # children kept forked ahead, from the first spawn on
        self._ready: collections.deque[tuple[float, Child]] = collections.deque()
        self._filling: asyncio.Task[None] | None = None
        #: The child requested at launch (``Launched.ahead``) on its way to ``_ready``.
        self._adopting: asyncio.Task[None] | None = None
        #: Awaited with each child forked ahead (to place it in a cgroup; OSError: left as is).
        self.on_ready: Callable[[Child], Awaitable[None]] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._tokens = itertools.count(1)
        #: Spawn token -> the child's pid and its exit, resolved by its FORKED packet (the
        #: exit is taken then: a REAPED read in the same burst would leave none to look up).
        self._forks: dict[int, asyncio.Future[Forked]] = {}
        self._exits: dict[int, asyncio.Future[ChildExit]] = {}
        #: Children handed to loads so far (tests assert that a rejected file started none).
        self.spawned = 0
        #: Children ``spawn`` lent and not yet ``returned``.
        self._lent = 0
        #: Set by ``close``: no child is forked ahead, no lost fork server started again.
        self._closing = False
        #: Called each time a fork server is started in place of a lost one (a metric).
        self.on_restart: Callable[[], object] | None = None
        self.restarts = 0
        self._restarting: asyncio.Task[None] | None = None
        self._backoff = Backoff()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def waiting(self) -> list[int]:  # the pids of the children forked ahead
        return [child.pid for _born, child in self._ready]

    @property
    def alive(self) -> bool:
        return self._reader is not None and not self._reader.done()

    async def start(self) -> None:
        """Start the fork server (if it is not running) and wait until it has preloaded.

        While a lost fork server's backoff runs (``_backoff``), SandboxError at once."""
        async with self._lock:
            self._closing = False  # started again after close: children are forked ahead again
            if self.alive:
                return
            if (refusal := self._backoff.refusal()) is not None:
                raise SandboxError(refusal)
            await self._stop_process()
            try:
                await self._start_process()
            except Exception as exc:
                again_s = self._backoff.failed()
                log.warning("forkserver_start_failed", error=str(exc), again_in_s=again_s)
                raise
            self._backoff.started()

    def _lost(self) -> None:
        """The fork server exited (killed, crashed) while we held it: count its life for the
        backoff and start another (``_restart``); its children die with it, but for one forked
        so late that it saw no fork server to die with (``PR_SET_PDEATHSIG``): killed here."""
        for _born, child in self._ready:
            kill_group(child.pid)
        lived_s, again_s = self._backoff.lost()
        log.warning("forkserver_lost", pid=self.pid, lived_s=lived_s, again_in_s=again_s)
        if not self._closing and (self._restarting is None or self._restarting.done()):
            self._restarting = asyncio.get_running_loop().create_task(
                self._restart(), name="loadwarden-forkserver-restart"
            )

    async def _restart(self) -> None:
        """Reap the lost fork server now (not a zombie through the backoff), then start another
        when the backoff allows; a failed start (counted by ``start``) is tried again later."""
        while True:
            async with self._lock:
                if self.alive:  # started meanwhile by a load's spawn, or by the start below
                    break
                await self._stop_process()
            await asyncio.sleep(self._backoff.wait_s())
            with contextlib.suppress(Exception):  # logged and counted by start
                await self.start()
        while self._ready and self._ready[0][1].exited.done():  # forked by the lost one
            await self._discard(self._ready.popleft()[1])  # killed by _lost: its cgroup goes
        self.restarts += 1
        log.info("forkserver_restarted", pid=self.pid, restarts=self.restarts)
        if self.on_restart is not None:
            self.on_restart()
        self._refill()

    async def _start_process(self) -> None:
        loop = asyncio.get_running_loop()
        launched, self._launched = self._launched, None
        if launched is not None and launched.preload != self.preload:
            launched.abandon()
            launched = None
        if launched is None:
            launched = launch(self.preload)
        self._process, ours, ahead = launched.process, launched.control, launched.ahead
        ours.setblocking(False)
        self._control = ours
        started = loop.time()
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                try:
                    first = await loop.sock_recv(ours, _protocol.MAX_CONTROL_BYTES)
                except ConnectionResetError:  # died with a spawn request unread (launch ahead)
                    first = b""
            if first != _protocol.READY:
                raise SandboxError("the fork server did not start (see its stderr above)")
        except BaseException:
            if ahead is not None:
                ahead.close()
            await self._stop_process()
            raise
        if ahead is not None:  # its FORKED comes next: the reader must find its waiter
            forked = loop.create_future()
            self._forks[AHEAD_TOKEN] = forked
            self._adopting = loop.create_task(
                self._adopt(ahead, forked), name="loadwarden-forkserver-ahead"
            )
        self._reader = asyncio.create_task(self._read(ours), name="loadwarden-forkserver-reader")
        log.info(
            "forkserver_started",
            pid=self._process.pid,
            preload=list(self.preload),
            start_seconds=round(loop.time() - started, 3),
        )

    async def _read(self, control: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await loop.sock_recv(control, _protocol.MAX_CONTROL_BYTES):
                self._dispatch(data)
        except OSError as exc:
            log.warning("forkserver_control_failed", error=str(exc))
        finally:
            gone = SandboxError("the fork server exited")
            waiting: list[asyncio.Future[Any]] = [*self._forks.values(), *self._exits.values()]
            for pending in waiting:
                if not pending.done():
                    pending.set_exception(gone)
                    pending.exception()  # mark retrieved: a cancelled waiter never reads it
            self._forks.clear()
            self._exits.clear()
        self._lost()  # not when cancelled: that is our own stop (``_stop_process``)

    def _dispatch(self, data: bytes) -> None:
        kind, body = data[:1], data[1:]
        if kind == _protocol.FORKED:
            token, pid = _protocol.FORKED_MSG.unpack(body)
            waiter = self._forks.pop(token, None)
            exited = self._exits.setdefault(pid, asyncio.get_running_loop().create_future())
            if waiter is None or waiter.done():  # its spawn() was cancelled: do not leak it
                kill_group(pid)
            else:
                waiter.set_result((pid, exited))
        elif kind == _protocol.FORK_FAILED:
            token, errno = _protocol.FORK_FAILED_MSG.unpack(body)
            waiter = self._forks.pop(token, None)
            if waiter is not None and not waiter.done():
                waiter.set_exception(SandboxError(f"fork failed: {os.strerror(errno)}"))
        elif kind == _protocol.REAPED:
            pid, status, utime, stime, maxrss = _protocol.REAPED_MSG.unpack(body)
            future = self._exits.pop(pid, None)  # None: a reparented grandchild
            if future is not None and not future.done():
                future.set_result(ChildExit.from_wait(pid, status, utime, stime, maxrss))

    async def spawn(self, *, lent: bool = False) -> Child:
        """A fresh child for one load, waiting for its spec (forked ahead, or now), confined
        only as far as no spec needs (``_child._confine_process``); another is forked ahead.

        A child ``lent`` (to ``run_child``) while no other lent child is out has the next
        one forked ahead only when it is ``returned``: fork server, new child and its
        placement then no longer share the two CPUs with the load's own child. Measured on
        paced tiny loads: spec -> final message 5.9 -> 3.7 ms (p50), its child's CPU over
        that span 2.4 -> 2.1 ms. While another lent child is out (a backlog), the next is
        forked at once, as for any other caller.
        """
        if self._adopting is not None:  # requested at launch: served before any fork of ours
            await asyncio.wait([self._adopting])
            self._adopting = None
        child = await self._take_ready()
        if child is None:
            child = await self._fork()
        self.spawned += 1
        if lent:
            self._lent += 1
        if not lent or self._lent > 1:
            self._refill()
        return child

    def returned(self) -> None:
        """A child ``spawn`` lent is stopped: fork the next one ahead now if it waited."""
        self._lent -= 1
        self._refill()

    def _refill(self) -> None:
        """Fork children ahead until ``ready`` wait (in a task; one at a time)."""
        if (
            self.ready
            and not self._closing
            and len(self._ready) < self.ready
            and (self._filling is None or self._filling.done())
        ):
            self._filling = asyncio.get_running_loop().create_task(
                self._fill(), name="loadwarden-forkserver-ready"
            )

    async def _take_ready(self) -> Child | None:
        while self._ready:
            born, child = self._ready.popleft()
            if not child.exited.done() and time.monotonic() - born < READY_MAX_AGE_S:
                return child
            await self._discard(child)  # stale, or gone with a fork server that exited
        return None

    @staticmethod
    async def _discard(child: Child) -> None:  # a child forked ahead that no load will take
        with contextlib.suppress(SandboxError):  # the fork server is gone: so is the child
            await stop_child(child)
        if child.cgroup is not None:
            child.cgroup.remove()

    async def _fill(self) -> None:
        try:
            while self.alive and len(self._ready) < self.ready:
                await self._keep(await self._fork())
        except (SandboxError, OSError) as exc:  # the next load forks its own, or says why not
            log.debug("ready_child_failed", error=str(exc))

    async def _adopt(self, ours: socket.socket, forked: asyncio.Future[Forked]) -> None:
        """The child requested at launch (``launch(fork_ahead=True)``) joins the ready ones,
        placed like them (``on_ready``) and aged like them (``READY_MAX_AGE_S``)."""
        try:
            pid, exited = await forked
        except BaseException as exc:
            ours.close()
            if forked.done() and not forked.cancelled() and forked.exception() is None:
                kill_group(forked.result()[0])  # forked, then we were cancelled (close)
            if isinstance(exc, SandboxError):  # the first load forks its own, or says why not
                log.debug("ready_child_failed", error=str(exc))
                return
            raise
        ours.setblocking(False)
        await self._keep(Child(pid, ours, exited))

    async def _keep(self, child: Child) -> None:
        """Place a child forked ahead (``on_ready``) and keep it for the next load."""
        try:
            if self.on_ready is not None:
                with contextlib.suppress(OSError):
                    await self.on_ready(child)
        except BaseException:  # cancelled (close) while placed: no load will take it
            await self._discard(child)
            raise
        self._ready.append((time.monotonic(), child))

    async def _fork(self) -> Child:
        if not self.alive:
            await self.start()
        assert self._control is not None
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        token = next(self._tokens)
        forked: asyncio.Future[Forked] = loop.create_future()
        self._forks[token] = forked
        try:
            await send_with_fds(
                self._control, _protocol.SPAWN + _protocol.TOKEN.pack(token), [theirs.fileno()]
            )
            pid, exited = await forked
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        return Child(pid, ours, exited)

    async def close(self) -> None:
        """Stop the children forked ahead, then the fork server; the rest die with it
        (``PR_SET_PDEATHSIG``)."""
        self._closing = True
        if self._restarting is not None:  # first: it may wait for the lock below
            await cancel_and_wait(self._restarting)
        async with self._lock:
            for task in (self._filling, self._adopting):  # forks on their way to wait
                if task is not None:
                    await cancel_and_wait(task)
            self._adopting = None
            while self._ready:
                await self._discard(self._ready.popleft()[1])
            if self._launched is not None:  # launched ahead, never started
                self._launched.abandon()
                self._launched = None
            await self._stop_process()
            self._backoff = Backoff()

    async def _stop_process(self) -> None:
        if self._control is not None:
            self._control.close()  # the fork server sees EOF and exits
            self._control = None
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        process, self._process = self._process, None
        if process is not None:
            try:
                async with asyncio.timeout(5):
                    await asyncio.to_thread(process.wait)
            except TimeoutError:
                process.kill()
                await asyncio.to_thread(process.wait)
            if process.returncode and not self._closing:  # lost, or failed to start: why
                log.warning("forkserver_exited", pid=process.pid, returncode=process.returncode)
