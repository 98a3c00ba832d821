"""The ``loadwarden`` command line.

Exit status: 0 when the command did what it says and every load it reports is
``ok``; 1 when a load ended in any other outcome; 2 for a usage error; 3 when
no answer could be had (Redis unreachable, unknown job id, wait timed out).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from redis.exceptions import RedisError

from loadwarden.producer.client import Client
from loadwarden.producer.contract import (
    LimitOverrides,
    LoadReport,
    LoadRequest,
    ModelFormat,
    Outcome,
)
from loadwarden.producer.errors import (
    CatalogError,
    ClientError,
    ContractError,
    LoadError,
    RedisUnavailable,
)
from loadwarden.producer.preload import PreloadEntry, PreloadResult
from loadwarden.producer.settings import Settings
from loadwarden.worker import _render
from loadwarden.worker._files import resolved
from loadwarden.worker.logs import configure_logging

if TYPE_CHECKING:
    from loadwarden.worker._files import OpenedModel

EXIT_OK, EXIT_OUTCOME, EXIT_USAGE, EXIT_NO_ANSWER = 0, 1, 2, 3
#: How long `enqueue --wait` and `report --wait` wait unless told (--timeout-s; 0: no limit):
#: ten minutes is the derived deadline of a 30 GB model at the slowest acceptable bandwidth,
#: and a wait that nothing will ever answer (no worker) ends with a message, not silence.
DEFAULT_WAIT_S = 600.0
T = TypeVar("T")

app = typer.Typer(
    name="loadwarden",
    help="Load ML model files in sandboxed, resource-limited child processes, from a Redis queue "
    "or right here.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RedisOpt = Annotated[
    str | None,
    typer.Option(
        "--redis", envvar="LOADWARDEN_REDIS_URL", help="Redis URL, e.g. redis://127.0.0.1:6379/0."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")]
LogOpt = Annotated[
    str, typer.Option("--log-level", help="debug, info, warning or error (logs go to stderr).")
]
WaitOpt = Annotated[
    float,
    typer.Option(
        "--timeout-s",
        min=0,
        help=f"With --wait: give up after this many seconds (0: wait as long as it takes; "
        f"default {DEFAULT_WAIT_S:g}).",
    ),
]
LeftoversOpt = Annotated[
    bool,
    typer.Option(
        "--drop-leftovers",
        help="Embedded mode: drop, unrun, the jobs an earlier run left queued in the state "
        "folder (by default they are named and run first).",
    ),
]
Sha256Opt = Annotated[
    str | None,
    typer.Option("--sha256", help="Expected sha256 of the file; a mismatch is 'invalid'."),
]


def _settings(redis: str | None = None, **overrides: Any) -> Settings:
    values = {k: v for k, v in overrides.items() if v is not None}
    if redis:
        values["redis_url"] = redis
    try:
        return Settings(**values)
    except Exception as exc:  # pydantic's ValidationError or a bad environment variable
        raise typer.BadParameter(str(exc)) from None


def _with_roots(settings: Settings, *roots: Path) -> Settings:
    """Settings whose local sources may come only from ``roots``."""
    policy = settings.sources.model_copy(update={"allow_roots": tuple(roots)})
    return settings.model_copy(update={"sources": policy})


def _note_embedded(roots: tuple[Path, ...]) -> None:
    where = ", ".join(str(r) for r in roots) or "no local folder"
    typer.echo(
        f"loadwarden: no Redis configured (--redis / LOADWARDEN_REDIS_URL); running embedded: "
        f"private server + in-process worker reading {where}",
        err=True,
    )


def _notice(text: str) -> None:
    typer.echo(f"loadwarden: {text}", err=True)


def _source(value: str) -> str:
    """Local paths are made absolute here: a worker resolves relative ones against its own cwd."""
    return value if "://" in value else os.path.abspath(value)


def _named_root(source: str) -> tuple[Path, ...]:
    """The allowed root of a source named on this command line: the folder holding it
    (a checkpoint folder's parent), or none for a URL or hf:// (the hub cache is its own)."""
    return () if "://" in source else (resolved(source).parent,)


def _emit_report(report: LoadReport, as_json: bool) -> None:
    if as_json:
        typer.echo(report.model_dump_json())
    else:
        _render.report(report)
    raise typer.Exit(EXIT_OK if report.outcome is Outcome.OK else EXIT_OUTCOME)


def _ask(redis: str | None, as_json: bool, query: Callable[[Client], Awaitable[T]]) -> T:
    """Run one query with a client; a failure to get an answer exits 3 with a clear message."""

    async def go() -> T:
        async with Client(settings=_settings(redis)) as client:
            return await query(client)

    try:
        return asyncio.run(go())
    except (ClientError, ContractError) as exc:
        raise _no_answer(exc, as_json) from None


def _no_answer(exc: Exception, as_json: bool) -> typer.Exit:
    if as_json:
        typer.echo(json.dumps({"error": {"type": type(exc).__name__, "message": str(exc)}}))
    else:
        typer.echo(f"loadwarden: {exc}", err=True)
    return typer.Exit(EXIT_NO_ANSWER)


@app.command()
def worker(
    redis: RedisOpt = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Loads run at once (default 2).", min=1)
    ] = None,
    burst: Annotated[bool, typer.Option(help="Exit once the queue is empty.")] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Serve /metrics, /livez and /readyz on this port (LOADWARDEN_METRICS_PORT)."
        ),
    ] = None,
    allow_root: Annotated[
        list[Path] | None,
        typer.Option(
            "--allow-root",
            envvar="LOADWARDEN_ALLOW_ROOTS",
            help="A folder local sources may come from (repeatable; or LOADWARDEN_ALLOW_ROOTS, "
            "folders separated by ':'; default: LOADWARDEN_SOURCES__ALLOW_ROOTS, else the "
            "working directory).",
        ),
    ] = None,
    log_level: LogOpt = "info",
) -> None:
    """Run a worker: pull load jobs from Redis and run each in a confined child."""
    from loadwarden.worker.app import run_worker

    settings = _settings(redis, concurrency=concurrency, metrics_port=metrics_port)
    if allow_root:
        settings = _with_roots(settings, *(resolved(root) for root in allow_root))
    if not settings.redis_url:
        raise typer.BadParameter(
            "a worker needs --redis or LOADWARDEN_REDIS_URL", param_hint="--redis"
        )
    configure_logging(log_level)
    from loadwarden.worker.sandbox.forkserver import SandboxError

    try:
        asyncio.run(run_worker(settings, burst=burst))
    except SandboxError as exc:  # a fail-closed setting (require_cgroups, require_landlock)
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None


