"""Inspect a large header in a confined, killable child instead of the supervisor.

Inspection is our own strict code, but it runs on hostile input, and parsing
costs memory and time in proportion to the header: a 16 MiB safetensors header
of nested empty arrays took 478 MB to parse, an .npz of 200,000 members with
10 KB headers took 47.6 s. In the supervisor that is memory shared by every job
and a thread nobody can stop. So a header that may be large is inspected in a
fresh interpreter (``_inspect_child``) under its own address-space and CPU
limits, Landlock and seccomp, killed at the job's deadline or on cancel; its
answer is read with a cap and validated again with pydantic.

Small headers stay in-process: the child costs an interpreter start (see
``ISOLATE_ABOVE_BYTES``), which tiny loads must not pay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys

from pydantic import ValidationError

from loadwarden.producer.contract import ModelFormat, ModelSummary
from loadwarden.producer.errors import (
    InvalidModel,
    LoadError,
    SourceRefused,
    SourceUnavailable,
)
from loadwarden.worker._files import ModelFile
from loadwarden.worker.config import InspectionCaps
from loadwarden.worker.sandbox.children import SandboxError, kill_group, one_exits
from loadwarden.worker.sandbox.forkserver import child_environment

#: Errors the child may name, by class name: nothing else is believed.
_ERRORS: dict[str, type[LoadError]] = {
    cls.__name__: cls for cls in (InvalidModel, SourceRefused, SourceUnavailable)
}
#: How long the child may take to exit after its answer before it is killed.
_EXIT_GRACE_S = 5.0


async def inspect_in_child(
    model_file: ModelFile,
    *,
    declared: ModelFormat | None,
    caps: InspectionCaps,
    budget_bytes: int | None,
    memory_bytes: int,
    cpu_seconds: int,
    max_answer_bytes: int,
) -> ModelSummary:
    """The summary a confined child found, or the error it named; the child is always reaped.

    Cancelling (the job's deadline, a cancel) kills the child's process group at once.
    """
    args = {
        "parent": os.getpid(),
        "fd": model_file.fd,
        "size": model_file.size,
        "path": model_file.path,
        "declared": str(declared) if declared else None,
        "caps": caps.model_dump(mode="json"),
        "budget_bytes": budget_bytes,
        "memory_bytes": memory_bytes,
        "cpu_seconds": cpu_seconds,
    }
    cmd = [sys.executable, "-m", "loadwarden.worker.sandbox._inspect_child", json.dumps(args)]
    # A socket for its stdout: read with sock_recv, no transport to leave open on a cancel.
    ours, theirs = socket.socketpair()
    try:
        process = subprocess.Popen(  # noqa: ASYNC220 - a plain fork+exec, a few ms
            cmd,
            pass_fds=[model_file.fd],
            stdin=subprocess.DEVNULL,
            stdout=theirs.fileno(),
            stderr=subprocess.DEVNULL,
            env=child_environment(),
            start_new_session=True,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    try:
        ours.setblocking(False)
        data = await _read_to_end(ours, max_answer_bytes)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_EXIT_GRACE_S):
                await one_exits([process.pid])
    finally:
        ours.close()
        if process.poll() is None:
            kill_group(process.pid)
        process.wait()  # at once: it has exited or was just sent SIGKILL
    return _answer(data, process.returncode, cpu_seconds)


async def _read_to_end(sock: socket.socket, cap: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while chunk := await loop.sock_recv(sock, 1024 * 1024):
        data += chunk
        if len(data) > cap:
            raise InvalidModel(
                f"the model's summary is over {cap} bytes (inspection.max_summary_bytes)",
                code="too_many_tensors",
            )
    return bytes(data)


def _answer(data: bytes, returncode: int | None, cpu_seconds: int) -> ModelSummary:
    if not data:
        if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            raise InvalidModel(
                f"inspecting the header took more than {cpu_seconds} s of CPU time",
                code="header_too_complex",
            )
        raise SandboxError(f"the inspection child ended ({returncode}) without answering")
    try:
        message = json.loads(data)
        if "error" in message:
            error = message["error"]
            raise _ERRORS[error["type"]](str(error["message"])[:2000], code=str(error["code"]))
        return ModelSummary.model_validate(message["summary"])
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        raise SandboxError(f"the inspection child broke the protocol: {exc}"[:300]) from None
