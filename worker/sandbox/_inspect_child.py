"""Inspect one model header in a confined process and print the summary (or the defect) as JSON.

Run as ``python -m loadwarden.worker.sandbox._inspect_child ARGS_JSON`` by
``inspector.inspect_in_child`` with the model's descriptor inherited. It imports
everything first, then confines itself like a load child (no_new_privs, its own
address-space and CPU limits, Landlock to the model and the interpreter, no
sockets, no signal past itself), then inspects and writes one JSON object to stdout:
``{"summary": {...}}`` or ``{"error": {"type", "code", "message"}}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import sys
from typing import Any

from loadwarden.producer.contract import ModelFormat
from loadwarden.producer.errors import InvalidModel, LoadError
from loadwarden.worker.config import InspectionCaps
from loadwarden.worker.formats import inspect_model

# Every format's parser, imported before the child confines itself (``inspect_model``
# imports a format's parser only when a file of it is inspected): no import runs under
# Landlock, the address-space limit or seccomp.
from loadwarden.worker.formats import gguf, npy, npz, safetensors  # noqa: F401  # isort: skip
from loadwarden.worker.sandbox import _landlock, _linux, _seccomp


def _confine(fd: int, memory_bytes: int, cpu_seconds: int) -> None:
    _linux.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    vsz, _rss = _linux.memory_from_statm()
    address_space = vsz + memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    if _landlock.abi_version() >= 1:
        _landlock.restrict([fd], _landlock.interpreter_paths())
    # An architecture without a filter: Landlock and the limits still hold.
    with contextlib.suppress(OSError):
        _seccomp.install()
        # It leads its own session (start_new_session): no signal, prlimit or ptrace
        # reaches the worker that started it, Landlock's signal scoping or not.
        _seccomp.install_child(os.getpid())


def _answer(message: dict[str, Any]) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


def main(argv: list[str]) -> int:
    args = json.loads(argv[0])
    _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != args["parent"]:  # the supervisor died before the prctl took hold
        return 1
    fd = int(args["fd"])
    _confine(fd, int(args["memory_bytes"]), int(args["cpu_seconds"]))
    declared = args["declared"]
    try:
        inspection = inspect_model(
            fd,
            int(args["size"]),
            path=args["path"],
            declared=ModelFormat(declared) if declared else None,
            caps=InspectionCaps.model_validate(args["caps"]),
            budget_bytes=args["budget_bytes"],
        )
    except LoadError as exc:
        error = {"type": type(exc).__name__, "code": exc.code, "message": exc.message[:2000]}
        _answer({"error": error})
        return 0
    except (MemoryError, RecursionError) as exc:
        defect = InvalidModel(
            f"the header needs more than {args['memory_bytes']} bytes to inspect "
            f"({type(exc).__name__}): no real model's does",
            code="header_too_complex",
        )
        _answer({"error": {"type": "InvalidModel", "code": defect.code, "message": defect.message}})
        return 0
    _answer({"summary": inspection.summary.model_dump(mode="json")})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
