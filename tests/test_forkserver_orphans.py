"""A worker running as PID 1 (a container with no init) reaps what a lost fork server leaves:
its children and what they forked, reparented to PID 1, are not left as zombies; a child
someone else waits on is left to them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
#: A new PID namespace with its own /proc, whose first process (PID 1) is the command.
UNSHARE = ["unshare", "--pid", "--fork", "--mount", "--mount-proc"]


def _no_pid_namespace() -> str | None:
    """Why no PID namespace can be made here (unshare needs CAP_SYS_ADMIN), or None."""
    if shutil.which("unshare") is None:
        return "no unshare(1) here (util-linux)"
    probe = subprocess.run(
        [*UNSHARE, "true"], check=False, capture_output=True, text=True, timeout=30
    )
    if probe.returncode != 0:
        return f"unshare cannot make a PID namespace here: {probe.stderr.strip()}"
    return None


def test_as_pid_1_a_lost_fork_servers_children_are_reaped(small_model: Path) -> None:
    """PID 1 kills its fork server mid-load (the loader forked a grandchild): the child and the
    grandchild are reaped, no zombie is left, and a bystander's exit is left to its Popen."""
    if (reason := _no_pid_namespace()) is not None:
        pytest.skip(reason)
    command = [*UNSHARE, sys.executable, "-m", "tests.forkserver_pid1", str(small_model)]
    ran = subprocess.run(
        command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr[-4000:]
    result = json.loads(ran.stdout.splitlines()[-1])
    assert result["pid"] == 1
    assert "failed" not in result, result
    assert result["outcome"] == "crashed"  # its fork server was lost mid-load
    assert len(result["left"]) == 2 and sorted(result["reaped"]) == sorted(result["left"])
    assert result["zombies"] == []
    assert result["bystander_returncode"] == 1
