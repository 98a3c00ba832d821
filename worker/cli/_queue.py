"""The commands that look at the queue: report, show, status, cancel, dead letters, failing
models, autoscale, exporter, serve."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from loadwarden.producer.outcomes import Outcome
from loadwarden.worker._text import clean
from loadwarden.worker.cli._common import (
    DEFAULT_WAIT_S,
    EXIT_OK,
    EXIT_OUTCOME,
    EXIT_USAGE,
    JsonOpt,
    LogOpt,
    RedisOpt,
    WaitOpt,
    ask,
    emit_report,
    no_answer,
    queue_settings,
)

if TYPE_CHECKING:
    from pydantic import BaseModel


def report(
    job_id: Annotated[str, typer.Argument(help="The id printed by 'enqueue'.")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the report exists.")] = False,
    timeout_s: WaitOpt = DEFAULT_WAIT_S,
    redis: RedisOpt = None,
    as_json: JsonOpt = False,
    log_level: LogOpt = "warning",
) -> None:
    """Print a job's report with its labels and attempts (exit 3 if none yet, unless --wait)."""
    from loadwarden.worker.ops.logs import configure_logging

    configure_logging(log_level)
    found = ask(
        redis,
        as_json,
        lambda client: client.report(job_id, timeout_s=(timeout_s or None) if wait else 0),
    )
    emit_report(found, as_json)


