"""The ``loadwarden`` command line.

Exit status: 0 when the command did what it says and every load it reports is
``ok``; 1 when a load ended in any other outcome; 2 for a usage error (a missing
Redis URL included); 3 when no answer could be had (Redis unreachable, unknown job
id, wait timed out). Under ``--json`` stdout holds exactly one document, an error
included (``_cli_common._Commands``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from loadwarden.producer.client import Client
from loadwarden.producer.contract import (
    LoadReport,
    LoadRequest,
    ModelFormat,
)
from loadwarden.producer.errors import CatalogError, ClientError, ContractError, LoadError
from loadwarden.producer.preload import PreloadResult
from loadwarden.worker._files import resolved
from loadwarden.worker._text import clean
from loadwarden.worker.cli import _render
from loadwarden.worker.cli._common import (
    DEFAULT_WAIT_S,
    EXIT_OK,
    EXIT_OUTCOME,
    CpuOpt,
    JsonOpt,
    LeftoversOpt,
    LogOpt,
    MemoryOpt,
    RedisOpt,
    Sha256Opt,
    SignedByOpt,
    WaitOpt,
    app,
    catalog_defects,
    emit_report,
    labels_from,
    load_request,
    named_root,
    no_answer,
    note_embedded,
    notice,
    settings_from,
    with_roots,
)
from loadwarden.worker.cli._progress import Progress
from loadwarden.worker.config import Settings
from loadwarden.worker.ops.logs import configure_logging

if TYPE_CHECKING:
    from loadwarden.worker._files import OpenedModel


@app.command()
def worker(
    redis: RedisOpt = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Loads run at once (default 2).", min=1)
    ] = None,
    burst: Annotated[bool, typer.Option("--burst", help="Exit once the queue is empty.")] = False,
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
            metavar="DIR",
            help="A folder local sources may come from (repeatable). Default: "
            "LOADWARDEN_ALLOW_ROOTS (folders separated by ':'), else "
            "LOADWARDEN_SOURCES__ALLOW_ROOTS (a JSON list), else the working directory.",
        ),
    ] = None,
    log_level: LogOpt = "info",
) -> None:
    """Run a worker: pull load jobs from Redis and run each in a confined child."""
    from loadwarden.worker.queue.runner import run_worker

    settings = settings_from(redis, concurrency=concurrency, metrics_port=metrics_port)
    if allow_root:
        settings = with_roots(settings, *(resolved(root) for root in allow_root))
    if not settings.redis_url:
        raise typer.BadParameter(
            "a worker needs --redis or LOADWARDEN_REDIS_URL", param_hint="--redis"
        )
    configure_logging(log_level)
    from loadwarden.worker.sandbox.forkserver import SandboxError

    try:
        asyncio.run(run_worker(settings, burst=burst))
    except SandboxError as exc:  # a fail-closed setting (require_cgroups, require_landlock)
        typer.echo(f"error: {clean(exc.message)}", err=True)
        raise typer.Exit(2) from None


@app.command()
def enqueue(
    source: Annotated[str, typer.Argument(help="Model file path (made absolute) or URL.")],
    sha256: Sha256Opt = None,
    signed_by: SignedByOpt = None,
    label: Annotated[
        list[str] | None,
        typer.Option("--label", help="KEY=VALUE carried to the report (repeatable)."),
    ] = None,
    memory_bytes: MemoryOpt = None,
    cpu_s: CpuOpt = None,
    deadline_s: Annotated[
        float | None, typer.Option("--deadline-s", help="Wall-clock deadline override of the load.")
    ] = None,
    job_id: Annotated[
        str | None,
        typer.Option("--job-id", help="Name the job (one already queued under it is returned)."),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the report and print it.")] = False,
    timeout_s: WaitOpt = DEFAULT_WAIT_S,
    redis: RedisOpt = None,
    drop_leftovers: LeftoversOpt = False,
    as_json: JsonOpt = False,
    log_level: LogOpt = "warning",
) -> None:
    """Enqueue one load; print its job id, or with --wait its report.

    Limit overrides apply within the worker's ceilings (a report says override_clamped
    when one was above). With --wait and no Redis configured, it runs embedded (a private
    server and an in-process worker allowed to read the file's folder), like `preload`.
    """
    configure_logging(log_level)
    request = load_request(
        source,
        sha256,
        labels_from(label),
        signed_by,
        memory_bytes=memory_bytes,
        cpu_seconds=cpu_s,
        timeout_seconds=deadline_s,
    )
    settings = settings_from(redis)
    if not settings.redis_url and not wait:
        raise typer.BadParameter("without --wait, enqueue needs --redis or LOADWARDEN_REDIS_URL")

    limit = timeout_s or None

    async def go() -> LoadReport | str:
        if settings.redis_url:
            async with Client(settings=settings) as client:
                handle = await client.enqueue(request, job_id=job_id)
                return await handle.report(timeout_s=limit) if wait else handle.job_id
        from loadwarden.worker.queue.embedded import embedded

        roots = named_root(request.source)
        note_embedded(roots)
        async with (
            embedded(
                with_roots(settings, *roots), drop_leftovers=drop_leftovers, notice=notice
            ) as active,
            Client(settings=active) as client,
        ):
            handle = await client.enqueue(request, job_id=job_id)
            return await handle.report(timeout_s=limit)

    try:
        result = asyncio.run(go())
    except (ClientError, ContractError) as exc:
        raise no_answer(exc, as_json) from None
    if isinstance(result, LoadReport):
        emit_report(result, as_json)
    typer.echo(json.dumps({"job_id": result}) if as_json else result)


@app.command()
def load(
    file: Annotated[
        str,
        typer.Argument(
            help="Model file, checkpoint folder, *.safetensors.index.json, or hf://ORG/NAME[@REV]."
        ),
    ],
    sha256: Sha256Opt = None,
    signed_by: SignedByOpt = None,
    memory_bytes: MemoryOpt = None,
    deadline_s: Annotated[
        float | None,
        typer.Option("--deadline-s", "--timeout-s", help="Wall-clock deadline override."),
    ] = None,
    cpu_s: CpuOpt = None,
    as_json: JsonOpt = False,
    log_level: LogOpt = "warning",
) -> None:
    """Run one sandboxed load on this machine, no Redis, and print its report."""
    from loadwarden.worker.load.supervisor import Supervisor

    configure_logging(log_level)
    request = load_request(
        file,
        sha256,
        {},
        signed_by,
        memory_bytes=memory_bytes,
        cpu_seconds=cpu_s,
        timeout_seconds=deadline_s,
    )
    # The file was named on the command line: its own folder is the one allowed root
    # (an hf:// source reads only the Hugging Face cache).
    settings = with_roots(settings_from(), *named_root(request.source))

    async def go() -> LoadReport:
        async with Supervisor(settings) as supervisor:
            return await supervisor.load(request)

    emit_report(asyncio.run(go()), as_json)


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
    signed_by: SignedByOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a model file's header only: no loader runs, no child starts.

    The format is sniffed from the content (safetensors, npy, npz, GGUF); pickles,
    PyTorch and Keras/HDF5 files are refused: they can execute code when loaded.
    A signature (FILE.sig, or model.sig in a checkpoint's folder) is checked against the
    worker's trusted signers (signing.signers), hashing every file; where the worker's
    rules or --signed-by require one, a missing or bad one is the outcome.
    """
    from loadwarden.producer.contract import ErrorInfo
    from loadwarden.worker.load._model import inspect_opened
    from loadwarden.worker.load.signing import Trust, TrustError, signature_status
    from loadwarden.worker.sources import open_model

    request = load_request(file, None, {}, signed_by)
    source = request.source
    settings = with_roots(settings_from(), *named_root(source))
    try:
        trust = Trust(settings.signing) if settings.signing.signers else None
    except TrustError as exc:
        typer.echo(f"error: {clean(str(exc))}", err=True)
        raise typer.Exit(2) from None

    async def open_it() -> tuple[OpenedModel, dict[str, Any], LoadError | None]:
        opened = await open_model(
            source, expected_sha256=None, policy=settings.sources, caps=settings.inspection
        )
        try:
            status, refusal = await signature_status(opened, request, settings.signing, trust)
        except BaseException:
            opened.close()
            raise
        return opened, status, refusal

    signature: dict[str, Any] | None = None
    try:
        opened, signature, refusal = asyncio.run(open_it())
        with opened:
            if refusal is not None:
                raise refusal
            summary = inspect_opened(
                opened, declared=format_, caps=settings.inspection, budget_bytes=None
            ).capped(settings.report_max_tensors)
        document: dict[str, Any] = {
            "outcome": "ok",
            "error": None,
            "model": summary.model_dump(mode="json"),
            "signature": signature,
        }
    except LoadError as exc:
        document = {
            "outcome": str(exc.outcome),
            "error": ErrorInfo.from_error(exc).model_dump(mode="json"),
            "model": None,
            "signature": signature,
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
        raise catalog_defects(exc.message, exc.defects, as_json) from None
    settings = settings_from(redis, concurrency=concurrency)
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
                as_json=as_json,
            )
        )
    except (ClientError, ContractError) as exc:
        raise no_answer(exc, as_json) from None
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
    as_json: bool,
    drop_leftovers: bool = False,
    **options: Any,
) -> PreloadResult:
    from loadwarden.worker.queue.embedded import embedded

    async def run(active: Settings) -> PreloadResult:
        async with Client(settings=active) as client:
            with Progress(len(requests), as_json) as shown:
                return await client.preload(requests, on_progress=shown.update, **options)

    if settings.redis_url:
        return await run(settings)
    local = with_roots(settings, folder)
    note_embedded((folder,))
    async with embedded(
        local, state_dir=state_dir, drop_leftovers=drop_leftovers, notice=notice
    ) as active:
        return await run(active)


