"""A compromised loader in a real child cannot reach past its sandbox (issue #11, finding 3)."""

from __future__ import annotations

import hashlib
import json
import platform
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from loadwarden.producer.contract import LoadReport, LoadRequest, Outcome
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.sandbox._landlock import abi_version
from tests.sandbox_loaders import BAIT_NAME, CLAIMED_DIGEST, FORGED_LINE

needs_landlock = pytest.mark.skipif(abi_version() < 1, reason="this kernel has no Landlock")
needs_seccomp_filter = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "aarch64"),
    reason=f"no seccomp filter is written for {platform.machine()}",
)


async def load_with(
    make_supervisor: Callable[..., Supervisor], loader: str, model: Path
) -> LoadReport:
    """One load of ``model`` by a supervisor whose safetensors loader is ``loader``."""
    async with make_supervisor(loader) as sup:
        return await sup.load(LoadRequest(source=str(model)))


def assert_denied(report: LoadReport) -> None:
    """The sandbox refused what the loader tried."""
    assert report.outcome is Outcome.REFUSED, report.error
    assert report.error is not None and report.error.code == "sandbox_denied"


async def test_child_output_never_reaches_the_supervisors(
    make_supervisor: Callable[..., Supervisor], small_model: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A loader writing a forged report line to fds 1 and 2 writes into /dev/null."""
    report = await load_with(make_supervisor, "forge_stdout", small_model)
    assert report.outcome is Outcome.OK, report.error
    out, err = capfd.readouterr()
    assert FORGED_LINE.decode().strip() not in out + err


@pytest.mark.parametrize("pinned", ["wrong", "right"])
async def test_digest_is_computed_and_compared_by_the_supervisor(
    make_supervisor: Callable[..., Supervisor], small_model: Path, pinned: str
) -> None:
    """A loader claiming the pinned digest cannot pass a wrong one; the report has the true one."""
    actual = hashlib.sha256(small_model.read_bytes()).hexdigest()  # noqa: ASYNC240 (1 MB)
    expected = CLAIMED_DIGEST if pinned == "wrong" else actual
    async with make_supervisor("claim_digest") as sup:
        report = await sup.load(LoadRequest(source=str(small_model), sha256=expected))
    if pinned == "wrong":
        assert report.outcome is Outcome.INVALID
        assert report.error is not None and report.error.code == "sha256_mismatch"
        assert actual in report.error.message
    else:
        assert report.outcome is Outcome.OK, report.error
        assert report.model is not None and report.model.sha256 == actual


async def test_child_holds_only_its_socket_and_model(
    make_supervisor: Callable[..., Supervisor], small_model: Path
) -> None:
    """The child's descriptors: /dev/null as 0-2, its socket, the model; nothing of the server's."""
    report = await load_with(make_supervisor, "probe_fds", small_model)
    assert report.error is not None and report.error.code == "loader_error", report.error
    kinds = json.loads(report.error.message.split(": ", 1)[1])
    assert sorted(kinds.values()) == ["char", "char", "char", "model", "socket"], kinds
    assert {kinds[str(n)] for n in (0, 1, 2)} == {"char"}


async def test_child_cannot_reach_the_fork_servers_epoll(
    make_supervisor: Callable[..., Supervisor], small_model: Path
) -> None:
    """A loader finds no epoll descriptor to register on; the fork server keeps serving."""
    async with make_supervisor("epoll_hijack") as sup:
        report = await sup.load(LoadRequest(source=str(small_model)))
        assert report.outcome is Outcome.OK, report.error
        again = await sup.load(LoadRequest(source=str(small_model)))
    assert again.outcome is Outcome.OK, again.error


@needs_seccomp_filter
@pytest.mark.parametrize("loader", ["udp_socket", "unix_socket", "tcp6_socket", "socketpair"])
async def test_new_sockets_are_denied(
    make_supervisor: Callable[..., Supervisor], small_model: Path, loader: str
) -> None:
    """seccomp: no new socket of any family (UDP, unix, IPv6), nor a socket pair."""
    report = await load_with(make_supervisor, loader, small_model)
    assert_denied(report)
    assert "seccomp_no_sockets" in report.confinement


def _status(pid: int | None) -> dict[str, str]:
    """/proc/PID/status as a dict (a tiny /proc file: read synchronously)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


@needs_seccomp_filter
async def test_children_inherit_the_fork_servers_filter(
    make_supervisor: Callable[..., Supervisor], small_model: Path
) -> None:
    """The fork server holds no_new_privs and the socket filter itself, before any child
    is forked, so that every child has them from its first instruction; a child's
    report still lists the filter, and a socket stays denied (test above)."""
    async with make_supervisor("udp_socket") as sup:
        report = await sup.load(LoadRequest(source=str(small_model)))
        fields = _status(sup.forkserver.pid)
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"  # SECCOMP_MODE_FILTER
    assert_denied(report)
    assert "seccomp_no_sockets" in report.confinement


async def test_child_cannot_find_and_join_a_local_unix_socket(
    make_supervisor: Callable[..., Supervisor], small_model: Path, tmp_path: Path
) -> None:
    """A listening unix socket (an embedded Valkey's) is neither listed nor reachable."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bait:
        bait.bind(str(tmp_path / f"{BAIT_NAME}.sock"))
        bait.listen()
        bait.setblocking(False)
        report = await load_with(make_supervisor, "unix_socket_hunt", small_model)
        with pytest.raises(BlockingIOError):
            bait.accept()
    assert_denied(report)


@needs_landlock
async def test_child_cannot_list_the_working_directory(
    make_supervisor: Callable[..., Supervisor], small_model: Path
) -> None:
    """Landlock's read set is the interpreter's module folders, not sys.path's working directory."""
    assert_denied(await load_with(make_supervisor, "list_cwd", small_model))


def test_children_get_only_the_documented_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child's environment is PATH, locale, TZ, TMPDIR and HOME from the supervisor, plus
    PYTHONPATH and PYTHONDONTWRITEBYTECODE: never a secret of the supervisor's (README)."""
    from loadwarden.worker.sandbox.forkserver import child_environment

    monkeypatch.setenv("LOADWARDEN_REDIS_URL", "redis://:secret@redis:6379/0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    for name in ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "HOME"):
        monkeypatch.setenv(name, f"value of {name}")
    env = child_environment()
    inherited = {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "HOME"}
    assert set(env) == inherited | {"PYTHONPATH", "PYTHONDONTWRITEBYTECODE"}
    assert all(env[name] == f"value of {name}" for name in inherited)
    assert "secret" not in repr(env)
