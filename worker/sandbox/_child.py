"""Code that runs inside a load child: confine this process, load one model, answer, exit.

Imported by the fork server before it forks anything, so that numpy, ml_dtypes
and the loaders are already in memory when a child starts. Stdlib, numpy and
ml_dtypes only: this module must stay lean because every child's RSS starts
from the fork server's.

What confines a child, and where it is done:

1. Inherited from the fork server (``_forkserver._confine_self``), in place before
   the child runs a line of its own: no_new_privs and the seccomp filter (no new
   sockets). Both are per-process, kernel-kept and irrevocable, so doing them once
   there confines every child as much as doing them in each, for none of its CPU.
2. After fork, before the spec arrives (children are forked ahead):
   ``_keep_only`` (descriptors), then ``_confine_process`` (session,
   pdeathsig, no_new_privs again, no core, oom_score_adj), then a Landlock
   ruleset for what the interpreter reads (the paths found once in the fork
   server, and this child's own /proc/PID/io), built but not yet enforced.
3. With the spec (it depends on it): the file's identity, rlimits sized from
   the child's own memory, then Landlock enforced, the model's descriptors
   added to its rules, and the seccomp filter where it was not inherited. Only
   then does the loader touch the file.

The fork server also runs this module's spec, load and reply code once on a
file of its own (``warm_up``), so that children inherit that bytecode already
quickened instead of each rewriting it (copy-on-write faults). A child forked
ahead runs that code once more while it waits for its spec (``_rehearse``): the
pages a load writes to are copied then, not between its spec and its answer.
"""

from __future__ import annotations

import os

# Before numpy is imported: one BLAS thread (no idle threads with their own
# stacks in the fork server), and no Rust backtraces (a test loader may still
# use safetensors' Rust code; a child that hits RLIMIT_DATA while printing one
# can hang forever).
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["RUST_BACKTRACE"] = "0"
# And no transparent huge pages for numpy's large arrays: filling fresh arrays by
# pread was 2-3x slower with them here (the kernel compacts memory to find 2 MiB
# pages at fault time; measured with bench/load.py).
os.environ["NUMPY_MADVISE_HUGEPAGE"] = "0"

import contextlib
import json
import math
import resource
import signal
import socket
import stat
import traceback
from typing import Any

# The loaders register themselves in _registry as they are imported (no cycle: they import
# _registry, never this module).
from loadwarden.worker.sandbox import (
    _landlock,
    _linux,
    _protocol,
    _seccomp,
    loaders,  # noqa: F401
)
from loadwarden.worker.sandbox._registry import LOADERS, FileChanged, load_files
from loadwarden.worker.sandbox.spec import ChildSpec, FileIdentity


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()[: _protocol.MAX_REPLY_BYTES]


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.send(_encode(message))


def _parse(data: bytes) -> ChildSpec:
    return ChildSpec.from_json(json.loads(data))


