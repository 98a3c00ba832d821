"""Run as PID 1 of a new PID namespace (``unshare --pid --fork --mount-proc``) by a test: a
supervisor whose fork server is killed mid-load (a loader that forked a grandchild), then
what is left among PID 1's children, and whether a bystander (a child of PID 1 that exited
and that Popen waits on) was left to Popen. Prints one JSON line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from typing import Any

import psutil
import structlog

from loadwarden.producer.contract import LoadRequest, ModelFormat
from loadwarden.worker.config import Settings
from loadwarden.worker.load.supervisor import Supervisor
from tests.conftest import TEST_LOADERS, eventually


def _zombies() -> list[int]:
    return [p.pid for p in psutil.Process().children() if p.status() == psutil.STATUS_ZOMBIE]


async def main(model: str, bystander: subprocess.Popen[bytes]) -> dict[str, Any]:
    loaders = {ModelFormat.SAFETENSORS: "grandchild"}
    sup = Supervisor(Settings(use_cgroups=False), preload=[TEST_LOADERS], loaders=loaders)
    await eventually(lambda: bystander.pid in _zombies(), 30, "the bystander's exit")
    async with sup:
        with structlog.testing.capture_logs() as events:
            loading = asyncio.create_task(sup.load(LoadRequest(source=model)))
            started = await eventually(
                lambda: [e for e in events if e["event"] == "load_started"], 30, "the load"
            )
            child = started[0]["child_pid"]
            # The loader forks its grandchild before it hangs: wait until it is there.
            members = await eventually(
                lambda: [p.pid for p in psutil.Process(child).children()], 30, "the grandchild"
            )
            os.kill(sup.forkserver.pid or 0, signal.SIGKILL)
            report = await loading
            await eventually(lambda: sup.forkserver.restarts == 1, 30, "the restart")
            left = [child, *members]
            # Reaped (gone), or still a zombie after the bound: the test reads which.
            await eventually(
                lambda: not any(psutil.pid_exists(pid) for pid in left), 10, "the reaping"
            )
            # Now, not after close: the fork server's exit then leaves its last children
            # (one in flight to be forked ahead) to PID 1, which is about to exit as well.
            zombies = [pid for pid in _zombies() if pid != bystander.pid]
    reaped = [pid for e in events if e["event"] == "orphans_reaped" for pid in e["pids"]]
    return {
        "pid": os.getpid(),
        "outcome": str(report.outcome),
        "left": left,
        "reaped": reaped,
        "zombies": zombies,
        "bystander_returncode": bystander.wait(),  # 0 (ECHILD) had we reaped it
    }


if __name__ == "__main__":
    bystander = subprocess.Popen(["false"])  # exits 1 at once: a zombie, Popen's to reap
    try:
        result = asyncio.run(main(sys.argv[1], bystander))
    except AssertionError as exc:
        result = {"pid": os.getpid(), "failed": str(exc), "zombies": _zombies()}
    print(json.dumps(result), flush=True)