def show(
    job_id: Annotated[str, typer.Argument(help="The job whose report to show.")],
    redis: RedisOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a job's report and a chart of its memory and CPU over time."""
    from loadwarden.worker.cli import _render

    found = ask(redis, as_json, lambda client: client.report(job_id, timeout_s=0))
    if as_json:
        typer.echo(found.model_dump_json())
    else:
        _render.report(found)
        _render.resource_chart(found)
    raise typer.Exit(EXIT_OK if found.outcome is Outcome.OK else EXIT_OUTCOME)


def status(redis: RedisOpt = None, as_json: JsonOpt = False) -> None:
    """Show ready, deferred and running jobs, dead letters, each live worker and its jobs now."""
    from loadwarden.worker.cli import _render

    queue = ask(redis, as_json, lambda client: client.status())
    if as_json:
        typer.echo(queue.model_dump_json())
    else:
        _render.queue_status(queue)


def cancel(
    job_id: Annotated[str, typer.Argument(help="The job to cancel.")],
    redis: RedisOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a job: a queued one never loads; a running one has its child killed at once.

    Prints the state the job was in when the cancel was sent (queued, deferred or
    running: it then ends 'cancelled'), or that it had already finished.
    """
    state = str(ask(redis, as_json, lambda client: client.cancel(job_id)))
    sent = state != "complete"
    if as_json:
        typer.echo(json.dumps({"job_id": job_id, "state": state, "cancel_sent": sent}))
    elif sent:
        typer.echo(f"{clean(job_id)}: cancel sent while it was {state}; it ends cancelled")
    else:
        typer.echo(f"{clean(job_id)}: already finished, nothing to cancel")


M = TypeVar("M", bound="BaseModel")


def _emit_list(items: list[M], as_json: bool, render: Callable[[Sequence[M]], None]) -> None:
    """A listing: one JSON array with --json, else the table."""
    if as_json:
        typer.echo(json.dumps([item.model_dump(mode="json") for item in items]))
    else:
        render(items)


dead_app = typer.Typer(
    help="Jobs that failed for good: list, retry or purge them.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

DeadIds = Annotated[
    list[str] | None,
    typer.Argument(help="Dead-letter ids (from 'dead list') or the job ids of dead letters."),
]


@dead_app.command("list")
def dead_list(
    count: Annotated[int, typer.Option(help="How many, newest first.", min=1)] = 100,
    redis: RedisOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List dead letters: the final reports of jobs that failed for good (ids in full)."""
    from loadwarden.worker.cli import _render

    letters = ask(redis, as_json, lambda client: client.dead_letters(count))
    _emit_list(letters, as_json, _render.dead_letters)


@dead_app.command("retry")
def dead_retry(
    ids: DeadIds = None,
    all_: Annotated[bool, typer.Option("--all", help="Retry every dead letter.")] = False,
    redis: RedisOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Enqueue dead-lettered jobs again (as new jobs) and remove them from the dead letters."""
    if not ids and not all_:
        raise typer.BadParameter("name dead-letter ids (or job ids), or --all")
    handles = ask(redis, as_json, lambda client: client.retry_dead(None if all_ else ids))
    job_ids = [h.job_id for h in handles]
    typer.echo(
        json.dumps({"job_ids": job_ids}) if as_json else "\n".join(job_ids) or "nothing to retry"
    )


@dead_app.command("purge")
def dead_purge(
    ids: DeadIds = None,
    outcome: Annotated[
        Outcome | None, typer.Option(help="Only dead letters that ended with this outcome.")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    redis: RedisOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove dead letters: those named, or with --outcome, or all of them; asks first."""
    which = (
        f"{len(ids)} named dead letter(s)"
        if ids
        else f"every '{outcome}' dead letter"
        if outcome
        else "every dead letter"
    )
    if not yes:
        if not sys.stdin.isatty():
            raise typer.BadParameter(
                f"this removes {which}; pass it to confirm", param_hint="--yes"
            )
        typer.confirm(f"Remove {which}?", abort=True, err=True)
    removed = ask(
        redis,
        as_json,
        lambda client: client.purge_dead(ids or None, outcome=str(outcome) if outcome else None),
    )
    typer.echo(json.dumps({"removed": removed}) if as_json else f"removed {removed} dead letter(s)")


failures_app = typer.Typer(
    help="Models the failure memory refuses as repeatedly failing: list or clear them.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@failures_app.command("list")
def failures_list(redis: RedisOpt = None, as_json: JsonOpt = False) -> None:
    """List the models with remembered failures (refused ones first), identities in full."""
    from loadwarden.worker.cli import _render

    models = ask(redis, as_json, lambda client: client.failing_models())
    _emit_list(models, as_json, _render.failing_models)


@failures_app.command("clear")
def failures_clear(
    identities: Annotated[
        list[str] | None,
        typer.Argument(help="Model identities, as 'failures list' prints them."),
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Forget every failing model.")] = False,
    redis: RedisOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Forget models' failures, so that their next load runs (a fixed disk, a larger node)."""
    if bool(identities) == all_:
        raise typer.BadParameter("name model identities (from 'failures list'), or --all")
    cleared = ask(redis, as_json, lambda client: client.clear_failing(None if all_ else identities))
    typer.echo(
        json.dumps({"cleared": cleared}) if as_json else f"cleared {cleared} failing model(s)"
    )


def autoscale(redis: RedisOpt = None, as_json: JsonOpt = False) -> None:
    """The number of workers the current backlog calls for, and why.

    desired = clamp(ceil((ready + running) / (service rate per worker x target drain s)),
    min, max); the service rate is measured from the last hour's jobs, counting all the
    time a worker held each (inspection, waiting, loading, bookkeeping).
    """
    import asyncio

    from redis.exceptions import RedisError

    from loadwarden.producer.connection import redis_client
    from loadwarden.producer.counts import queue_counts
    from loadwarden.producer.errors import RedisUnavailable
    from loadwarden.worker.ops.autoscale_inputs import decide_from_counts

    settings = queue_settings(redis, "autoscale")

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
        raise no_answer(
            RedisUnavailable(f"cannot reach Redis at {settings.redis_url}: {exc}"), as_json
        ) from None
    typer.echo(
        json.dumps(document)
        if as_json
        else f"desired workers: {document['desired']}\n{document['reason']}"
    )


#: The exporter's port when neither --port nor LOADWARDEN_METRICS_PORT says (the worker: 9400).
EXPORTER_PORT = 9401


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
    import asyncio

    from loadwarden.worker.ops.exporter import run_exporter
    from loadwarden.worker.ops.logs import configure_logging

    settings = queue_settings(redis, "the exporter")
    configure_logging(log_level)
    # The image's HEALTHCHECK probes LOADWARDEN_METRICS_PORT: the exporter listens there too.
    asyncio.run(run_exporter(settings, port or settings.metrics_port or EXPORTER_PORT))


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
    from loadwarden.worker.ops.logs import configure_logging
    from loadwarden.worker.serve.config import load_token, refuse_open_bind
    from loadwarden.worker.serve.run import run_server

    settings = queue_settings(redis, "serve")
    try:  # before logging is set up: a refusal binds nothing and configures nothing
        token = load_token(token_file)
        refuse_open_bind(host, token)
    except ValueError as exc:
        typer.echo(f"loadwarden serve: {clean(str(exc))}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    configure_logging(log_level)
    run_server(settings, host=host, port=port, token=token, log_level=log_level)