def _confine_process() -> list[str]:
    """What needs no spec: own session, die with the fork server, no privileges, no core."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    parent = os.getppid()
    os.setsid()
    _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
    _linux.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    applied = ["setsid", "pdeathsig", "no_new_privs", "rlimit_core"]
    # What the loader forks stays in this process group (stop_child kills it whole), and
    # no signal, prlimit or ptrace reaches past it: not the fork server, not the worker,
    # even where Landlock's signal scoping is missing or off. Our pid is our group's id now.
    try:
        _seccomp.install_child(os.getpid())
        applied += _seccomp.CHILD
    except OSError:
        pass  # an architecture without a filter: the confinement list says so by omission
    try:
        _linux.write_small("/proc/self/oom_score_adj", b"1000")
        applied.append("oom_score_adj")
    except OSError:
        pass
    return applied


def _check_identity(fd: int, expect: FileIdentity) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise FileChanged("the file handed to the loader is not a regular file")
    if (st.st_dev, st.st_ino) != (expect.dev, expect.ino):
        raise FileChanged("the file was replaced after inspection")
    if st.st_size != expect.size:
        raise FileChanged(
            f"the file changed size after inspection: {expect.size} -> {st.st_size} bytes"
        )


def _apply_limits(spec: ChildSpec, applied: list[str], files: int = 1) -> dict[str, Any]:
    """Address space sized for how the loader maps memory; CPU time; descriptors."""
    vsz, rss = _linux.memory_from_statm()
    # memory_bytes bounds the child's resident memory. Virtual size runs ahead
    # of RSS by what the interpreter reserves but never touches; the pread
    # loader maps each tensor once, so the growth it may use is memory - rss.
    room = max(0, spec.memory_bytes - rss)
    address_space = vsz + room
    if spec.address_space_limit:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        applied.append("rlimit_as")
    cpu = max(1, math.ceil(spec.cpu_seconds))
    # SIGXCPU at the soft limit, SIGKILL one second later if it is ignored.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    # The model's descriptors are already open; max_fds is what the loader may open besides.
    nofile = spec.max_fds + files
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    applied += ["rlimit_cpu", "rlimit_nofile"]
    return {"baseline_vsz": vsz, "baseline_rss": rss, "address_space": address_space}


class SandboxFailed(Exception):
    """A confinement the spec asks for could not be put in place: the file is never touched.

    The machinery's failure, not the file's: the supervisor names it ``crashed`` /
    ``sandbox`` by this class and module (``_outcome._from_raised``).
    """


def _prepare_landlock() -> _landlock.Ruleset | OSError:
    """Landlock's rules for what the interpreter reads, built while the child waits for its
    spec (they need none of it): with the spec only the model's rules and the enforcing
    are left (``_apply_landlock``). A failure is kept for the spec that asks for Landlock.

    The paths are the fork server's list (``interpreter_paths``), opened here as before,
    only earlier: by a child forked ahead up to ``READY_MAX_AGE_S`` before its load.
    """
    try:
        return _landlock.ruleset(_landlock.interpreter_paths())
    except OSError as exc:  # Unavailable too: judged by _apply_landlock
        return exc


def _apply_landlock(
    fds: list[int], applied: list[str], prepared: _landlock.Ruleset | OSError
) -> None:
    """Read the model and the interpreter only; no writes, no exec, no TCP (where supported).

    Fails closed: only a kernel without Landlock lets the load go on without it (the
    report's confinement list says so by omission, and the supervisor, which asked for
    Landlock only where it found it, refuses that answer); any other failure refuses the
    load.
    """
    if isinstance(prepared, _landlock.Unavailable):
        return
    if isinstance(prepared, OSError):
        raise SandboxFailed(f"Landlock could not be applied: {prepared}") from prepared
    try:
        abi = _landlock.enforce(prepared, fds)
    except OSError as exc:
        raise SandboxFailed(f"Landlock could not be applied: {exc}") from exc
    applied.append(f"landlock_abi{abi}")


def _apply_seccomp(applied: list[str]) -> None:
    """No new sockets of any family (a pathname unix socket, UDP: what Landlock leaves open).

    Usually inherited: the fork server installs the filter on itself before it forks
    anything (``_forkserver.main``), and a filter cannot be removed, so a child forked
    from it already has it and skips the system call here.
    """
    if not _seccomp.installed:
        try:
            _seccomp.install()
        except OSError:
            return  # an architecture without a filter: the confinement list says so by omission
    applied.append(_seccomp.SOCKETS)


def _raised(exc: BaseException) -> dict[str, Any]:
    text = "".join(traceback.format_exception(exc))
    return {
        "kind": "raised",
        "type": type(exc).__name__,
        "module": type(exc).__module__,
        "message": str(exc)[:2000],
        "traceback": text[-_protocol.MAX_TRACEBACK_CHARS :],
        "rchar": _linux.read_chars(),
    }


def _receive(sock: socket.socket) -> tuple[ChildSpec, list[int]] | None:
    """The spec and every descriptor it comes with (more packets for a large checkpoint);
    ``SpecError`` (or a JSON error) for a spec the supervisor could not have sent."""
    data, fds, _flags, _addr = socket.recv_fds(
        sock, _protocol.MAX_SPEC_BYTES, _protocol.FDS_PER_MESSAGE
    )
    if not data or not fds:
        return None
    spec = _parse(data)
    want = len(spec.identities)
    while len(fds) < want:
        _data, more, _flags, _addr = socket.recv_fds(sock, 16, _protocol.FDS_PER_MESSAGE)
        if not more:
            return None
        fds += more
    return (spec, fds) if len(fds) == want else None


#: A valid safetensors file of one 16x16 F32 tensor (its header padded to 8 bytes, as
#: the library writes it), loaded by ``warm_up``.
_WARM_HEADER = b'{"w":{"dtype":"F32","shape":[16,16],"data_offsets":[0,1024]}}'.ljust(64)
_WARM_FILE = len(_WARM_HEADER).to_bytes(8, "little") + _WARM_HEADER + bytes(1024)


def _warm_file(fd: int) -> bytes:
    """Write the warm-up's model into ``fd`` (a fresh memfd); the spec packet that loads it."""
    os.write(fd, _WARM_FILE)
    st = os.fstat(fd)
    return _encode(
        ChildSpec(
            loader="safetensors",
            memory_bytes=1 << 20,
            cpu_seconds=1,
            max_fds=1,
            address_space_limit=True,
            landlock=True,
            manifest_digest=None,
            expect=FileIdentity(st.st_dev, st.st_ino, st.st_size),
        ).to_json()
    )


