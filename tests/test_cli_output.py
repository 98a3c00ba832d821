"""What the command line prints, through the real `loadwarden` command at a real width (80)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from loadwarden.producer.client import Client
from loadwarden.producer.contract import LoadRequest
from loadwarden.worker.config import Settings
from loadwarden.worker.queue.runner import WorkerRunner
from tests.conftest import eventually, running_worker
from tests.test_cli import EXIT_NO_ANSWER, EXIT_OK, LOADWARDEN, run

NARROW = {"COLUMNS": "80"}
#: Rich markup, an OSC 8 hyperlink, an ANSI colour, a newline and a bidi override.
HOSTILE = "[bold red]x[/] \x1b]8;;http://evil/\x07a\x1b[31m\nb\u202e"


def _drain(redis_url: str, *requests: LoadRequest) -> list[str]:
    """Enqueue requests, run a burst worker over them, return their job ids."""

    async def go() -> list[str]:
        settings = Settings(redis_url=redis_url)
        async with Client(settings=settings) as client:
            ids = [(await client.enqueue(r)).job_id for r in requests]
        await WorkerRunner(settings, burst=True, handle_signals=False).run()
        return ids

    return asyncio.run(go())


@pytest.fixture
def hostile_file(tmp_path: Path) -> Path:
    path = tmp_path / f"{HOSTILE.replace('/', '_')}.safetensors"
    path.write_bytes(b"\xff" * 64)  # an invalid header: ends invalid, dead-lettered at once
    return path


def test_hostile_names_are_escaped_in_dead_list_and_report(
    redis_url: str, hostile_file: Path
) -> None:
    """Markup and escape sequences from a source or a label print escaped, never raw or parsed."""
    env = {"LOADWARDEN_REDIS_URL": redis_url, **NARROW}
    (job_id,) = _drain(redis_url, LoadRequest(source=str(hostile_file), labels={"t": HOSTILE}))
    for args in (("dead", "list"), ("report", job_id), ("show", job_id)):
        result = run(*args, env=env)
        assert result.returncode in (0, 1), result.stderr  # no MarkupError, no traceback
        out = result.stdout
        assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
        assert "[bold red]x[" in out  # shown as written, not interpreted
        assert "\\x1b]8;;http:" in out  # the escape is visible


def test_dead_list_prints_ids_whole_at_80_columns(redis_url: str, tmp_path: Path) -> None:
    """`dead list` at 80 columns prints every id, job id and source in full, copyable."""
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "model-with-a-long-name.safetensors"
    deep.parent.mkdir(parents=True)
    deep.write_bytes(b"\xff" * 64)
    env = {"LOADWARDEN_REDIS_URL": redis_url, **NARROW}
    (job_id,) = _drain(redis_url, LoadRequest(source=str(deep)))
    letter = json.loads(run("dead", "list", "--json", env=env).stdout)[0]
    out = run("dead", "list", env=env).stdout
    assert letter["id"] in out and job_id in out and str(deep) in out.replace("\n", "")
    assert "…" not in out


@pytest.mark.timeout(240)  # eight commands, each a fresh interpreter
def test_dead_retry_and_purge_explain_themselves(redis_url: str, tmp_path: Path) -> None:
    """A bogus dead-letter id is a clear exit 3; a job id works; purge asks, filters, counts."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    env = {"LOADWARDEN_REDIS_URL": redis_url, **NARROW}
    first, second = _drain(
        redis_url,
        LoadRequest(source=str(bad), labels={"n": "1"}),
        LoadRequest(source=str(bad), labels={"n": "2"}),
    )
    bogus = run("dead", "retry", "bogus-id", env=env)
    assert bogus.returncode == EXIT_NO_ANSWER
    assert "Traceback" not in bogus.stderr and "no dead letter 'bogus-id'" in bogus.stderr
    retried = json.loads(run("dead", "retry", first, "--json", env=env).stdout)
    assert len(retried["job_ids"]) == 1  # by job id, the natural thing to paste
    unconfirmed = run("dead", "purge", env=env)
    assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr
    assert len(json.loads(run("dead", "list", "--json", env=env).stdout)) == 1
    kept = run("dead", "purge", "--outcome", "timeout", "--yes", "--json", env=env)
    assert json.loads(kept.stdout) == {"removed": 0}
    gone = run("dead", "purge", second, "--yes", "--json", env=env)
    assert json.loads(gone.stdout) == {"removed": 1}


