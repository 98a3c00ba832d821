"""The ``loadwarden`` command's own start: ``--help``, ``inspect`` and ``load`` of a tiny file.

    python bench/cli.py [--rounds 15] [--warmup 2] [--json]

Writes a 1 KiB safetensors model (with the ``safetensors`` package) into a
temporary directory, then runs each command as a user would, a fresh process
each time (``subprocess.run`` timed with ``time.perf_counter``, output to a pipe),
the commands interleaved round by round so drift on a busy machine hits all of
them alike:

* baseline: ``python -c pass`` (the interpreter alone) and ``python -c "import
  loadwarden.producer"`` (the interpreter and our package's entry);
* ``loadwarden --help``;
* ``loadwarden inspect tiny.safetensors`` (header only, no child);
* ``loadwarden load tiny.safetensors``: a whole sandboxed load in this process's
  own supervisor, fork server and confined child included. The working
  directory is the model's folder, which the command makes its one allowed root.

Before timing, loadwarden's own modules are compiled to bytecode (``compileall``),
as ``pip install`` does for an installed package: an editable install run with
``PYTHONDONTWRITEBYTECODE=1`` (as here) would otherwise compile every module from
source on every start (150 ms of a run, measured with cProfile).

Every command must exit 0 (each is checked). Medians (and minima) over the
rounds, each against issue 13's goal (<= 250 ms end to end) and against the
baselines measured in the same run; also the CPU time (user + system) of each
command's whole process tree, which a busy machine inflates less than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

#: Issue 13: "`loadwarden inspect` / `load` of a tiny file end to end <= 250 ms".
GOAL_S = 0.250
MODEL = "tiny.safetensors"


def write_model(directory: str) -> str:
    """A 1 KiB safetensors file: one 16 x 16 float32 tensor, written by safetensors itself."""
    import numpy as np
    import safetensors.numpy

    path = os.path.join(directory, MODEL)
    safetensors.numpy.save_file({"weight": np.ones((16, 16), dtype=np.float32)}, path)
    return path


def compile_package() -> None:
    """Write loadwarden's bytecode, as an installed package has it (pip compiles on install)."""
    import compileall

    import loadwarden.producer
    import loadwarden.worker

    for package in (loadwarden.producer, loadwarden.worker):
        for folder in package.__path__:
            compileall.compile_dir(folder, quiet=1)


def loadwarden_command() -> list[str]:
    """The console script installed beside this interpreter, as a user runs it."""
    script = os.path.join(os.path.dirname(sys.executable), "loadwarden")
    if os.access(script, os.X_OK):
        return [script]
    found = shutil.which("loadwarden")
    return [found] if found else [sys.executable, "-m", "loadwarden.worker.cli.main"]


def commands() -> dict[str, list[str]]:
    cli = loadwarden_command()
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import loadwarden.producer": [sys.executable, "-c", "import loadwarden.producer"],
        "loadwarden --help": [*cli, "--help"],
        "loadwarden inspect": [*cli, "inspect", MODEL],
        "loadwarden load": [*cli, "load", MODEL],
    }


def _children_cpu_s() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def run_once(argv: list[str], cwd: str, env: dict[str, str]) -> tuple[float, float]:
    """Wall time and CPU time (user + system of the whole process tree, which each parent
    reaps: the fork server and its load child included) of one run."""
    cpu_before = _children_cpu_s()
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, check=False)
    seconds = time.perf_counter() - started
    cpu = _children_cpu_s() - cpu_before
    if done.returncode != 0:
        raise SystemExit(
            f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout.decode()}"
            f"{done.stderr.decode()}"
        )
    return seconds, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=15, help="timed runs of each command")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be positive and --warmup not negative")
    # The user's Redis URL plays no part in these commands; everything else is as the shell has it.
    env = {k: v for k, v in os.environ.items() if k != "LOADWARDEN_REDIS_URL"}
    load_before = os.getloadavg()
    directory = tempfile.mkdtemp(prefix="loadwarden-bench-cli-")
    try:
        compile_package()
        write_model(directory)
        named = commands()
        samples: dict[str, list[float]] = {name: [] for name in named}
        cpu: dict[str, list[float]] = {name: [] for name in named}
        for round_ in range(args.warmup + args.rounds):
            for name, command in named.items():
                seconds, cpu_s = run_once(command, directory, env)
                if round_ >= args.warmup:
                    samples[name].append(seconds)
                    cpu[name].append(cpu_s)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    load_after = os.getloadavg()

    median = {name: statistics.median(s) for name, s in samples.items()}
    interpreter = median["python -c pass"]
    package = median["import loadwarden.producer"]
    rows = [
        {
            "command": name,
            "median_s": round(median[name], 4),
            "min_s": round(min(s), 4),
            "cpu_median_s": round(statistics.median(cpu[name]), 4),
            "minus_interpreter_s": round(median[name] - interpreter, 4),
            "ratio_to_import_producer": round(median[name] / package, 2),
            "goal_s": GOAL_S if name.startswith("loadwarden ") else None,
        }
        for name, s in samples.items()
    ]
    goals = {name: median[name] <= GOAL_S for name in ("loadwarden inspect", "loadwarden load")}
    summary = {
        "bench": "cli",
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "commands": rows,
        "goals": goals,
    }
    if not args.json:
        print(
            f"loadwarden CLI start: Python {summary['python']}, {os.cpu_count()} CPUs, "
            f"median of {args.rounds} (after {args.warmup} untimed), load average "
            f"{load_before[0]:.2f} before, {load_after[0]:.2f} after"
        )
        print(
            f"{'command':<28}{'median ms':>10}{'min ms':>8}{'CPU ms':>8}{'- python ms':>13}"
            f"{'x import producer':>19}"
        )
        for row in rows:
            print(
                f"{row['command']:<28}{row['median_s'] * 1e3:>10.0f}{row['min_s'] * 1e3:>8.0f}"
                f"{row['cpu_median_s'] * 1e3:>8.0f}{row['minus_interpreter_s'] * 1e3:>13.0f}"
                f"{row['ratio_to_import_producer']:>19.2f}"
            )
        for name, met in goals.items():
            print(
                f"{'PASS' if met else 'FAIL'}  {name} {MODEL}: median {median[name] * 1e3:.0f} ms "
                f"(goal <= {GOAL_S * 1e3:.0f} ms; the interpreter alone {interpreter * 1e3:.0f} ms)"
            )
        print()
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
