"""Every command's exit status and ``--json`` document for usage errors, in one real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EXIT_USAGE = 2
#: Runs each command line in-process with typer's CliRunner, in a process of its own
#: (a command may configure logging on the runner's streams), and prints what each gave.
_RUNNER = """
import json, sys
from typer.testing import CliRunner
from loadwarden.worker.cli.main import app
runner = CliRunner()
results = [runner.invoke(app, args) for args in json.loads(sys.argv[1])]
print(json.dumps([[r.exit_code, r.stdout, r.stderr] for r in results]))
"""
#: Every command that needs a queue, with --json where it takes it.
NEEDS_REDIS = [
    ["worker"],
    ["exporter"],
    ["serve"],
    ["enqueue", "/models/m.safetensors", "--json"],
    ["report", "job", "--json"],
    ["show", "job", "--json"],
    ["status", "--json"],
    ["cancel", "job", "--json"],
    ["dead", "list", "--json"],
    ["dead", "retry", "--all", "--json"],
    ["dead", "purge", "--yes", "--json"],
    ["autoscale", "--json"],
    ["failures", "list", "--json"],
    ["failures", "clear", "--all", "--json"],
]
#: The commands that run without a queue: ``preload`` starts an embedded one.
RUN_HERE = [["load"], ["inspect"], ["preload"], ["calibrate"]]


def _invoke(*command_lines: list[str]) -> list[tuple[int, str, str]]:
    env = {k: v for k, v in os.environ.items() if k != "LOADWARDEN_REDIS_URL"}
    out = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(command_lines)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    ).stdout
    return [tuple(result) for result in json.loads(out)]  # type: ignore[misc]


def _one_error_document(stdout: str) -> dict[str, object]:
    """The one JSON document stdout holds: an error with a type and a message."""
    document = json.loads(stdout)  # one document, nothing before or after it
    assert isinstance(document, dict) and set(document) == {"error"}, document
    assert document["error"]["type"] and document["error"]["message"]
    return document


def test_the_lists_name_every_command() -> None:
    """Every command of ``loadwarden`` (a sub-command of a group included) is in NEEDS_REDIS
    or RUN_HERE, so a new command cannot skip the usage-error test below."""
    from loadwarden.worker.cli.main import app

    commands = {(c.name or c.callback.__name__,) for c in app.registered_commands if c.callback}
    for group in app.registered_groups:
        assert group.name and group.typer_instance
        for c in group.typer_instance.registered_commands:
            assert c.callback
            commands.add((group.name, c.name or c.callback.__name__))
    listed = [tuple(w for w in args if not w.startswith(("-", "/"))) for args in NEEDS_REDIS]
    named = {args[:2] if args[0] in ("dead", "failures") else args[:1] for args in listed}
    assert commands == named | {tuple(args) for args in RUN_HERE}


def test_no_redis_url_is_a_usage_error_in_every_command(tmp_path: Path) -> None:
    """Without --redis or LOADWARDEN_REDIS_URL every queue command exits 2, saying so
    on stderr, and under --json prints exactly one error document."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[[model]]\nname = "a"\nsorce = "x"\n')
    lines = [
        *NEEDS_REDIS,
        ["status", "--no-such-option", "--json"],
        ["dead", "purge", "--json", "--redis", "redis://127.0.0.1:1"],  # no --yes, no terminal
        ["calibrate", str(bad), "--json"],
        ["preload", str(bad), "--json"],
    ]
    results = _invoke(*lines)
    for args, (code, stdout, stderr) in zip(lines, results, strict=True):
        assert code == EXIT_USAGE, (args, code, stdout, stderr)
        if "--json" in args:
            _one_error_document(stdout)
        else:
            assert stdout == "", args
        if args in NEEDS_REDIS:
            assert "LOADWARDEN_REDIS_URL" in stderr, (args, stderr)
    calibrate, preload = (json.loads(stdout) for _code, stdout, _err in results[-2:])
    assert calibrate == preload and len(calibrate["error"]["defects"]) == 2