@app.command()
def enqueue(
    source: Annotated[str, typer.Argument(help="Model file path (made absolute) or URL.")],
    sha256: Sha256Opt = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the report and print it.")] = False,
    timeout_s: WaitOpt = DEFAULT_WAIT_S,
    redis: RedisOpt = None,
    drop_leftovers: LeftoversOpt = False,
    as_json: JsonOpt = False,
    log_level: LogOpt = "warning",
) -> None:
    """Enqueue one load; print its job id, or with --wait its report.

    With --wait and no Redis configured, it runs embedded (a private server and an
    in-process worker allowed to read the file's folder), like `preload`.
    """
    configure_logging(log_level)
    try:
        request = LoadRequest(source=_source(source), sha256=sha256)
    except Exception as exc:
        raise typer.BadParameter(str(exc)) from None
    settings = _settings(redis)
    if not settings.redis_url and not wait:
        raise typer.BadParameter("without --wait, enqueue needs --redis or LOADWARDEN_REDIS_URL")

    limit = timeout_s or None

    async def go() -> LoadReport | str:
        if settings.redis_url:
            async with Client(settings=settings) as client:
                handle = await client.enqueue(request)
                return await handle.report(timeout_s=limit) if wait else handle.job_id
        from loadwarden.worker.embedded import embedded

        roots = _named_root(request.source)
        _note_embedded(roots)
        async with (
            embedded(
                _with_roots(settings, *roots), drop_leftovers=drop_leftovers, notice=_notice
            ) as active,
            Client(settings=active) as client,
        ):
            return await (await client.enqueue(request)).report(timeout_s=limit)

    try:
        result = asyncio.run(go())
    except (ClientError, ContractError) as exc:
        raise _no_answer(exc, as_json) from None
    if isinstance(result, LoadReport):
        _emit_report(result, as_json)
    typer.echo(json.dumps({"job_id": result}) if as_json else result)


