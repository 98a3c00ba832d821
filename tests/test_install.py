"""What each install brings: the producer without the worker's packages, the command's message
without them, and pyproject's dependency sets against what each side imports."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

import pytest
import redis
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from loadwarden.producer.contract import LoadRequest
from loadwarden.worker.cli.entry import EXIT_USAGE, WORKER_MODULES

ROOT = Path(__file__).parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: Modules of the worker's side that the brief names, blocked even if pyproject forgot them.
NAMED_WORKER_MODULES = {
    "fastapi",
    "ml_dtypes",
    "numpy",
    "prometheus_client",
    "psutil",
    "rich",
    "safetensors",
    "structlog",
    "typer",
}

#: Put first on sys.meta_path of a child interpreter: importing a blocked top-level module
#: (or anything inside it) fails as if it were not installed.
BLOCKER = """
import json, sys
BLOCKED = frozenset(json.loads(sys.argv[1]))

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, Blocker())
"""


def _dist_names(specs: Iterable[str]) -> set[str]:
    """Distribution names of requirement strings, loadwarden's own extras left out."""
    names = {canonicalize_name(Requirement(spec).name) for spec in specs}
    return names - {"loadwarden"}


def _closure(names: Iterable[str]) -> set[str]:
    """The distributions ``names`` bring when installed: themselves and what they require."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for spec in importlib.metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _module_dists() -> dict[str, set[str]]:
    """Top-level module -> the distributions that install it (of this environment)."""
    return {
        module: {canonicalize_name(d) for d in dists}
        for module, dists in importlib.metadata.packages_distributions().items()
    }


def _modules_of(dists: set[str]) -> set[str]:
    """The top-level modules these distributions install."""
    return {m for m, owners in _module_dists().items() if owners & dists and m.isidentifier()}


def _imports(folder: Path) -> tuple[set[str], set[str]]:
    """Third-party top-level modules imported under ``folder``: at module level, and anywhere."""
    eager: set[str] = set()
    every: set[str] = set()
    for path in folder.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top_level = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top in sys.stdlib_module_names or top in {"loadwarden", "__future__"}:
                    continue
                every.add(top)
                if id(node) in top_level:
                    eager.add(top)
    return eager, every


def _worker_only_modules() -> set[str]:
    """Every module the worker extra brings that the base install does not (and the named)."""
    base = _closure(_dist_names(PROJECT["dependencies"]))
    worker = _closure(_dist_names(PROJECT["optional-dependencies"]["worker"]))
    return _modules_of(worker - base) | NAMED_WORKER_MODULES


def _run_blocked(
    code: str, blocked: set[str], *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child interpreter where ``blocked`` cannot be imported."""
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code, json.dumps(sorted(blocked)), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_the_producer_imports_and_enqueues_without_the_worker_packages(redis_url: str) -> None:
    """Every module of loadwarden.producer imports with the worker's packages blocked, and its
    client enqueues from there (worker settings in the environment are ignored)."""
    blocked = _worker_only_modules()
    assert {"numpy", "psutil", "structlog", "httpx", "uvicorn"} <= blocked
    code = """
import asyncio, importlib, pkgutil
import loadwarden.producer
from loadwarden.producer import Client, LoadRequest

# Every module but a __main__ (importing one runs it: the schemas' writes files).
found = pkgutil.walk_packages(loadwarden.producer.__path__, "loadwarden.producer.")
names = [m.name for m in found if not m.name.endswith(".__main__")]
for name in names:
    importlib.import_module(name)

async def enqueue():
    async with Client(sys.argv[2]) as client:
        handle = await client.enqueue(LoadRequest(source="/models/a.safetensors"))
        return handle.job_id

job_id = asyncio.run(enqueue())
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
worker = sorted(m for m in sys.modules if m.startswith("loadwarden.worker"))
print(json.dumps({"modules": names, "job_id": job_id, "blocked_loaded": loaded, "worker": worker}))
"""
    env = {**os.environ, "LOADWARDEN_CONCURRENCY": "3", "LOADWARDEN_LIMITS__STARTUP_S": "7"}
    proc = _run_blocked(code, blocked, redis_url, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert "loadwarden.producer.client" in result["modules"]
    assert "loadwarden.producer.contract.report" in result["modules"]
    assert result["blocked_loaded"] == [] and result["worker"] == []
    # The job is in the queue, as the producer's own request.
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.zscore("loadwarden:queue", result["job_id"]) is not None
        document = json.loads(client.get("arq:job:" + result["job_id"]) or b"{}")
    finally:
        client.close()
    request = LoadRequest.model_validate(document["k"]["request"])
    assert request.source == "/models/a.safetensors"


def test_base_dependencies_are_what_the_producer_imports() -> None:
    """`pip install loadwarden` is exactly the distributions producer/ imports, and each of its
    third-party imports comes with them."""
    base = _dist_names(PROJECT["dependencies"])
    eager, every = _imports(ROOT / "producer")
    owners = _module_dists()
    imported = {canonicalize_name(d) for module in every for d in owners[module]}
    assert eager == every, "producer/ imports nothing lazily"
    assert imported <= _closure(base), imported - _closure(base)
    assert base <= imported, f"base dependencies producer/ never imports: {base - imported}"


def test_worker_imports_come_with_the_worker_extra() -> None:
    """Every module-level import under worker/ comes with base + worker; a lazy one may need
    the extra of its feature (signing, embedded)."""
    extras = PROJECT["optional-dependencies"]
    base_worker = _closure(_dist_names(PROJECT["dependencies"]) | _dist_names(extras["worker"]))
    with_features = base_worker | _closure(
        _dist_names(extras["signing"]) | _dist_names(extras["embedded"])
    )
    eager, every = _imports(ROOT / "worker")
    owners = _module_dists()
    missing_eager = {m for m in eager if not owners.get(m, set()) & base_worker}
    missing_lazy = {m for m in every if not owners.get(m, set()) & with_features}
    assert missing_eager == set()
    assert missing_lazy == set()
    for extra in ("signing", "embedded", "examples", "test"):
        assert any(re.match(r"loadwarden\[.*\bworker\b", s) for s in extras[extra]), extra


def test_the_command_checks_every_module_of_the_worker_extra() -> None:
    """The console script looks for exactly the top-level modules of the worker extra."""
    worker = _dist_names(PROJECT["optional-dependencies"]["worker"])
    owners = _module_dists()
    top = {m for m, dists in owners.items() if dists & worker and not m.startswith("_")}
    assert set(WORKER_MODULES) == top
    assert list(WORKER_MODULES) == sorted(WORKER_MODULES)


@pytest.mark.parametrize("blocked", [["typer", "numpy"], ["httpx"]])
def test_the_command_names_the_worker_extra_when_it_is_missing(blocked: list[str]) -> None:
    """Without a worker package (imported at start or only by some command), `loadwarden`
    prints one line naming the install to run, no traceback, and exits 2."""
    code = """
sys.argv = ["loadwarden", "--help"]
from loadwarden.worker.cli.entry import main
main()
"""
    proc = _run_blocked(code, set(blocked))
    assert proc.returncode == EXIT_USAGE
    assert proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert "pip install 'loadwarden[worker]'" in line
    assert f"{sorted(blocked)[0]} is not installed" in line
