"""Test-only loaders that misbehave on purpose; preloaded into the fork server by the tests."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from loadwarden.worker.sandbox._child import load_safetensors, register_loader


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


@register_loader("hold_memory")
def hold_memory(fd: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Allocate and touch 48 MiB, then hold it until killed (a test cancels the load)."""
    held = bytearray(48 * 1024 * 1024)
    for i in range(0, len(held), 4096):
        held[i] = 1
    threading.Event().wait()
    raise AssertionError("unreachable")
