"""Code that runs inside a load child: confine this process, load one model, answer, exit.

Imported by the fork server before it forks anything, so that numpy and
safetensors are already in memory when a child starts. Stdlib, numpy and
safetensors only: this module must stay lean because every child's RSS starts
from the fork server's.
"""

from __future__ import annotations

import os

# Before numpy is imported: one BLAS thread (no idle threads with their own
# stacks in the fork server), and no Rust backtraces (a child that hits
# RLIMIT_DATA while printing one can hang forever).
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["RUST_BACKTRACE"] = "0"

import contextlib
import json
import math
import resource
import signal
import socket
import stat
import traceback
from collections.abc import Callable
from typing import Any

import safetensors.numpy

from loadwarden.worker.sandbox import _landlock, _linux, _protocol, _seccomp

Spec = dict[str, Any]
Loader = Callable[[int, Spec], dict[str, Any]]

#: Loaders by name; tests register extra ones from a module preloaded into the fork server.
LOADERS: dict[str, Loader] = {}


class FileChanged(Exception):
    """The file handed to the child is not the one the supervisor inspected."""


class ManifestMismatch(Exception):
    """The loader returned other tensors than the header inspection found."""


def register_loader(name: str) -> Callable[[Loader], Loader]:
    def decorate(fn: Loader) -> Loader:
        LOADERS[name] = fn
        return fn

    return decorate


_NUMPY_TO_SAFETENSORS = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "int64": "I64",
    "uint64": "U64",
    "int32": "I32",
    "uint32": "U32",
    "int16": "I16",
    "uint16": "U16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "complex64": "C64",
}


@register_loader("safetensors")
def load_safetensors(fd: int, spec: Spec) -> dict[str, Any]:
    """Load every tensor into memory once (pread backend: no second copy), check."""
    tensors = safetensors.numpy.load_file(f"/proc/self/fd/{fd}", backend="pread")
    entries = [
        (
            name,
            _NUMPY_TO_SAFETENSORS.get(arr.dtype.name, arr.dtype.name),
            list(arr.shape),
            arr.nbytes,
        )
        for name, arr in tensors.items()
    ]
    del tensors
    return finish(entries, spec)


def finish(entries: list[tuple[str, str, list[int], int]], spec: Spec) -> dict[str, Any]:
    """A loader's answer: its manifest digest, checked against the spec.

    The file's sha256 is not the loader's business: the supervisor hashes the file
    itself (``loadwarden.worker._digest``), where a compromised loader cannot lie.
    """
    result: dict[str, Any] = {
        "tensors": len(entries),
        "bytes": sum(nbytes for _, _, _, nbytes in entries),
        "manifest_digest": _protocol.manifest_digest(entries),
        "sha256": None,
    }
    expected = spec.get("manifest_digest")
    if expected and result["manifest_digest"] != expected:
        raise ManifestMismatch("the loader returned other tensors than the header declares")
    return result


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    sock.send(data[: _protocol.MAX_REPLY_BYTES])


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
    try:
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write("1000")
        applied.append("oom_score_adj")
    except OSError:
        pass
    return applied


def _check_identity(fd: int, expect: dict[str, int]) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise FileChanged("the file handed to the loader is not a regular file")
    if (st.st_dev, st.st_ino) != (expect["dev"], expect["ino"]):
        raise FileChanged("the file was replaced after inspection")
    if st.st_size != expect["size"]:
        raise FileChanged(
            f"the file changed size after inspection: {expect['size']} -> {st.st_size} bytes"
        )


def _apply_limits(spec: Spec, applied: list[str]) -> dict[str, Any]:
    """Address space sized for how the loader maps memory; CPU time; descriptors."""
    vsz, rss = _linux.memory_from_statm()
    # memory_bytes bounds the child's resident memory. Virtual size runs ahead
    # of RSS by what the interpreter reserves but never touches; the pread
    # loader maps each tensor once, so the growth it may use is memory - rss.
    room = max(0, int(spec["memory_bytes"]) - rss)
    address_space = vsz + room
    if spec.get("address_space_limit", True):
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        applied.append("rlimit_as")
    cpu = max(1, math.ceil(float(spec["cpu_seconds"])))
    # SIGXCPU at the soft limit, SIGKILL one second later if it is ignored.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    nofile = int(spec["max_fds"])
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    applied += ["rlimit_cpu", "rlimit_nofile"]
    return {"baseline_vsz": vsz, "baseline_rss": rss, "address_space": address_space}


def _apply_landlock(fd: int, applied: list[str]) -> None:
    """Read the model and the interpreter only; no writes, no exec, no TCP (where supported)."""
    try:
        abi = _landlock.restrict([fd], _landlock.interpreter_paths())
    except OSError:
        return  # no Landlock in this kernel: the report's confinement list says so by omission
    applied.append(f"landlock_abi{abi}")


def _apply_seccomp(applied: list[str]) -> None:
    """No new sockets of any family (a pathname unix socket, UDP: what Landlock leaves open)."""
    try:
        _seccomp.install()
    except OSError:
        return  # an architecture without a filter: the confinement list says so by omission
    applied.append("seccomp_no_sockets")


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


def main(sock: socket.socket) -> int:
    """Entry point of a forked child; returns the exit status."""
    applied = _confine_process()
    sock.settimeout(60)
    data, fds, _flags, _addr = socket.recv_fds(sock, _protocol.MAX_SPEC_BYTES, 1)
    if not data or len(fds) != 1:
        return 2
    fd = fds[0]
    try:
        spec: Spec = json.loads(data)
        _check_identity(fd, spec["expect"])
        loader = LOADERS[spec["loader"]]
        figures = _apply_limits(spec, applied)
        if spec.get("landlock"):
            _apply_landlock(fd, applied)
        _apply_seccomp(applied)
        _send(sock, {"kind": "ready", "pid": os.getpid(), "confinement": applied, **figures})
        result = loader(fd, spec)
    except BaseException as exc:  # PanicException is a BaseException: catch everything
        with contextlib.suppress(BaseException):
            _send(sock, _raised(exc))
        return 1
    _send(sock, {"kind": "ok", "result": result, "rchar": _linux.read_chars()})
    return 0


__all__ = ["LOADERS", "main", "register_loader"]

# Last, because it imports this module: the npy, npz and GGUF loaders register themselves.
from loadwarden.worker.sandbox import loaders  # noqa: E402, F401
