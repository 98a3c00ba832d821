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
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence

import structlog

from loadwarden.worker._tasks import cancel_and_wait
from loadwarden.worker.sandbox import _protocol
from loadwarden.worker.sandbox._control import Forked, Waiters
from loadwarden.worker.sandbox._launch import (
    AHEAD_TOKEN,
    BASE_PRELOAD,
    INHERITED_ENV,
    Launched,
    child_environment,
    launch,
    preloads,
)
from loadwarden.worker.sandbox._restart import Restart
from loadwarden.worker.sandbox.children import (
    Child,
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
        self._waiters = Waiters()  # for the fork server's packets
        #: Children handed to loads so far (tests assert that a rejected file started none).
        self.spawned = 0
        #: Children ``spawn`` lent and not yet ``returned``.
        self._lent = 0
        #: Set by ``close``: no child is forked ahead, no lost fork server started again.
        self._closing = False
        #: Called each time a fork server is started in place of a lost one (a metric).
        self.on_restart: Callable[[], object] | None = None
        self.restarts = 0
        self._restart = Restart()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def waiting(self) -> list[int]:  # the pids of the children forked ahead
        return [child.pid for _born, child in self._ready]

    @property
    def alive(self) -> bool:
        return self._reader is not None and not self._reader.done()

    @property
    def down_s(self) -> float:
        """Seconds since a fork server was lost while none has stayed up since (``_backoff``)."""
        return self._restart.backoff.down_s()

    @property
    def restarting(self) -> bool:
        """A lost fork server is being started again (its backoff, or its start, under way)."""
        return self._restart.under_way

    async def start(self) -> None:
        """Start the fork server (if it is not running) and wait until it has preloaded.

        While a lost fork server's backoff runs (``_backoff``), SandboxError at once: a load
        waits for the restart first (``running``)."""
        async with self._lock:
            self._closing = False  # started again after close: children are forked ahead again
            if self.alive:
                return
            if (refusal := self._restart.backoff.refusal()) is not None:
                raise SandboxError(refusal)
            await self._start_locked()

    async def _start_locked(self) -> None:  # holding self._lock
        await self._stop_process()
        try:
            await self._start_process()
        except Exception as exc:
            again_s = self._restart.backoff.failed()
            log.warning("forkserver_start_failed", error=str(exc), again_in_s=again_s)
            raise
        self._restart.backoff.started()

    async def running(self) -> None:
        """Wait out a lost fork server's restart (its backoff, then its start): return once
        one runs, at once if no restart is under way; SandboxError if the restart's start
        failed. Unbounded here: a load bounds it by its job's deadline (``ChildHost``)."""
        while not self.alive and (start := self._restart.next_start()) is not None:
            await asyncio.shield(start)

    def _lost(self, children: list[int]) -> None:
        """The fork server exited (killed, crashed) while we held it: count its life for the
        backoff and start another (``_come_back``); its children die with it, but for one
        forked so late that it saw no fork server to die with (``PR_SET_PDEATHSIG``): killed
        here. As PID 1, we reap them (``_orphans``)."""
        for _born, child in self._ready:
            kill_group(child.pid)
        lived_s, again_s = self._restart.backoff.lost()
        log.warning("forkserver_lost", pid=self.pid, lived_s=lived_s, again_in_s=again_s)
        if not self._closing:
            self._restart.lost(children, self._come_back)

    async def _come_back(self) -> None:
        """Start a fork server in place of a lost one (``_start_again``) and replace what the
        lost one forked ahead; lost again meanwhile: again."""
        while not self.alive:
            await self._start_again()
            while self._ready and self._ready[0][1].exited.done():  # forked by the lost one
                await self._discard(self._ready.popleft()[1])  # killed by _lost: its cgroup goes
            self.restarts += 1
            log.info("forkserver_restarted", pid=self.pid, restarts=self.restarts)
            if self.on_restart is not None:
                self.on_restart()
            self._refill()

    async def _start_again(self) -> None:
        """Reap the lost fork server now (not a zombie through the backoff), then start another
        when the backoff allows. A failed start (counted by the backoff) fails the loads
        waiting for it (an attempt each) and is tried again later."""
        while True:
            async with self._lock:
                if self.alive:  # started meanwhile by a load's spawn
                    break
                await self._stop_process()
                self._restart.reap_left()
            await asyncio.sleep(self._restart.backoff.wait_s())
            async with self._lock:
                try:
                    if not self.alive:
                        await self._start_locked()
                    break
                except SandboxError as exc:  # logged and counted by _start_locked
                    self._restart.settle(exc)  # "the fork server did not start (...)"
                except Exception as exc:  # the same
                    self._restart.settle(SandboxError(f"the fork server did not start: {exc}"))
        self._restart.settle(None)

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
            self._waiters.forks[AHEAD_TOKEN] = forked
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
                self._waiters.dispatch(data)
        except OSError as exc:
            log.warning("forkserver_control_failed", error=str(exc))
        finally:
            children = self._waiters.gone()
        self._lost(children)  # not when cancelled: that is our own stop (``_stop_process``)

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
                # Forked while no load of ours runs: it rehearses one while it waits.
                await self._keep(await self._fork(idle=self._lent == 0))
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

    async def _fork(self, *, idle: bool = False) -> Child:
        if not self.alive:
            await self.start()
        assert self._control is not None
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        token = next(self._tokens)
        forked: asyncio.Future[Forked] = loop.create_future()
        self._waiters.forks[token] = forked
        try:
            await send_with_fds(
                self._control,
                (_protocol.SPAWN_IDLE if idle else _protocol.SPAWN) + _protocol.TOKEN.pack(token),
                [theirs.fileno()],
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
        await self._restart.close()  # first: it may wait for the lock below
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
            self._restart = Restart()

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