def _rehearse(sock: socket.socket) -> bool:
    """Run the spec, load and reply code once on the warm-up's model while no spec waits.

    Every page of the fork server that a load writes to (reference counts, the
    allocator's pools, the specialised bytecode's caches) is copied on the child's first
    write to it. A child forked ahead waits idle for its spec, so it takes those copies
    (~100 page faults) now rather than between its spec and its answer. No socket, no
    descriptor from outside: a memfd of the bytes above, closed again; nothing is sent.
    Skipped (False) when the spec is already there, or where it cannot run (only an
    optimisation: the load then takes the faults itself). Only a child forked while no
    load of this worker runs is asked to (``ForkServer._fill``): in a backlog the CPUs are
    the loads', and the next spec comes at once.
    """
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None:
        return False
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        return False  # the spec (or EOF) is there: the load goes first
    except BlockingIOError:
        pass
    except OSError:
        return False
    try:
        fd = memfd_create("loadwarden-rehearsal", os.MFD_CLOEXEC)
    except OSError:
        return False
    try:
        spec = _parse(_warm_file(fd))
        _check_identity(fd, spec.identities[0])
        _linux.memory_from_statm()
        _encode({"kind": "ready", "pid": 0, "confinement": []})
        result = LOADERS[spec.loader](fd, spec)
        _encode({"kind": "ok", "result": result, "rchar": _linux.read_chars()})
    except Exception:
        return False
    finally:
        os.close(fd)
    return True


#: The warm-up's rounds that ran to their end (in the fork server; inherited by children).
warmed_up = 0


def warm_up(rounds: int = 16) -> None:
    """Run, in the fork server, the Python each child runs around a tiny safetensors load.

    CPython 3.11 rewrites a function's bytecode in place after its first few calls
    (quickening) and then specialises each instruction, writing counters and caches
    into the code object. A child runs each function once or twice, so without this
    every child did that warm-up itself, and each write copied a page of the fork
    server's memory (copy-on-write): measured, a fork server that has run this once
    leaves its children ~85 page faults and ~0.2 ms of CPU fewer per tiny load.
    The spec travels as a child's does (a socket pair, the file's descriptor passed with
    it) and the replies are built and sent. Confinement is not run here (it would
    confine the fork server); the file is a memfd of bytes written above, so no input
    from outside is read. Where it cannot run it does nothing or raises: the fork server
    says so on its stderr and starts without it.
    """
    global warmed_up
    memfd_create = getattr(os, "memfd_create", None)  # absent from some builds (old glibc, musl)
    if memfd_create is None:
        return  # only an optimisation
    fd = memfd_create("loadwarden-warm-up", os.MFD_CLOEXEC)
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except OSError:
        os.close(fd)
        raise
    try:
        theirs.settimeout(60)
        packet = _warm_file(fd)
        for _ in range(rounds):
            socket.send_fds(ours, [packet], [fd])
            received = _receive(theirs)
            if received is None:
                return
            spec, (copy,) = received
            try:
                _check_identity(copy, spec.identities[0])
                _linux.memory_from_statm()
                _send(theirs, {"kind": "ready", "pid": 0, "confinement": []})
                result = LOADERS[spec.loader](copy, spec)
                _send(theirs, {"kind": "ok", "result": result, "rchar": _linux.read_chars()})
            finally:
                os.close(copy)
            ours.recv(_protocol.MAX_REPLY_BYTES)
            ours.recv(_protocol.MAX_REPLY_BYTES)
            warmed_up += 1
    finally:
        os.close(fd)
        ours.close()
        theirs.close()


#: Whether this child rehearsed a load before its spec came (``_rehearse``; tests read it).
rehearsed = False


def main(sock: socket.socket, *, rehearse: bool = False) -> int:
    """Entry point of a forked child; returns the exit status. ``rehearse``: it was forked
    to wait while the machine is idle (``ForkServer``), and runs ``_rehearse`` meanwhile."""
    global rehearsed
    applied = _confine_process()
    prepared = _prepare_landlock()
    rehearsed = rehearse and _rehearse(sock)
    sock.settimeout(60)
    received = _receive(sock)
    if received is None:
        return 2
    spec, fds = received
    try:
        for fd, expect in zip(fds, spec.identities, strict=True):
            _check_identity(fd, expect)
        loader = LOADERS[spec.loader]
        figures = _apply_limits(spec, applied, len(fds))
        if spec.landlock:
            _apply_landlock(fds, applied, prepared)
        elif isinstance(prepared, _landlock.Ruleset):
            prepared.close()  # not asked for: the loader never holds an unenforced ruleset
        _apply_seccomp(applied)
        _send(sock, {"kind": "ready", "pid": os.getpid(), "confinement": applied, **figures})
        result = load_files(fds, spec) if spec.files is not None else loader(fds[0], spec)
    except BaseException as exc:  # PanicException is a BaseException: catch everything
        with contextlib.suppress(BaseException):
            _send(sock, _raised(exc))
        return 1
    _send(sock, {"kind": "ok", "result": result, "rchar": _linux.read_chars()})
    return 0


__all__ = ["main", "warm_up"]