def test_enqueue_takes_labels_limits_and_a_job_id(redis_url: str, small_model: Path) -> None:
    """`enqueue` carries --label, limit flags and --job-id into the job, as the client does."""
    env = {"LOADWARDEN_REDIS_URL": redis_url}
    args = ["--label", "team=search", "--memory-bytes", str(10**15), "--deadline-s", "30"]
    enqueued = run("enqueue", str(small_model), *args, "--job-id", "mine-1", "--json", env=env)
    assert json.loads(enqueued.stdout) == {"job_id": "mine-1"}
    _drain(redis_url)
    report = json.loads(run("report", "mine-1", "--json", env=env).stdout)
    assert report["labels"] == {"team": "search"}
    assert report["limits"]["derivation"]["memory_bytes"] == "override_clamped"
    assert report["limits"]["timeout_seconds"] == 30
    text = run("report", "mine-1", env={**env, **NARROW}).stdout
    assert "team=search" in text and "attempt 1" in text and "override_clamped" in text


def test_relative_source_is_refused_at_enqueue() -> None:
    """A relative path in a LoadRequest is refused with the reason, before it reaches a queue."""
    with pytest.raises(ValueError, match="resolves paths on its own side"):
        LoadRequest(source="models/bert.safetensors")


@pytest.mark.parametrize("command", ["preload", "worker", "enqueue", "dead purge"])
def test_help_renders_at_80_columns(command: str) -> None:
    """--help shows [[model]], whole env-var names, and flags without a type after --help."""
    out = run(*command.split(), "--help", env=NARROW).stdout
    assert "--help <bool>" not in out and "--json <bool>" not in out
    assert "…" not in out
    if command == "preload":
        assert "[[model]]" in out
    if command == "worker":
        assert "LOADWARDEN_ALLOW_ROOTS" in out and "LOADWARDEN_REDIS_URL" in out


def test_preload_without_a_terminal_prints_progress_lines(
    small_model: Path, tmp_path: Path
) -> None:
    """Without a terminal, preload prints a line per finished entry on stderr, out of the total."""
    catalog = tmp_path / "c.toml"
    entries = "\n".join(
        f'[[model]]\nname = "m{i}"\nsource = "{small_model}"\nlabels = {{ i = "{i}" }}\n'
        for i in range(3)
    )
    catalog.write_text(entries)
    result = run("preload", str(catalog), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == EXIT_OK, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in lines] == ["[1/3", "[2/3", "[3/3"]
    assert all(": ok" in line for line in lines)


def test_calibrate_writes_a_catalog_that_can_replace_the_old_one(
    small_model: Path, tmp_path: Path
) -> None:
    """calibrate -o keeps names, labels, sha256 and relative sources, within the floors."""
    import hashlib

    from loadwarden.producer.catalog import load_catalog

    (tmp_path / "m.safetensors").write_bytes(small_model.read_bytes())
    digest = hashlib.sha256(small_model.read_bytes()).hexdigest()
    catalog = tmp_path / "c.toml"
    catalog.write_text(
        '[defaults]\nlabels = { team = "x" }\n\n[[model]]\nname = "tiny"\n'
        f'source = "m.safetensors"\nsha256 = "{digest}"\nlabels = {{ tier = "gold" }}\n'
    )
    out = tmp_path / "out.toml"
    result = run("calibrate", str(catalog), "-o", str(out), env=NARROW)
    assert result.returncode == EXIT_OK, result.stderr
    assert "the worker's floor" in result.stdout  # the reason is shown
    again = load_catalog(out)  # parses, no duplicate names
    (entry,) = again.models
    policy = Settings().limits
    assert (entry.name, entry.source, entry.sha256) == ("tiny", "m.safetensors", digest)
    assert entry.labels == {"tier": "gold"} and again.defaults.labels == {"team": "x"}
    assert entry.limits.timeout_seconds is not None and entry.limits.cpu_seconds is not None
    assert entry.limits.timeout_seconds >= policy.timeout_floor_s
    assert entry.limits.cpu_seconds >= policy.cpu_floor_s


