"""A compromised loader in a real child cannot reach past its sandbox (issue #11, finding 3)."""

from __future__ import annotations

import errno
import hashlib
import json
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from loadwarden.producer.contract import LoadReport, LoadRequest, Outcome
from loadwarden.worker.config import Settings
from loadwarden.worker.formats import ModelFormat
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.sandbox._landlock import abi_version
from tests.conftest import TEST_LOADERS, require_facility
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


@needs_seccomp_filter
async def test_what_a_loader_forks_cannot_leave_its_process_group(
    make_supervisor: Callable[..., Supervisor], small_model: Path
) -> None:
    """seccomp: a process the loader forks gets EPERM from setsid and setpgid, so it stays in
    the process group that stop_child kills whole (it outlived the load before)."""
    report = await load_with(make_supervisor, "leave_session", small_model)
    assert report.error is not None and report.error.code == "loader_error", report.error
    assert json.loads(report.error.message.split(": ", 1)[1]) == ["denied", "denied"]
    assert "seccomp_no_new_sessions" in report.confinement


#: What ``reach_others`` tries on processes outside its group: every one must be EPERM.
_OTHERS = [
    "kill_server",
    "kill_worker",
    "kill_all",
    "killpg_server",
    "tgkill_server",
    "tkill_server",
    "sigq_server",
    "tgsigq_server",
    "pidfd_server",
    "setown_server",
    "setown_worker_pg",
    "fiosetown",
    "prlimit_server",
    "ptrace_server",
]
#: ... and on itself and its own group, where it must keep working (CPython's own signals).
_OWN = [
    "kill_self",
    "kill_0",
    "killpg_own",
    "tgkill_self",
    "setown_self",
    "prlimit_self",
]


@needs_seccomp_filter
@pytest.mark.parametrize("landlock", [True, False], ids=["landlock", "no_landlock"])
async def test_a_loader_cannot_signal_the_fork_server_or_the_worker(
    make_supervisor: Callable[..., Supervisor], small_model: Path, landlock: bool
) -> None:
    """seccomp, with or without Landlock's signal scoping: a loader's SIGKILL to its fork
    server, signals to the worker (kill, tgkill, sigqueue, pidfd, F_SETOWN), prlimit and
    ptrace on them fail with EPERM; it still signals itself and its group, and the same
    fork server serves the next load."""
    settings = Settings(use_landlock=landlock)
    async with make_supervisor("reach_others", settings) as sup:
        report = await sup.load(LoadRequest(source=str(small_model)))
        server = sup.forkserver.pid
        sup.loaders[ModelFormat.SAFETENSORS] = "safetensors"  # the next load, a genuine one
        again = await sup.load(LoadRequest(source=str(small_model)))
        assert sup.forkserver.pid == server, "the fork server was restarted"
    assert report.error is not None and report.error.code == "loader_error", report.error
    assert json.loads(report.error.message.split(": ", 1)[1]) == {"allowed": _OWN, "EPERM": _OTHERS}
    assert "seccomp_signals_own_group" in report.confinement
    assert "seccomp_no_ptrace" in report.confinement
    landlocked = any(c.startswith("landlock_abi") for c in report.confinement)
    assert landlocked == (landlock and abi_version() >= 1), report.confinement
    assert again.outcome is Outcome.OK, again.error


