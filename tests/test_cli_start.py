"""What makes `loadwarden load` start fast keeps every process accounted for and every check.

The console script launches the fork server before its own imports (``cli/_ahead``) and
``ForkServer`` adopts it; a command line that runs no load leaves none behind. Off a
terminal, logs never import rich. The process exits without the interpreter's teardown,
with the same status and all its output.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from loadwarden.worker.sandbox._launch import launch, preloads
from loadwarden.worker.sandbox.children import stop_child
from loadwarden.worker.sandbox.forkserver import ForkServer

LOADWARDEN = str(Path(sys.executable).parent / "loadwarden")
FORKSERVER_MODULE = "loadwarden.worker.sandbox._forkserver"


def forkservers_of(pid: int) -> list[psutil.Process]:
    """Live fork servers launched for process ``pid`` (its pid is their second argument)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if FORKSERVER_MODULE in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE:
            at = cmd.index(FORKSERVER_MODULE)
            if cmd[at + 2 : at + 3] == [str(pid)]:
                found.append(proc)
    return found


def run_cli(*args: str) -> tuple[int, int, str, str]:
    """Run the console script; its pid, exit status, stdout and stderr."""
    proc = subprocess.Popen(
        [LOADWARDEN, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=60)
    return proc.pid, proc.returncode, out, err


def run_entry(
    at_exit: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The console script's ``main`` run with ``args`` (in ``env``, else ours); at exit it
    prints ``at_exit`` (an expression, with ``gc`` and ``sys`` imported) on stderr, after
    the command's own exit handlers ran (``entry.exit_now``)."""
    code = (
        "import atexit, gc, sys\n"
        f"atexit.register(lambda: print({at_exit}, file=sys.stderr))\n"
        "sys.argv = ['loadwarden', *sys.argv[1:]]\n"
        "from loadwarden.worker.cli.entry import main\n"
        "main()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def modules_at_exit(
    *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """``run_entry`` of ``args`` (which must exit 0), and the modules imported by its end."""
    done = run_entry("'MODULES', *sorted(sys.modules)", *args, env=env)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stderr.splitlines() if line.startswith("MODULES "))
    return done, line.split()


def test_usage_error_leaves_no_fork_server(small_model: Path) -> None:
    """`load` with a bad option exits 2, and the fork server launched ahead is already gone."""
    pid, status, _out, err = run_cli("load", str(small_model), "--memory-bytes", "0")
    assert status == 2, err
    assert forkservers_of(pid) == []


def test_load_adopts_the_fork_server_launched_ahead(small_model: Path) -> None:
    """A load through the console script starts exactly one fork server, and reports ok."""
    pid, status, out, err = run_cli("load", str(small_model), "--json", "--log-level", "info")
    assert status == 0, err
    assert '"outcome":"ok"' in out
    assert err.count('"event": "forkserver_started"') == 1, err
    assert forkservers_of(pid) == []


def test_json_inspect_imports_no_rich(small_model: Path) -> None:
    """`inspect --json` prints its document with json alone: rich is never imported."""
    done, modules = modules_at_exit("inspect", str(small_model), "--json")
    assert '"outcome": "ok"' in done.stdout
    assert "loadwarden.worker.load._model" in modules  # the check sees the inspection's imports
    assert [name for name in modules if name.split(".")[0] == "rich"] == []


#: What ``inspect`` of a safetensors file, printed to a pipe, never imports: rich (its
#: output is plain), pydantic-settings and the worker's Settings (no LOADWARDEN_* variable
#: is set), the other formats' parsers (GGUF, npy, npz and zip), and asyncio (no download,
#: no signature to verify) or the child run's outcomes.
NOT_FOR_A_PLAIN_INSPECT = (
    "rich",
    "asyncio",
    "loadwarden.worker.load._outcome",
    "pydantic_settings",
    "loadwarden.producer.settings",
    "loadwarden.worker.config.settings",
    "loadwarden.worker.formats.gguf",
    "loadwarden.worker.binary.gguf",
    "loadwarden.worker.formats.npy",
    "loadwarden.worker.formats.npz",
    "loadwarden.worker.formats._zip",
)


def test_plain_inspect_imports_only_what_it_uses(small_model: Path) -> None:
    """`inspect` of a safetensors file, its table on a pipe and no LOADWARDEN_* variable set,
    imports no rich, no pydantic-settings, no other format's parser and no asyncio."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LOADWARDEN_")}
    done, modules = modules_at_exit("inspect", str(small_model), env=env)
    assert "outcome" in done.stdout and "safetensors" in done.stdout
    assert "loadwarden.worker.formats.safetensors" in modules  # the check sees the parser's
    found = [m for m in modules for n in NOT_FOR_A_PLAIN_INSPECT if m == n or m.startswith(n + ".")]
    assert found == []
    # The same command told a setting reads the settings (and still no rich).
    told = {**env, "LOADWARDEN_REPORT_MAX_TENSORS": "1"}
    _done, modules = modules_at_exit("inspect", str(small_model), env=told)
    assert "loadwarden.worker.config.settings" in modules
    assert [name for name in modules if name.split(".")[0] == "rich"] == []


def test_inspect_downloads_a_url_on_an_event_loop(small_model: Path, tmp_path: Path) -> None:
    """What `inspect` needs an event loop for still runs on one: a URL's download (here
    from a loopback server), which imports asyncio, and reports what the file holds."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(small_model.parent))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    serving.start()
    try:
        env = {
            **{k: v for k, v in os.environ.items() if not k.upper().startswith("LOADWARDEN_")},
            "LOADWARDEN_SOURCES__ALLOW_HOSTS": '["127.0.0.1"]',
            "LOADWARDEN_SOURCES__ALLOW_NETWORKS": '["127.0.0.0/8"]',
            "LOADWARDEN_SOURCES__CACHE_DIR": str(tmp_path / "cache"),
        }
        url = f"http://127.0.0.1:{server.server_address[1]}/{small_model.name}"
        done, modules = modules_at_exit("inspect", url, "--json", env=env)
    finally:
        server.shutdown()
        serving.join()
        server.server_close()
    document = json.loads(done.stdout)
    assert document["outcome"] == "ok" and document["model"]["format"] == "safetensors"
    assert len(document["model"]["tensors"]) == 6
    assert "asyncio" in modules


def test_json_load_imports_neither_rich_nor_prometheus(small_model: Path) -> None:
    """`load --json` with stderr on a pipe imports no rich module (structlog's included)
    and no prometheus_client."""
    _done, modules = modules_at_exit("load", str(small_model), "--json")
    assert "structlog" in modules  # the check sees what logging imported
    assert [name for name in modules if name.split(".")[0] == "rich"] == []
    assert "prometheus_client" not in modules  # its metrics would be served by no one


def test_load_imports_no_redis_client(small_model: Path) -> None:
    """`load` runs without Redis, so redis-py (~170 ms of imports here, jwt and cryptography
    with it) is never imported: a Redis type in an annotation had pulled it in."""
    done, modules = modules_at_exit("load", str(small_model), "--json")
    assert '"outcome":"ok"' in done.stdout
    assert "loadwarden.worker.load._lookup" in modules  # the check sees the load path's imports
    assert [name for name in modules if name.split(".")[0] == "redis"] == []


def test_exit_status_and_output_survive_the_fast_exit(tmp_path: Path) -> None:
    """An outcome other than ok still exits 1 with its whole JSON document on stdout."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    _pid, status, out, err = run_cli("inspect", str(bad), "--json")
    assert status == 1, err
    assert out.endswith("}\n") and '"outcome": "invalid"' in out


async def test_forkserver_adopts_a_launched_process() -> None:
    """ForkServer(launched=) starts on the process launched ahead and forks children from it."""
    launched = launch(preloads())
    server = ForkServer(launched=launched, ready=0)
    try:
        await server.start()
        assert server.pid == launched.process.pid
        child = await server.spawn()
        await stop_child(child)
    finally:
        await server.close()
    assert launched.process.returncode is not None


async def test_the_child_requested_at_launch_is_the_first_loads() -> None:
    """launch(fork_ahead=True): once ready, the fork server forks one child before any spawn;
    the first spawn takes that child, and no other is forked."""
    launched = launch(preloads(), fork_ahead=True)
    assert launched.ahead is not None
    server = ForkServer(launched=launched, ready=0)
    try:
        await server.start()
        adopting = server._adopting
        assert adopting is not None
        async with asyncio.timeout(30):
            await asyncio.shield(adopting)
        (ahead,) = server.waiting  # forked with no spawn asked for
        forked = [p.pid for p in psutil.Process(launched.process.pid).children()]
        assert forked == [ahead]
        child = await server.spawn()
        assert child.pid == ahead and child.sock is launched.ahead
        assert server.waiting == [] and server.spawned == 1
        await stop_child(child)
        assert psutil.Process(launched.process.pid).children() == []
    finally:
        await server.close()
    assert launched.process.returncode is not None


def test_abandoning_a_launch_closes_the_requested_childs_socket() -> None:
    """An unclaimed launch (a usage error) stops the fork server and closes our end of the
    child it may have forked, which dies with it (PR_SET_PDEATHSIG)."""
    launched = launch(preloads(), fork_ahead=True)
    ahead = launched.ahead
    assert ahead is not None
    launched.abandon()
    assert ahead.fileno() == -1
    assert launched.process.returncode is not None


def test_importing_runs_in_a_thread_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """_ahead.importing imports in a thread of its own, joined when the block ends, and puts
    the interpreter's switch interval back (the console script's fast exit needs one thread)."""
    from loadwarden.worker.cli._ahead import importing

    (tmp_path / "lw_warm_probe.py").write_text(
        "import threading\nTHREAD = threading.current_thread().name\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    interval, threads = sys.getswitchinterval(), threading.active_count()
    with importing(("lw_warm_probe",)):
        assert sys.getswitchinterval() < interval
    assert sys.modules["lw_warm_probe"].THREAD == "loadwarden-import"
    assert sys.getswitchinterval() == interval
    assert threading.active_count() == threads
    with importing(("lw_no_such_module",)):  # a failing import is left to where it is used
        pass
    assert "lw_no_such_module" not in sys.modules


async def test_forkserver_replaces_a_launched_process_that_preloads_otherwise() -> None:
    """A process launched with other preloads is stopped, and a fitting one started."""
    launched = launch(preloads())
    server = ForkServer(["json"], launched=launched, ready=0)
    try:
        await server.start()
        assert launched.process.returncode is not None  # killed and reaped
        assert server.pid != launched.process.pid
    finally:
        await server.close()


@pytest.mark.parametrize("argv", [["load", "--help"], ["inspect", "x"], ["--help"], []])
def test_only_a_load_launches_ahead(argv: list[str]) -> None:
    from loadwarden.worker.cli._ahead import runs_load

    assert not runs_load(argv)
    assert runs_load(["load", "x", "--json"])
    assert runs_load(["load", "x", "--", "--help"])


@pytest.mark.parametrize(
    "argv",
    [
        ["load", "--help"],
        ["inspect", "--help"],
        ["load"],
        ["load", "x", "--bogus"],
        ["load", "x", "--memory-bytes", "0", "--json"],
        ["load", "x", "--log-level", "nope"],
        ["inspect", "x", "--format", "zip", "--json"],
        ["status", "--json"],
        ["dead", "--help"],
    ],
)
def test_a_command_alone_parses_helps_and_fails_as_in_the_whole_app(argv: list[str]) -> None:
    """The console script builds only the named command (main.alone): same output and status."""
    whole = (
        f"import sys; sys.argv[0] = {LOADWARDEN!r}\n"
        "from loadwarden.worker.cli.main import app\napp()"
    )
    env = {k: v for k, v in os.environ.items() if k != "LOADWARDEN_REDIS_URL"}
    expected = subprocess.run(
        [sys.executable, "-c", whole, *argv], capture_output=True, text=True, env=env, check=False
    )
    got = subprocess.run([LOADWARDEN, *argv], capture_output=True, text=True, env=env, check=False)
    assert expected.returncode != 0 or "--help" in argv  # each case says something
    assert (got.returncode, got.stdout, got.stderr) == (
        expected.returncode,
        expected.stdout,
        expected.stderr,
    )


CGROUP_FILES = {
    "v1": "9:memory:/user.slice\n8:pids:/user.slice\n1:name=systemd:/\n",
    "hybrid": "9:memory:/user.slice\n1:name=systemd:/\n0::/user.slice\n",
    "v2": "0::/user.slice/session-1.scope\n",
    "v1 without memory": "8:pids:/\n7:blkio:/\n",
    "empty": "",
}


@pytest.mark.parametrize(("host", "first"), [(h, h != "v2") for h in CGROUP_FILES])
def test_the_fork_server_starts_first_unless_cgroup_v2_is_delegated(
    tmp_path: Path, host: str, first: bool
) -> None:
    """_ahead.starts_first reads /proc/self/cgroup as CgroupManager.detect does
    (memory_limit.own_cgroups): only where detect would delegate v2 (no v1 memory
    controller, a unified hierarchy) must the fork server wait for the supervisor."""
    from loadwarden.worker.cli._ahead import starts_first
    from loadwarden.worker.sandbox.memory_limit import own_cgroups

    proc = tmp_path / "proc/self/cgroup"
    proc.parent.mkdir(parents=True)
    proc.write_text(CGROUP_FILES[host])
    own = own_cgroups(tmp_path)
    assert starts_first(str(proc)) is first
    assert first is ("memory" in own or "" not in own)  # detect's own test, v1 first
    assert starts_first(str(tmp_path / "missing"))  # unreadable: detect finds no cgroups


@pytest.mark.parametrize("first", [True, False])
async def test_on_cgroup_v2_the_supervisor_starts_the_fork_server_after_detecting(
    small_model: Path, monkeypatch: pytest.MonkeyPatch, first: bool
) -> None:
    """Where the fork server may not start first (cgroup v2 delegation: ``delegate_v2`` gets
    EBUSY while it sits in the supervisor's cgroup), neither the console script nor
    ``_load_here`` starts it before ``CgroupManager.detect`` runs; the load is still ok."""
    from loadwarden.worker.cli import _ahead, _local
    from loadwarden.worker.cli._common import load_request, named_root, settings_from, with_roots
    from loadwarden.worker.sandbox.cgroups import CgroupManager

    monkeypatch.setattr(_ahead, "starts_first", lambda: first)  # the host's answer
    _ahead.launch_for(["load", str(small_model)])
    launched = _ahead.take()
    assert (launched is not None) is first
    if launched is not None:
        launched.abandon()
    at_detect: list[int] = []
    detect = CgroupManager.detect

    def spying(*args: object, **kwargs: object) -> object:  # the real detect, observed
        at_detect.append(len(forkservers_of(os.getpid())))
        return detect(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(CgroupManager, "detect", spying)
    request = load_request(str(small_model), None, {})
    settings = with_roots(settings_from(use_cgroups=True), *named_root(request.source))
    report = await _local._load_here(lambda: (request, settings))
    assert report.outcome == "ok", report.error
    assert at_detect == [1 if first else 0]
    assert forkservers_of(os.getpid()) == []


@pytest.mark.parametrize(
    ("argv", "held"),
    [
        (["inspect", "x"], True),
        (["load", "x", "--json"], True),
        (["--help"], True),
        ([], True),
        (["worker", "--redis", "--help"], False),  # runs for days: never held
        (["serve"], False),
        (["status", "--help"], False),
    ],
)
def test_only_inspect_load_and_the_groups_help_hold_the_collector(
    argv: list[str], held: bool
) -> None:
    import gc

    from loadwarden.worker.cli import entry

    assert gc.isenabled()
    try:
        entry.hold_collector(argv)
        assert gc.isenabled() is not held
        entry.release_collector()
        assert gc.isenabled()
        assert (gc.get_freeze_count() > 0) is held
        entry.release_collector()  # once only
    finally:
        gc.unfreeze()
        gc.enable()


@pytest.mark.parametrize("command", ["inspect", "load"])
def test_inspect_and_load_run_collected_after_their_imports(
    small_model: Path, command: str
) -> None:
    """The console script holds the collector while inspect or load imports, and the command
    turns it back on, frozen, before its work: a long load runs collected."""
    done = run_entry(
        "'GC', gc.isenabled(), gc.get_freeze_count() > 0", command, str(small_model), "--json"
    )
    assert done.returncode == 0, done.stderr
    assert "GC True True" in done.stderr.splitlines()
