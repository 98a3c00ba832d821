"""Children forked ahead: when the next one is forked, and what one prepares while it waits
(real fork server, real children)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from loadwarden.producer.contract import LoadRequest
from loadwarden.worker.config import Settings
from loadwarden.worker.formats import ModelFormat
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.sandbox._landlock import abi_version
from loadwarden.worker.sandbox.children import stop_child
from loadwarden.worker.sandbox.forkserver import ForkServer
from tests.conftest import TEST_LOADERS, assert_pid_gone, eventually

pytestmark = pytest.mark.timeout(60)


def _forked(server: ForkServer) -> bool:
    """Whether a child is being forked ahead, or waits forked ahead."""
    filling = server._filling
    return bool(server.waiting) or (filling is not None and not filling.done())


async def test_a_lone_loads_next_child_is_forked_once_its_own_is_returned() -> None:
    """A child lent to a load while no other is out has the next one forked ahead only
    when it comes back (not while it loads); with another lent child out, at once."""
    server = ForkServer()
    try:
        first = await server.spawn(lent=True)
        assert not _forked(server)
        await stop_child(first)
        server.returned()
        ahead = (await eventually(lambda: server.waiting, what="the next child, forked ahead"))[0]
        lone = await server.spawn(lent=True)
        assert lone.pid == ahead and not _forked(server)
        other = await server.spawn(lent=True)  # two loads at once: no waiting for either
        await eventually(lambda: server.waiting, what="a child forked ahead at once")
        for child in (lone, other):
            await stop_child(child)
            server.returned()
    finally:
        await server.close()


async def test_a_child_returned_while_the_fork_server_closes_forks_no_other() -> None:
    """A load that ends while the fork server closes (a worker shutting down) starts no
    child ahead: close leaves nothing behind."""
    server = ForkServer()
    child = await server.spawn(lent=True)
    pid = server.pid
    await stop_child(child)
    await server.close()
    server.returned()
    assert not _forked(server) and server.waiting == [] and server.pid is None
    assert pid is not None
    assert_pid_gone(pid)


def _ruleset_fds(pid: int) -> int:
    """How many Landlock rulesets a process holds (a tiny /proc folder: read synchronously)."""
    folder = Path(f"/proc/{pid}/fd")
    return sum(os.readlink(entry) == "anon_inode:[landlock-ruleset]" for entry in folder.iterdir())


@pytest.mark.skipif(abi_version() < 1, reason="this kernel has no Landlock")
async def test_a_child_builds_its_landlock_rules_while_it_waits(small_model: Path) -> None:
    """A child forked ahead holds its interpreter's Landlock ruleset, built before its spec
    arrives (only the model's rules and the enforcing are left for the load)."""
    async with Supervisor(Settings(), preload=[TEST_LOADERS]) as sup:
        assert (await sup.load(LoadRequest(source=str(small_model)))).ok
        ahead = (await eventually(lambda: sup.forkserver.waiting, what="a child ahead"))[0]
        await eventually(lambda: _ruleset_fds(ahead) == 1, what="its ruleset, built")


async def test_without_landlock_the_loader_holds_no_ruleset(small_model: Path) -> None:
    """A spec without Landlock (use_landlock off): the ruleset the child built while it
    waited is closed before the loader runs; it holds what it would otherwise."""
    loaders = {ModelFormat.SAFETENSORS: "probe_fds"}
    settings = Settings(use_landlock=False)
    async with Supervisor(settings, preload=[TEST_LOADERS], loaders=loaders) as sup:
        report = await sup.load(LoadRequest(source=str(small_model)))
    assert report.error is not None and report.error.code == "loader_error", report.error
    kinds = json.loads(report.error.message.split(": ", 1)[1])
    assert sorted(kinds.values()) == ["char", "char", "char", "model", "socket"], kinds