def _status(pid: int | None) -> dict[str, str]:
    """/proc/PID/status as a dict (a tiny /proc file: read synchronously)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


@needs_seccomp_filter
def test_the_inspection_child_cannot_signal_the_worker(tmp_path: Path) -> None:
    """The confined inspection's process (a session of its own, as the inspector starts it)
    confines itself as a load child does: a signal to its parent, or a prlimit on it, is
    refused (EPERM), even without Landlock's signal scoping; to itself, allowed."""
    model = tmp_path / "m.bin"
    model.write_bytes(b"x")
    probe = (
        "import os, resource, sys\n"
        "from loadwarden.worker.sandbox._inspect_child import _confine\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
        "_confine(fd, 1 << 30, 10)\n"
        "out = []\n"
        "for name, call in [\n"
        "    ('kill', lambda: os.kill(os.getppid(), 0)),\n"
        "    ('prlimit', lambda: resource.prlimit(os.getppid(), resource.RLIMIT_CPU)),\n"
        "    ('self', lambda: os.kill(os.getpid(), 0)),\n"
        "]:\n"
        "    try:\n"
        "        call()\n"
        "        out.append(name + ' ok')\n"
        "    except OSError as exc:\n"
        "        out.append(name + ' ' + str(exc.errno))\n"
        "print(','.join(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(model)],
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"kill {errno.EPERM},prlimit {errno.EPERM},self ok"


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
    assert set(env) == inherited | {"PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONSAFEPATH"}
    assert all(env[name] == f"value of {name}" for name in inherited)
    assert "secret" not in repr(env)


def test_modules_in_the_working_directory_never_run_in_the_fork_server(
    tmp_path: Path, small_model: Path
) -> None:
    """`loadwarden load` run from a folder holding a `socket.py` (a cloned model repository,
    say) loads without running it: the fork server does not look in the working directory."""
    import subprocess
    import sys

    marker = tmp_path / "ran"
    (tmp_path / "socket.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    model = tmp_path / "model.safetensors"
    shutil.copy(small_model, model)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "loadwarden"), "load", "--json", model.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert not marker.exists(), "a module of the working directory ran in the fork server"


def _change(folder: Path, how: str) -> None:
    """What a deploy may do to a folder the fork server imported from, after it started."""
    shutil.rmtree(folder)
    if how == "replaced_by_a_file":
        folder.write_text("")
    elif how == "a_symlink_loop":
        folder.symlink_to(folder)


async def _load_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_model: Path, how: str
) -> LoadReport:
    """A ``read_other`` load by a fork server that preloaded a module from a folder of its
    own, that folder changed (``_change``) after the fork server started."""
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / "loadwarden_stale_probe.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(folder))  # the fork server's PYTHONPATH
    loaders = {ModelFormat.SAFETENSORS: "read_other"}
    preload = [TEST_LOADERS, "loadwarden_stale_probe"]
    async with Supervisor(Settings(), preload=preload, loaders=loaders) as sup:
        require_facility(sup.landlock_abi >= 1, "needs Landlock")
        await sup.forkserver.start()
        _change(folder, how)
        return await sup.load(LoadRequest(source=str(small_model)))


@pytest.mark.parametrize("how", ["removed", "replaced_by_a_file"])
async def test_landlock_holds_when_a_preloaded_folder_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_model: Path, how: str
) -> None:
    """The fork server lists the folders children may read once; one removed (or turned
    into a file) since is left out of a child's rules, and Landlock still confines it:
    reading another file is denied."""
    report = await _load_after(tmp_path, monkeypatch, small_model, how)
    assert_denied(report)
    assert any(c.startswith("landlock_abi") for c in report.confinement), report.confinement


async def test_a_landlock_that_cannot_be_applied_refuses_the_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_model: Path
) -> None:
    """A rule that fails for another reason than a vanished path (here a symlink loop:
    ELOOP) stops the child before the loader runs (unconfined, ``read_other`` would load
    fine): the sandbox's failure, classified, not the file's."""
    report = await _load_after(tmp_path, monkeypatch, small_model, "a_symlink_loop")
    assert report.outcome is Outcome.CRASHED, report.error
    assert report.error is not None and report.error.code == "sandbox", report.error
    assert "Landlock could not be applied" in report.error.message
    assert not any(c.startswith("landlock_abi") for c in report.confinement)


@needs_landlock
async def test_a_child_ready_without_the_landlock_asked_for_is_refused(
    small_model: Path,
) -> None:
    """A child finds no Landlock (a filter preloaded into the fork server makes its system
    calls fail with ENOSYS) although the supervisor found it and asked for it: the child
    goes on as in a kernel without Landlock, and the supervisor refuses its answer."""
    loaders = {ModelFormat.SAFETENSORS: "read_other"}
    preload = [TEST_LOADERS, "tests.preload_no_landlock"]
    async with Supervisor(Settings(), preload=preload, loaders=loaders) as sup:
        report = await sup.load(LoadRequest(source=str(small_model)))
    assert report.outcome is Outcome.CRASHED, report.error
    assert report.error is not None and report.error.code == "protocol_violation"
    assert "asked for Landlock" in report.error.message
