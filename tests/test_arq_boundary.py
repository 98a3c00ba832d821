"""arq's Worker is known in one place: only the adapter imports it or touches its state,
and the runner's stop stages work through it."""

from __future__ import annotations

import ast
import asyncio
import inspect
import shutil
import typing
from collections.abc import Callable
from pathlib import Path

import arq.worker

from loadwarden.producer.client import Client, JobState
from loadwarden.producer.connection import redis_client
from loadwarden.producer.contract import LoadRequest
from loadwarden.worker.config import Settings
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.queue.arq_adapter import ArqAdapter, create_worker
from loadwarden.worker.queue.jobs import JobBook
from tests.conftest import eventually

ROOT = Path(__file__).parent.parent

#: The adapter: ``ArqAdapter`` and the arq subclass it builds (which overrides arq's methods).
ADAPTER = {"worker/queue/arq_adapter.py", "worker/queue/_arq.py", "worker/queue/_waiting.py"}

#: Names ``arq.worker`` defines that a job function may use: raising ``Retry`` is arq's
#: documented way for a job to ask for another try, not a look inside the Worker.
JOB_API = {"Retry"}

#: Public names the Worker shares with things that are not it (any object's close/run/main;
#: a redis-py connection's health_check_interval, read by ``producer/_lean_io``; arq's client
#: and our settings are added below): ``settings.queue_name`` is no internal.
SHARED = {"__init__", "__repr__", "close", "run", "main", "burst", "ctx", "health_check_interval"}


def _worker_names() -> set[str]:
    """Every method and instance attribute of arq's Worker, read from arq's own source."""
    (cls,) = ast.parse(inspect.getsource(arq.worker.Worker)).body
    assert isinstance(cls, ast.ClassDef)
    names = {n.name for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    for node in ast.walk(cls):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
            and isinstance(node.ctx, ast.Store)
        ):
            names.add(node.attr)
    return names


def _internals() -> set[str]:
    """The Worker's names no other object we use carries: touching one means touching it."""
    from arq.connections import ArqRedis

    client = {*dir(ArqRedis), *inspect.signature(ArqRedis.__init__).parameters}
    # The settings the Worker is built from share names with it (``poll_delay_s``...).
    settings = typing.get_type_hints(create_worker)["settings"]
    others = client | set(settings.model_fields) | SHARED
    return _worker_names() - others


def _modules() -> list[Path]:
    return sorted([*(ROOT / "producer").rglob("*.py"), *(ROOT / "worker").rglob("*.py")])


def _violations(source: str, internals: set[str]) -> list[str]:
    """Where ``source`` imports arq's Worker module or reads or writes the Worker's state."""
    worker_module = {n for n in vars(arq.worker) if not n.startswith("_")} - JOB_API
    found: list[str] = []
    nodes = sorted(
        (n for n in ast.walk(ast.parse(source)) if hasattr(n, "lineno")),
        key=lambda n: (n.lineno, n.col_offset),
    )
    for node in nodes:
        where = f"line {node.lineno}:"
        if isinstance(node, ast.Import):
            found += [f"{where} imports {a.name}" for a in node.names if a.name == "arq.worker"]
        elif isinstance(node, ast.ImportFrom) and node.module == "arq.worker":
            found.append(f"{where} imports from arq.worker")
        elif isinstance(node, ast.ImportFrom) and node.module == "arq":
            names = [a.name for a in node.names if a.name in worker_module]
            found += [f"{where} imports arq.{name}" for name in names]
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in internals
            # Our own classes' private attributes (``self._pool`` of the client) are theirs.
            and not (node.attr.startswith("_") and _is_self(node.value))
        ):
            found.append(f"{where} touches .{node.attr}")
    return found


def _is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id in {"self", "cls"}


def test_the_worker_names_are_read_from_arq() -> None:
    """The list of arq's Worker internals holds the ones the adapter hides (a sanity check
    that reading arq's source still finds them)."""
    hidden = {"tasks", "main_task", "allow_pick_jobs", "in_progress_timeout_s", "handle_sig"}
    assert hidden | {"sem", "job_counter", "_poll_iteration", "_pool"} <= _internals()


def test_only_the_adapter_knows_arqs_worker() -> None:
    """No module of producer/ or worker/ outside the adapter imports arq's Worker (or its
    ``func``) or touches one of the Worker's attributes."""
    internals = _internals()
    outside = [p for p in _modules() if str(p.relative_to(ROOT)) not in ADAPTER]
    assert outside and all((ROOT / a).exists() for a in ADAPTER)
    found = {
        str(path.relative_to(ROOT)): _violations(path.read_text(), internals) for path in outside
    }
    assert {path: lines for path, lines in found.items() if lines} == {}


def test_the_check_sees_a_worker_touched() -> None:
    """The check catches each way past the adapter: imports, and state read or written."""
    sample = (
        "from arq.worker import Worker\n"
        "from arq import func, Retry\n"
        "import arq.worker\n"
        "runner.worker.allow_pick_jobs = False\n"
        "ids = list(w.tasks)\n"
        "w._poll_iteration()\n"
        "self._pool = None\n"  # a class's own private attribute: not the Worker's
        "settings.queue_name\n"
    )
    found = [v.split(": ", 1)[1] for v in _violations(sample, _internals())]
    assert found == [
        "imports from arq.worker",
        "imports arq.func",
        "imports arq.worker",
        "touches .allow_pick_jobs",
        "touches .tasks",
        "touches ._poll_iteration",
    ]


async def test_the_adapter_stops_in_stages(
    settings: Settings, small_model: Path, make_supervisor: Callable[..., Supervisor]
) -> None:
    """What the runner asks of arq, stage by stage: ``stop_picking`` leaves the running job
    running and takes no new one, ``wait_for_jobs`` keeps to its bound, ``stop_now`` ends
    ``run`` and the job (left queued), ``close`` leaves nothing held."""
    assert settings.redis_url
    redis = redis_client(settings.redis_url, settings.redis)
    async with make_supervisor("hang", settings) as sup, Client(settings=settings) as client:
        adapter = ArqAdapter(settings, sup, JobBook(redis, settings, sup.metrics))
        assert not adapter.alive and adapter.running_ids() == []
        run = asyncio.create_task(adapter.run())
        first = (await client.enqueue(LoadRequest(source=str(small_model)))).job_id
        await eventually(lambda: adapter.running_ids() == [first], 30, "the first job runs")
        assert adapter.alive

        adapter.stop_picking()
        other = shutil.copy(small_model, small_model.with_name("other.safetensors"))
        second = (await client.enqueue(LoadRequest(source=str(other)))).job_id
        assert second != first  # another request: not the running job, deduplicated
        await adapter.wait_for_jobs(0.5)  # the first job hangs: this ends on its bound
        assert adapter.running_ids() == [first]
        assert await client.job_state(second) is JobState.QUEUED

        adapter.stop_now()
        await asyncio.wait({run}, timeout=30)
        assert run.done() and run.exception() is None
        assert not adapter.alive
        await adapter.close()
        assert adapter.running_ids() == []
        assert await client.job_state(first) is JobState.QUEUED
    await redis.aclose()