async def test_status_shows_running_jobs_whole_at_80_columns(
    redis_url: str, small_model: Path
) -> None:
    """`status` at 80 columns shows the job loading now and the confinement column uncut."""
    settings = Settings(redis_url=redis_url)
    env = {"LOADWARDEN_REDIS_URL": redis_url, **NARROW}
    async with (
        running_worker(settings, loaders={"safetensors": "hang"}) as runner,
        Client(settings=settings) as client,
    ):
        handle = await client.enqueue(LoadRequest(source=str(small_model)))
        await eventually(lambda: runner.supervisor.forkserver.spawned, 30, "child loading")
        shown = await asyncio.to_thread(run, "status", env=env)
        await handle.cancel()
        await handle.report(30)
    out = shown.stdout
    assert shown.returncode == EXIT_OK, shown.stderr
    assert handle.job_id in out and "loading" in out
    assert "…" not in out
    assert f"landlock ABI {runner.supervisor.landlock_abi or 'none'}" in out.replace("\n", " ")


def test_preload_on_a_terminal_shows_the_whole_total_from_the_start(
    small_model: Path, tmp_path: Path
) -> None:
    """On a terminal (a pty), every progress frame counts out of the catalog's whole size."""
    import os
    import pty
    import subprocess

    catalog = tmp_path / "c.toml"
    catalog.write_text(
        "\n".join(
            f'[[model]]\nname = "m{i}"\nsource = "{small_model}"\nlabels = {{ i = "{i}" }}\n'
            for i in range(4)
        )
    )
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [LOADWARDEN, "preload", str(catalog), "--state-dir", str(tmp_path / "state")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=follower,
        env={**os.environ, **NARROW, "TERM": "xterm"},
    )
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the command exited and closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.wait(60) == EXIT_OK
    assert proc.stdout is not None
    with proc.stdout:
        assert b"preload summary" in proc.stdout.read()
    frames = re.findall(rb"preloading: (\d+)/(\d+) done", seen)
    assert frames, seen[-500:]
    assert {total for _, total in frames} == {b"4"}


def test_calibrate_output_parses_whatever_the_names_hold(tmp_path: Path) -> None:
    """calibrate -o writes UTF-8 TOML that parses back to the same catalog: characters
    outside the BMP, control characters and quotes in values, a newline in the catalog's
    file name (it is quoted in a comment), under a locale that is not UTF-8."""
    from loadwarden.producer.catalog import load_catalog

    (tmp_path / "m \U0001f40d.safetensors").write_bytes(b"\xff" * 64)  # ends invalid, no child
    catalog = tmp_path / "cat\nalog.toml"
    catalog.write_text(
        '[defaults]\nlabels = { team = "\U0001f999\\u0007\\u202e" }\n\n[[model]]\n'
        'name = "m"\nsource = "m \U0001f40d.safetensors"\n'
        'labels = { "\U0001f40d" = "\U0001f600 \\"quoted\\" \\\\" }\n',
        encoding="utf-8",
    )
    out = tmp_path / "out.toml"
    ascii_locale = {"PYTHONUTF8": "0", "LC_ALL": "C"}
    result = run("calibrate", str(catalog), "-o", str(out), env=ascii_locale)
    assert result.returncode == 1, result.stderr  # the entry did not load: no limits for it
    again, first = load_catalog(out), load_catalog(catalog)
    assert again.defaults.labels == first.defaults.labels == {"team": "\U0001f999\x07\u202e"}
    assert again.models == first.models
    assert first.models[0].labels == {"\U0001f40d": '\U0001f600 "quoted" \\'}
