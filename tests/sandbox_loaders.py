"""Test-only loaders that misbehave on purpose; preloaded into the fork server by the tests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import stat
import threading
from collections.abc import Callable
from typing import Any

from loadwarden.worker.binary import safetensors as _safetensors
from loadwarden.worker.sandbox import _regions
from loadwarden.worker.sandbox._registry import register_loader, register_reader
from loadwarden.worker.sandbox.loaders import load_safetensors, read_safetensors
from loadwarden.worker.sandbox.spec import ChildSpec
from tests import process_loaders  # noqa: F401 (its loaders register as it is imported)

#: What ``forge_stdout`` writes: a report line a ``load --json`` reader would believe.
FORGED_LINE = b'{"outcome":"ok","forged":true}\n'
#: The digest ``claim_digest`` claims (the spec never names one: the loader never learns it).
CLAIMED_DIGEST = "ab" * 32
#: Unix sockets whose path holds this are the bait ``unix_socket_hunt`` looks for.
BAIT_NAME = "loadwarden-bait"


@register_loader("spin")
def spin(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Burn CPU forever."""
    n = 0
    while True:
        n += 1


@register_loader("hang")
def hang(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Block forever without using CPU."""
    threading.Event().wait()
    raise AssertionError("unreachable")


@register_loader("stop_self")
def stop_self(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Stop this process with SIGSTOP: it neither answers nor exits."""
    os.kill(os.getpid(), signal.SIGSTOP)
    raise AssertionError("resumed unexpectedly")


@register_loader("grandchild")
def grandchild(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Fork a grandchild that waits forever in our process group, then hang too."""
    if os.fork() == 0:
        signal.pause()
        os._exit(0)
    threading.Event().wait()
    raise AssertionError("unreachable")


@register_loader("bad_reply")
def bad_reply(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Answer with a result that breaks the protocol."""
    return {"tensors": -1}


@register_loader("slow")
def slow(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Take about a second (stands in for a big model), then load for real."""
    threading.Event().wait(1.0)
    return load_safetensors(fd, spec)


@register_loader("slow_3s")
def slow_3s(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Take about three seconds (longer than a short shutdown grace), then load for real."""
    threading.Event().wait(3.0)
    return load_safetensors(fd, spec)


@register_loader("read_other")
def read_other(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Try to read a file that is not the model."""
    with open("/etc/hostname") as fh:
        fh.read()
    return load_safetensors(fd, spec)


@register_loader("write_file")
def write_file(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Try to write a file."""
    with open(f"/tmp/loadwarden-escape-{os.getpid()}", "w") as fh:
        fh.write("escaped")
    return load_safetensors(fd, spec)


@register_loader("exec_true")
def exec_true(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Try to execute a program."""
    os.execv("/bin/true", ["true"])


@register_loader("tcp_connect")
def tcp_connect(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Try to open a TCP connection (to the local Redis port)."""
    import socket

    socket.create_connection(("127.0.0.1", 6379), timeout=2).close()
    return load_safetensors(fd, spec)


@register_loader("brief")
def brief(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Take a fifth of a second, then load for real."""
    threading.Event().wait(0.2)
    return load_safetensors(fd, spec)


@register_loader("verify_arrays")
def verify_arrays(fd: int, spec: ChildSpec) -> dict[str, Any]:
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
def safetensors_library(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """The loader before ours: safetensors.numpy's pread backend (no BF16, FP8, F4, F6).

    For bench/load.py to compare against in the same run; imported here, at load
    time, so the fork server's other children do not carry the library.
    """
    import safetensors.numpy

    from loadwarden.worker.binary.dtypes import NPY_BY_ARRAY
    from loadwarden.worker.sandbox._registry import finish

    tensors = safetensors.numpy.load_file(f"/proc/self/fd/{fd}", backend="pread")
    entries = [
        (name, NPY_BY_ARRAY[a.dtype.name], list(a.shape), a.nbytes) for name, a in tensors.items()
    ]
    del tensors
    return finish(entries, spec)


@register_loader("safetensors_one_thread")
def safetensors_one_thread(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Our loader with every pread in one thread (bench/load.py compares)."""
    _regions.READ_THREADS = 1  # this child loads once and exits
    return load_safetensors(fd, spec)


@register_loader("safetensors_no_prefault")
def safetensors_no_prefault(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Our loader with no madvise(MADV_POPULATE_WRITE) before each pread (bench/load.py)."""
    _regions.PREFAULT = False  # this child loads once and exits
    return load_safetensors(fd, spec)


@register_loader("safetensors_one_thread_no_prefault")
def safetensors_one_thread_no_prefault(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Our loader with one pread thread and no prefault (bench/load.py compares)."""
    _regions.READ_THREADS = 1  # this child loads once and exits
    _regions.PREFAULT = False
    return load_safetensors(fd, spec)


@register_loader("ramp")
def ramp(fd: int, spec: ChildSpec) -> dict[str, Any]:
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
def hold_memory(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Allocate and touch 48 MiB, then hold it until killed (a test cancels the load)."""
    held = bytearray(48 * 1024 * 1024)
    for i in range(0, len(held), 4096):
        held[i] = 1
    threading.Event().wait()
    raise AssertionError("unreachable")


# Stand-ins for a compromised loader (issue #11 finding 3): each tries to reach past
# the sandbox, and loads normally only when the attempt was refused.


@register_loader("forge_stdout")
def forge_stdout(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Write a forged report line onto whatever stdout and stderr the child inherited."""
    for target in (1, 2):
        with contextlib.suppress(OSError):
            os.write(target, FORGED_LINE)
    return load_safetensors(fd, spec)


@register_loader("claim_digest")
def claim_digest(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Load, but claim a digest of its own instead of hashing the file."""
    result = load_safetensors(fd, spec)  # never hash
    result["sha256"] = CLAIMED_DIGEST
    return result


@register_loader("epoll_hijack")
def epoll_hijack(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Register an always-ready pipe on any epoll descriptor it holds (the fork server's)."""
    import select

    _read_end, write_end = os.pipe()
    for candidate in range(3, 256):
        try:
            # A duplicate: the poller closes its descriptor when collected. It still names
            # the same epoll instance, shared with the fork server if inherited from it.
            poller = select.epoll.fromfd(os.dup(candidate))
        except OSError:
            continue
        try:
            poller.register(write_end, select.EPOLLOUT)
        except OSError:
            continue
        finally:
            poller.close()
        raise RuntimeError(f"registered a pipe on the epoll descriptor {candidate}")
    return load_safetensors(fd, spec)


@register_loader("probe_fds")
def probe_fds(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Raise with the kind of every descriptor this process holds (the test reads the message);
    a model file (any shard of a checkpoint) is told by the identity the spec names."""
    models = {(identity.dev, identity.ino) for identity in spec.identities}
    kinds = {}
    for candidate in range(1024):
        try:
            st = os.fstat(candidate)
        except OSError:
            continue
        kinds[candidate] = "model" if (st.st_dev, st.st_ino) in models else _kind(st.st_mode)
    raise RuntimeError(json.dumps(kinds))


@register_reader("probe_fds")
def probe_fds_shard(fd: int, spec: ChildSpec) -> tuple[list[Any], object]:
    """``probe_fds`` as a checkpoint's reader: it raises at the first shard."""
    probe_fds(fd, spec)
    raise AssertionError("unreachable")


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "char"), (stat.S_ISFIFO, "fifo"))
    return next((name for test, name in kinds if test(mode)), "other")


@register_loader("unix_socket_hunt")
def unix_socket_hunt(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Find a listening unix socket in /proc/self/net/unix (as Valkey's was) and connect to it."""
    import socket

    with open("/proc/self/net/unix") as fh:
        paths = [line.split()[-1] for line in fh if BAIT_NAME in line]
    for path in paths:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            raise RuntimeError(f"connected to {path}")
    return load_safetensors(fd, spec)


def _new_socket(family: int, kind: int) -> Callable[[int, dict[str, Any]], dict[str, Any]]:
    def attempt(fd: int, spec: ChildSpec) -> dict[str, Any]:
        import socket

        socket.socket(family, kind).close()
        return load_safetensors(fd, spec)

    return attempt


def _socketpair(fd: int, spec: ChildSpec) -> dict[str, Any]:
    import socket

    for end in socket.socketpair():
        end.close()
    return load_safetensors(fd, spec)


register_loader("udp_socket")(_new_socket(2, 2))  # AF_INET, SOCK_DGRAM
register_loader("unix_socket")(_new_socket(1, 1))  # AF_UNIX, SOCK_STREAM
register_loader("tcp6_socket")(_new_socket(10, 1))  # AF_INET6, SOCK_STREAM
register_loader("socketpair")(_socketpair)


@register_loader("list_cwd")
def list_cwd(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """List the working directory (the fork server's, which is the supervisor's)."""
    os.listdir(os.getcwd())
    return load_safetensors(fd, spec)


@register_loader("report_warm_up")
def report_warm_up(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Raise with how many warm-up rounds the fork server ran (inherited: ``_child.warmed_up``)."""
    from loadwarden.worker.sandbox import _child  # preloaded: no import happens here

    raise RuntimeError(f"warmed_up={_child.warmed_up}")


@register_loader("leave_session")
def leave_session(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Fork a process that tries to leave the child's session and process group (where
    ``stop_child``'s group kill would miss it); raise with what each call did."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        outcomes = []
        for call in (os.setsid, lambda: os.setpgid(0, 0)):
            try:
                call()
                outcomes.append("allowed")
            except PermissionError:
                outcomes.append("denied")
        os.write(write_end, json.dumps(outcomes).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        answer = reader.read()
    os.waitpid(pid, 0)
    raise RuntimeError(answer.decode())


@register_loader("report_rehearsed")
def report_rehearsed(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Raise with whether this child rehearsed a load before its spec (``_child.rehearsed``)."""
    from loadwarden.worker.sandbox import _child  # preloaded: no import happens here

    raise RuntimeError(f"rehearsed={_child.rehearsed}")
