"""The commands that run load jobs through a queue: worker, enqueue and preload.

With no Redis configured, ``enqueue --wait`` and ``preload`` run embedded: a private
server and an in-process worker allowed to read the named file's (or catalog's) folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from loadwarden.worker._text import clean
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

if TYPE_CHECKING:
    from loadwarden.producer.contract import LoadReport, LoadRequest
    from loadwarden.producer.preload import PreloadResult
    from loadwarden.worker.config import Settings


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
    import asyncio

    from loadwarden.worker._files import resolved
    from loadwarden.worker.ops.logs import configure_logging
    from loadwarden.worker.queue.runner import run_worker
    from loadwarden.worker.sandbox.children import SandboxError

    settings = settings_from(redis, concurrency=concurrency, metrics_port=metrics_port)
    if allow_root:
        settings = with_roots(settings, *(resolved(root) for root in allow_root))
    if not settings.redis_url:
        raise typer.BadParameter(
            "a worker needs --redis or LOADWARDEN_REDIS_URL", param_hint="--redis"
        )
    configure_logging(log_level)
    try:
        asyncio.run(run_worker(settings, burst=burst))
    except SandboxError as exc:  # a fail-closed setting (require_cgroups, require_landlock)
        typer.echo(f"error: {clean(exc.message)}", err=True)
        raise typer.Exit(2) from None


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
    import asyncio

    from loadwarden.producer.client import Client
    from loadwarden.producer.contract import LoadReport
    from loadwarden.producer.errors import ClientError, ContractError
    from loadwarden.worker.ops.logs import configure_logging

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
    import asyncio

    from loadwarden.producer.catalog import load_catalog
    from loadwarden.producer.errors import CatalogError, ClientError, ContractError
    from loadwarden.worker._files import resolved
    from loadwarden.worker.cli import _render
    from loadwarden.worker.ops.logs import configure_logging

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
    from loadwarden.producer.client import Client
    from loadwarden.worker.cli._progress import Progress
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