@app.command()
def report(
    job_id: Annotated[str, typer.Argument(help="The id printed by 'enqueue'.")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the report exists.")] = False,
    timeout_s: WaitOpt = DEFAULT_WAIT_S,
    redis: RedisOpt = None,
    as_json: JsonOpt = False,
    log_level: LogOpt = "warning",
) -> None:
    """Print a job's report (exit 3 if it has none yet, unless --wait)."""
    configure_logging(log_level)

    found = _ask(
        redis,
        as_json,
        lambda client: client.report(job_id, timeout_s=(timeout_s or None) if wait else 0),
    )
    _emit_report(found, as_json)


@app.command()
def load(
    file: Annotated[
        str,
        typer.Argument(
            help="Model file, checkpoint folder, *.safetensors.index.json, or hf://ORG/NAME[@REV]."
        ),
    ],
    sha256: Sha256Opt = None,
    memory_bytes: Annotated[int | None, typer.Option(help="Memory limit override.", min=1)] = None,
    timeout_s: Annotated[float | None, typer.Option(help="Wall-clock deadline override.")] = None,
    cpu_s: Annotated[float | None, typer.Option(help="CPU-time limit override.")] = None,
    as_json: JsonOpt = False,
    log_level: LogOpt = "warning",
) -> None:
    """Run one sandboxed load on this machine, no Redis, and print its report."""
    from loadwarden.worker.supervisor import Supervisor

    configure_logging(log_level)
    try:
        request = LoadRequest(
            source=_source(file),
            sha256=sha256,
            limits=LimitOverrides(
                memory_bytes=memory_bytes, cpu_seconds=cpu_s, timeout_seconds=timeout_s
            ),
        )
    except Exception as exc:
        raise typer.BadParameter(str(exc)) from None

    # The file was named on the command line: its own folder is the one allowed root
    # (an hf:// source reads only the Hugging Face cache).
    settings = _with_roots(_settings(), *_named_root(request.source))

    async def go() -> LoadReport:
        async with Supervisor(settings) as supervisor:
            return await supervisor.load(request)

    _emit_report(asyncio.run(go()), as_json)


@app.command()
def inspect(
    file: Annotated[
        str,
        typer.Argument(
            help="Model file, checkpoint folder, *.safetensors.index.json, or hf://ORG/NAME[@REV]."
        ),
    ],
    format_: Annotated[
        ModelFormat | None,
        typer.Option("--format", help="Expected format; refused if the content says otherwise."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a model file's header only: no loader runs, no child starts.

    The format is sniffed from the content (safetensors, npy, npz, GGUF); pickles,
    PyTorch and Keras/HDF5 files are refused: they can execute code when loaded.
    """
    from loadwarden.producer.contract import ErrorInfo
    from loadwarden.worker._model import inspect_opened
    from loadwarden.worker.sources import open_model

    source = _source(file)
    settings = _with_roots(_settings(), *_named_root(source))

    async def open_it() -> OpenedModel:
        return await open_model(
            source, expected_sha256=None, policy=settings.sources, caps=settings.inspection
        )

    try:
        with asyncio.run(open_it()) as opened:
            summary = inspect_opened(
                opened, declared=format_, caps=settings.inspection, budget_bytes=None
            )
        document: dict[str, Any] = {
            "outcome": "ok",
            "error": None,
            "model": summary.model_dump(mode="json"),
        }
    except LoadError as exc:
        document = {
            "outcome": str(exc.outcome),
            "error": ErrorInfo.from_error(exc).model_dump(mode="json"),
            "model": None,
        }
    if as_json:
        typer.echo(json.dumps(document))
    else:
        _render.inspection(document)
    raise typer.Exit(EXIT_OK if document["outcome"] == "ok" else EXIT_OUTCOME)


@app.command()
def preload(
    catalog: Annotated[Path, typer.Argument(help="Catalog file (TOML, one [[model]] table each).")],
    redis: RedisOpt = None,
    json_report: Annotated[
        Path | None, typer.Option("--json-report", help="Write every report and the totals here.")
    ] = None,
    concurrency: Annotated[
        int,
        typer.Option(help="Jobs this batch keeps queued at once (embedded: loads at once).", min=1),
    ] = 2,
    timeout_s: Annotated[
        float | None, typer.Option(help="Give up on the whole batch after this.")
    ] = None,
    fail_fast: Annotated[
        bool, typer.Option("--fail-fast", help="Stop at the first failure.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Load again even if reports are stored.")
    ] = False,
    state_dir: Annotated[
        Path | None, typer.Option(help="Embedded mode: where the private server keeps its data.")
    ] = None,
    drop_leftovers: LeftoversOpt = False,
    as_json: JsonOpt = False,
    log_level: LogOpt = "warning",
) -> None:
    """Load a whole catalog: progress, a summary table, exit 0 only if every entry is ok.

    With no --redis and no LOADWARDEN_REDIS_URL it starts a private Valkey and an
    in-process worker (allowed to read the catalog's folder), and stops both after.
    """
    from loadwarden.producer.catalog import load_catalog

    configure_logging(log_level)
    try:
        requests = load_catalog(catalog).requests()
    except CatalogError as exc:
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "error": {
                            "type": "CatalogError",
                            "message": exc.message,
                            "defects": exc.defects,
                        }
                    }
                )
            )
        else:
            typer.echo(f"loadwarden: {exc.message}", err=True)
            for defect in exc.defects:
                typer.echo(f"  - {defect}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    settings = _settings(redis, concurrency=concurrency)
    try:
        result = asyncio.run(
            _preload(
                settings,
                requests,
                resolved(catalog).parent,
                state_dir,
                drop_leftovers=drop_leftovers,
                concurrency=concurrency,
                timeout_s=timeout_s,
                fail_fast=fail_fast,
                force=force,
                live=not as_json,
            )
        )
    except (ClientError, ContractError) as exc:
        raise _no_answer(exc, as_json) from None
    document = result.model_dump_json(indent=2)
    if json_report is not None:
        json_report.write_text(document + "\n")
    if as_json:
        typer.echo(result.model_dump_json())
    else:
        _render.preload_summary(result)
    raise typer.Exit(EXIT_OK if result.ok else EXIT_OUTCOME)


async def _preload(
    settings: Settings,
    requests: list[tuple[str, LoadRequest]],
    folder: Path,
    state_dir: Path | None,
    *,
    live: bool,
    drop_leftovers: bool = False,
    **options: Any,
) -> PreloadResult:
    from rich.live import Live

    from loadwarden.worker.embedded import embedded

    async def run(active: Settings) -> PreloadResult:
        async with Client(settings=active) as client:
            if not live:
                return await client.preload(requests, **options)
            view: dict[int, PreloadEntry] = {}  # every entry, in catalog order, by identity
            with Live(console=_render.console, transient=True, auto_refresh=False) as display:

                def progress(entry: PreloadEntry) -> None:
                    view.setdefault(id(entry), entry)
                    display.update(_render.preload_progress(list(view.values())), refresh=True)

                return await client.preload(requests, on_progress=progress, **options)

    if settings.redis_url:
        return await run(settings)
    local = _with_roots(settings, folder)
    _note_embedded((folder,))
    async with embedded(
        local, state_dir=state_dir, drop_leftovers=drop_leftovers, notice=_notice
    ) as active:
        return await run(active)


@app.command()
def calibrate(
    catalog: Annotated[Path, typer.Argument(help="Catalog file whose entries to measure.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the recommended limits as TOML.")
    ] = None,
    as_json: JsonOpt = False,
    log_level: LogOpt = "warning",
) -> None:
    """Load each catalog entry once with generous limits and recommend limits that fit it.

    Runs here, one entry at a time, no Redis; the catalog's folder is the allowed root.
    """
    from loadwarden.producer.catalog import load_catalog
    from loadwarden.worker import calibrate as calib

    configure_logging(log_level)
    try:
        requests = load_catalog(catalog).requests()
    except CatalogError as exc:
        typer.echo(f"loadwarden: {exc.message}", err=True)
        for defect in exc.defects:
            typer.echo(f"  - {defect}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    settings = _with_roots(_settings(), resolved(catalog).parent)
    results = asyncio.run(calib.calibrate(requests, settings))
    if output is not None:
        output.write_text(calib.to_toml(results))
    if as_json:
        typer.echo(json.dumps([r.model_dump(mode="json") for r in results]))
    else:
        _render.calibration(results)
    ok = all(r.recommended is not None for r in results)
    raise typer.Exit(EXIT_OK if ok else EXIT_OUTCOME)


@app.command()
def show(
    job_id: Annotated[str, typer.Argument(help="The job whose report to show.")],
    redis: RedisOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a job's report and a chart of its memory and CPU over time."""
    found = _ask(redis, as_json, lambda client: client.report(job_id, timeout_s=0))
    if as_json:
        typer.echo(found.model_dump_json())
    else:
        _render.report(found)
        _render.resource_chart(found)
    raise typer.Exit(EXIT_OK if found.outcome is Outcome.OK else EXIT_OUTCOME)


@app.command()
def status(redis: RedisOpt = None, as_json: JsonOpt = False) -> None:
    """Show ready, deferred and running jobs, dead letters, and each live worker."""
    queue = _ask(redis, as_json, lambda client: client.status())
    if as_json:
        typer.echo(queue.model_dump_json())
    else:
        _render.queue_status(queue)


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(help="The job to cancel.")],
    redis: RedisOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a job: a queued one never loads; a running one has its child killed at once."""

    state = str(_ask(redis, as_json, lambda client: client.cancel(job_id)))
    note = "already finished" if state == "complete" else f"cancel sent (it was {state})"
    typer.echo(json.dumps({"job_id": job_id, "state": state}) if as_json else f"{job_id}: {note}")


dead_app = typer.Typer(
    help="Jobs that failed for good: list, retry or purge them.", no_args_is_help=True
)
app.add_typer(dead_app, name="dead")


@dead_app.command("list")
def dead_list(
    count: Annotated[int, typer.Option(help="How many, newest first.", min=1)] = 100,
    redis: RedisOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List dead letters: the final reports of jobs that failed for good."""

    letters = _ask(redis, as_json, lambda client: client.dead_letters(count))
    if as_json:
        typer.echo(json.dumps([letter.model_dump(mode="json") for letter in letters]))
    else:
        _render.dead_letters(letters)


@dead_app.command("retry")
def dead_retry(
    ids: Annotated[
        list[str] | None, typer.Argument(help="Dead-letter ids (from 'dead list').")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Retry every dead letter.")] = False,
    redis: RedisOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Enqueue dead-lettered jobs again (as new jobs) and remove them from the dead letters."""
    if not ids and not all_:
        raise typer.BadParameter("name dead-letter ids, or --all")

    handles = _ask(redis, as_json, lambda client: client.retry_dead(None if all_ else ids))
    job_ids = [h.job_id for h in handles]
    typer.echo(
        json.dumps({"job_ids": job_ids}) if as_json else "\n".join(job_ids) or "nothing to retry"
    )


@dead_app.command("purge")
def dead_purge(redis: RedisOpt = None, as_json: JsonOpt = False) -> None:
    """Remove every dead letter."""

    removed = _ask(redis, as_json, lambda client: client.purge_dead())
    typer.echo(json.dumps({"removed": removed}) if as_json else f"removed {removed} dead letter(s)")


@app.command()
def autoscale(redis: RedisOpt = None, as_json: JsonOpt = False) -> None:
    """The number of workers the current backlog calls for, and why.

    desired = clamp(ceil((ready + running) / (service rate per worker x target drain s)),
    min, max); the service rate is measured from the last hour's loads (see README).
    """
    from loadwarden.producer.connection import redis_client
    from loadwarden.producer.counts import queue_counts
    from loadwarden.worker.autoscale_inputs import decide_from_counts

    settings = _settings(redis)
    if not settings.redis_url:
        raise typer.BadParameter(
            "autoscale needs --redis or LOADWARDEN_REDIS_URL", param_hint="--redis"
        )

    async def go() -> dict[str, Any]:
        client = redis_client(settings.redis_url or "", settings.redis)
        try:
            counts = await queue_counts(client, settings.queue_name)
        finally:
            await client.aclose()
        return {**decide_from_counts(counts, settings).as_dict(), "counts": counts}

    try:
        document = asyncio.run(go())
    except (RedisError, OSError) as exc:
        raise _no_answer(
            RedisUnavailable(f"cannot reach Redis at {settings.redis_url}: {exc}"), as_json
        ) from None
    typer.echo(
        json.dumps(document)
        if as_json
        else f"desired workers: {document['desired']}\n{document['reason']}"
    )


#: The exporter's port when neither --port nor LOADWARDEN_METRICS_PORT says (the worker: 9400).
EXPORTER_PORT = 9401


@app.command()
def exporter(
    redis: RedisOpt = None,
    port: Annotated[
        int | None,
        typer.Option(
            help="Serve /metrics, /livez and /readyz here "
            "(default: LOADWARDEN_METRICS_PORT, else 9401)."
        ),
    ] = None,
    log_level: LogOpt = "info",
) -> None:
    """Export the queue's gauges for Prometheus and autoscalers (runs with zero workers too)."""
    from loadwarden.worker.exporter import run_exporter

    settings = _settings(redis)
    if not settings.redis_url:
        raise typer.BadParameter(
            "the exporter needs --redis or LOADWARDEN_REDIS_URL", param_hint="--redis"
        )
    configure_logging(log_level)
    # The image's HEALTHCHECK probes LOADWARDEN_METRICS_PORT: the exporter listens there too.
    asyncio.run(run_exporter(settings, port or settings.metrics_port or EXPORTER_PORT))


@app.command()
def serve(
    redis: RedisOpt = None,
    host: Annotated[str, typer.Option(help="Listen here (loopback unless a token is set).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Listen on this port (0: any free one).")] = 8080,
    token_file: Annotated[
        Path | None,
        typer.Option("--token-file", help="Read the API token here (else LOADWARDEN_API_TOKEN)."),
    ] = None,
    log_level: LogOpt = "info",
) -> None:
    """Serve the HTTP API (/v1) and the web console (/) for this queue."""
    from loadwarden.worker.serve.config import load_token, refuse_open_bind
    from loadwarden.worker.serve.run import run_server

    settings = _settings(redis)
    if not settings.redis_url:
        raise typer.BadParameter(
            "serve needs --redis or LOADWARDEN_REDIS_URL", param_hint="--redis"
        )
    try:  # before logging is set up: a refusal binds nothing and configures nothing
        token = load_token(token_file)
        refuse_open_bind(host, token)
    except ValueError as exc:
        typer.echo(f"loadwarden serve: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    configure_logging(log_level)
    run_server(settings, host=host, port=port, token=token, log_level=log_level)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