@app.command()
def calibrate(
    catalog: Annotated[Path, typer.Argument(help="Catalog file whose entries to measure.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write the catalog again with the recommended limits (it can replace it).",
        ),
    ] = None,
    as_json: JsonOpt = False,
    log_level: LogOpt = "warning",
) -> None:
    """Load each catalog entry once with generous limits and recommend limits that fit it.

    Runs here, one entry at a time, no Redis; the catalog's folder is the allowed root.
    """
    from loadwarden.producer.catalog import load_catalog
    from loadwarden.worker.cli import calibrate as calib

    configure_logging(log_level)
    try:
        parsed = load_catalog(catalog)
    except CatalogError as exc:
        raise catalog_defects(exc.message, exc.defects, as_json) from None
    settings = with_roots(settings_from(), resolved(catalog).parent)
    results = asyncio.run(calib.calibrate(parsed.requests(), settings))
    if output is not None:
        output.write_text(calib.to_toml(parsed, results), encoding="utf-8")
    if as_json:
        typer.echo(json.dumps([r.model_dump(mode="json") for r in results]))
    else:
        _render.calibration(results)
    ok = all(r.recommended is not None for r in results)
    raise typer.Exit(EXIT_OK if ok else EXIT_OUTCOME)


# The queue-side commands (report, show, status, cancel, dead, autoscale, exporter, serve)
# register on `app` after these, so --help lists the local ones first.
from loadwarden.worker.cli import _queue as _cli_queue  # noqa: E402, F401  isort: skip


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
