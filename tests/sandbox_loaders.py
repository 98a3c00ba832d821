"""Test-only loaders that misbehave on purpose; preloaded into the fork server by the tests."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from typing import Any

from loadwarden.worker.sandbox import _regions, _safetensors
from loadwarden.worker.sandbox._child import register_loader
from loadwarden.worker.sandbox.loaders import load_safetensors, read_safetensors


@register_loader("spin")
def spin(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Burn CPU forever."""
    n = 0
    while True:
        n += 1


@register_loader("hang")
def hang(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Block forever without using CPU."""
    threading.Event().wait()
    raise AssertionError("unreachable")


@register_loader("stop_self")
def stop_self(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Stop this process with SIGSTOP: it neither answers nor exits."""
    os.kill(os.getpid(), signal.SIGSTOP)
    raise AssertionError("resumed unexpectedly")


@register_loader("grandchild")
def grandchild(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Fork a grandchild that waits forever in our process group, then hang too."""
    if os.fork() == 0:
        signal.pause()
        os._exit(0)
    threading.Event().wait()
    raise AssertionError("unreachable")


@register_loader("bad_reply")
def bad_reply(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Answer with a result that breaks the protocol."""
    return {"tensors": -1}


@register_loader("slow")
def slow(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Take about a second (stands in for a big model), then load for real."""
    threading.Event().wait(1.0)
    return load_safetensors(fd, spec)


@register_loader("slow_3s")
def slow_3s(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Take about three seconds (longer than a short shutdown grace), then load for real."""
    threading.Event().wait(3.0)
    return load_safetensors(fd, spec)


@register_loader("read_other")
def read_other(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Try to read a file that is not the model."""
    with open("/etc/hostname") as fh:
        fh.read()
    return load_safetensors(fd, spec)


@register_loader("write_file")
def write_file(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Try to write a file."""
    with open(f"/tmp/loadwarden-escape-{os.getpid()}", "w") as fh:
        fh.write("escaped")
    return load_safetensors(fd, spec)


@register_loader("exec_true")
def exec_true(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Try to execute a program."""
    os.execv("/bin/true", ["true"])


@register_loader("tcp_connect")
def tcp_connect(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Try to open a TCP connection (to the local Redis port)."""
    import socket

    socket.create_connection(("127.0.0.1", 6379), timeout=2).close()
    return load_safetensors(fd, spec)


@register_loader("brief")
def brief(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Take a fifth of a second, then load for real."""
    threading.Event().wait(0.2)
    return load_safetensors(fd, spec)


@register_loader("verify_arrays")
def verify_arrays(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Load for real, then check every array against the file's metadata: for each tensor
    ``"<numpy dtype name> <shape> <sha256 of the bytes>"``, as ``expected_arrays`` writes it."""
    size = os.fstat(fd).st_size
    expected = _safetensors.read_within(fd, size).metadata
    got = {t.name: describe_array(array) for t, array in read_safetensors(fd)}
    if got != expected:
        raise AssertionError(f"the arrays are not what was written: {got} != {expected}")
    return load_safetensors(fd, spec)


def describe_array(array: Any) -> str:
    """An array's dtype, shape and bytes, as one string."""
    shape = ",".join(map(str, array.shape))
    return f"{array.dtype.name} ({shape}) {hashlib.sha256(array.tobytes()).hexdigest()}"


@register_loader("safetensors_library")
def safetensors_library(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """The loader before ours: safetensors.numpy's pread backend (no BF16, FP8, F4, F6).

    For bench/load.py to compare against in the same run; imported here, at load
    time, so the fork server's other children do not carry the library.
    """
    import safetensors.numpy

    from loadwarden.worker.sandbox._child import _Hasher, finish
    from loadwarden.worker.sandbox._dtypes import NPY_BY_ARRAY

    hasher = _Hasher(fd) if spec.get("sha256") else None
    tensors = safetensors.numpy.load_file(f"/proc/self/fd/{fd}", backend="pread")
    entries = [
        (name, NPY_BY_ARRAY[a.dtype.name], list(a.shape), a.nbytes) for name, a in tensors.items()
    ]
    del tensors
    return finish(entries, hasher, spec)


@register_loader("safetensors_one_thread")
def safetensors_one_thread(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Our loader with every pread in one thread (bench/load.py compares)."""
    _regions.READ_THREADS = 1  # this child loads once and exits
    return load_safetensors(fd, spec)


@register_loader("ramp")
def ramp(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Load for real, then grow memory and burn CPU in steps for about a second (for charts)."""
    import time

    result = load_safetensors(fd, spec)
    held = []
    for _ in range(8):
        held.append(bytearray(b"\x01") * (3 << 20))  # written, so resident
        until = time.monotonic() + 0.12
        while time.monotonic() < until:
            sum(range(2000))
    return result


@register_loader("hold_memory")
def hold_memory(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Allocate and touch 48 MiB, then hold it until killed (a test cancels the load)."""
    held = bytearray(48 * 1024 * 1024)
    for i in range(0, len(held), 4096):
        held[i] = 1
    threading.Event().wait()
    raise AssertionError("unreachable")
