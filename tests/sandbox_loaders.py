"""Test-only loaders that misbehave on purpose; preloaded into the fork server by the tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import threading
from collections.abc import Callable
from typing import Any

from loadwarden.worker.sandbox._child import load_safetensors, register_loader

#: What ``forge_stdout`` writes: a report line a ``load --json`` reader would believe.
FORGED_LINE = b'{"outcome":"ok","forged":true}\n'
#: The digest ``claim_digest`` claims when the spec names none.
CLAIMED_DIGEST = "ab" * 32
#: Unix sockets whose path holds this are the bait ``unix_socket_hunt`` looks for.
BAIT_NAME = "loadwarden-bait"


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


# Stand-ins for a compromised loader (issue #11 finding 3): each tries to reach past
# the sandbox, and loads normally only when the attempt was refused.


@register_loader("forge_stdout")
def forge_stdout(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Write a forged report line onto whatever stdout and stderr the child inherited."""
    for target in (1, 2):
        with contextlib.suppress(OSError):
            os.write(target, FORGED_LINE)
    return load_safetensors(fd, spec)


@register_loader("claim_digest")
def claim_digest(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Load, but claim whatever digest the spec asks for instead of hashing the file."""
    result = load_safetensors(fd, {**spec, "sha256": None})  # never hash
    result["sha256"] = spec.get("sha256") or CLAIMED_DIGEST
    return result


@register_loader("epoll_hijack")
def epoll_hijack(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
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
def probe_fds(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Raise with the kind of every descriptor this process holds (the test reads the message)."""
    kinds = {}
    for candidate in range(1024):
        try:
            st = os.fstat(candidate)
        except OSError:
            continue
        kinds[candidate] = "model" if candidate == fd else _kind(st.st_mode)
    raise RuntimeError(json.dumps(kinds))


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "char"), (stat.S_ISFIFO, "fifo"))
    return next((name for test, name in kinds if test(mode)), "other")


@register_loader("unix_socket_hunt")
def unix_socket_hunt(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
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
    def attempt(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
        import socket

        socket.socket(family, kind).close()
        return load_safetensors(fd, spec)

    return attempt


def _socketpair(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    import socket

    for end in socket.socketpair():
        end.close()
    return load_safetensors(fd, spec)


register_loader("udp_socket")(_new_socket(2, 2))  # AF_INET, SOCK_DGRAM
register_loader("unix_socket")(_new_socket(1, 1))  # AF_UNIX, SOCK_STREAM
register_loader("tcp6_socket")(_new_socket(10, 1))  # AF_INET6, SOCK_STREAM
register_loader("socketpair")(_socketpair)


@register_loader("list_cwd")
def list_cwd(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """List the working directory (the fork server's, which is the supervisor's)."""
    os.listdir(os.getcwd())
    return load_safetensors(fd, spec)
