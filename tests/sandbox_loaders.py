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
