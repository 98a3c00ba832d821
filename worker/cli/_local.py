"""The commands that run here, with no Redis: load, inspect and calibrate.

The named file's (or catalog's) own folder is the one allowed root; an hf:// source
reads only the Hugging Face cache.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from loadwarden.producer.outcomes import ModelFormat
from loadwarden.worker._text import clean
from loadwarden.worker.cli._common import (
    EXIT_OK,
    EXIT_OUTCOME,
    CpuOpt,
    JsonOpt,
    LogOpt,
    MemoryOpt,
    Sha256Opt,
    SignedByOpt,
    catalog_defects,
    emit_report,
    load_request,
    local_policies,
    named_root,
    settings_from,
    with_roots,
)
from loadwarden.worker.cli.entry import release_collector

if TYPE_CHECKING:
    from loadwarden.producer.contract import LoadReport, LoadRequest
    from loadwarden.producer.errors import LoadError
    from loadwarden.worker._files import OpenedModel
    from loadwarden.worker.config import InspectionCaps, Settings, SourcePolicy

T = TypeVar("T")

FileArg = Annotated[
    str,
    typer.Argument(
        help="Model file, checkpoint folder, *.safetensors.index.json, or hf://ORG/NAME[@REV]."
    ),
]


def load(
    file: FileArg,
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
    import asyncio

    from loadwarden.worker.ops.logs import configure_logging

    # Logging first: the fork server, launched ahead (_ahead), logs when it is ready, and
    # structlog unconfigured would print that to stdout (which --json keeps for the result).
    configure_logging(log_level)

    def prepared() -> tuple[LoadRequest, Settings]:
        request = load_request(
            file,
            sha256,
            {},
            signed_by,
            memory_bytes=memory_bytes,
            cpu_seconds=cpu_s,
            timeout_seconds=deadline_s,
        )
        return request, with_roots(settings_from(), *named_root(request.source))

    # The renderer (rich) is imported while the load child works (``_ahead.importing``).
    warm = () if as_json else ("loadwarden.worker.cli._render",)
    emit_report(asyncio.run(_load_here(prepared, warm)), as_json)


async def _load_here(
    prepared: Callable[[], tuple[LoadRequest, Settings]], warm: tuple[str, ...] = ()
) -> LoadReport:
    """One load through a supervisor of its own, whose fork server starts first.

    The fork server is a fresh interpreter that imports numpy and the loaders: launched
    before this process checks the request (which imports pydantic and builds the
    contract), sets up its settings and imports the supervisor's stack, the two start on
    two cores at once instead of one after the other. The console script launches it
    before even importing the command line (``_ahead``); run otherwise, it is launched
    here. It is the same fork server, checked the same way (``Supervisor.start`` refuses
    what it would refuse); a bad request or setting is the same usage error, after the
    fork server is stopped. Where a fork server started first would cost the loads their
    cgroups (cgroup v2: ``_ahead.starts_first``), ``Supervisor.start`` starts it, after.
    """
    import asyncio

    from loadwarden.worker.cli import _ahead
    from loadwarden.worker.sandbox.forkserver import ForkServer

    # One load: no child forked ahead after it (``ready=0``), which close() would only kill;
    # the one the console script requested at launch (``_ahead``) is its child.
    launched = _ahead.take()
    forkserver = ForkServer(ready=0, launched=launched)
    first = launched is not None or _ahead.starts_first()
    starting = asyncio.create_task(forkserver.start() if first else asyncio.sleep(0))
    try:
        # One step of the loop: the task runs until it waits for the READY packet, so the
        # process is launched. Only the overlap depends on it, never a check.
        await asyncio.sleep(0)
        request, settings = prepared()
        from loadwarden.worker.load.supervisor import Supervisor
        from loadwarden.worker.ops.metrics import Unrecorded

        # No metrics: nothing serves them here, and prometheus_client is not imported.
        supervisor = Supervisor(settings, forkserver=forkserver, metrics=Unrecorded())
        release_collector()  # imported: the load runs collected (entry.hold_collector)
        await starting
        # Joined (blocking the loop a moment, at most) once the supervisor has closed.
        with _ahead.importing(warm):
            async with supervisor:  # starts the fork server, unless started above
                return await supervisor.load(request)
    finally:
        # Even after an error (a bad request or setting), let it finish starting: closed
        # before its READY, it would die on a broken pipe with a traceback. start() is bounded.
        await asyncio.wait([starting])
        if not starting.cancelled():
            starting.exception()  # retrieved: an error of its own was raised above, or is moot
        await forkserver.close()


def inspect(
    file: FileArg,
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
    from loadwarden.producer.errors import LoadError
    from loadwarden.worker.load._model import inspect_opened
    from loadwarden.worker.load.signing import (
        Trust,
        TrustError,
        settled_status,
        signature_status,
    )

    request = load_request(file, None, {}, signed_by)
    source = request.source
    settings = local_policies(*named_root(source))
    try:
        trust = Trust(settings.signing) if settings.signing.signers else None
    except TrustError as exc:
        typer.echo(f"error: {clean(str(exc))}", err=True)
        raise typer.Exit(2) from None

    def open_it() -> tuple[OpenedModel, dict[str, Any], LoadError | None]:
        opened = _open_here(source, settings.sources, settings.inspection)
        try:
            status = settled_status(opened, request, settings.signing, trust)
            if status is not None:
                return opened, status, None
            found, refusal = _on_a_loop(signature_status(opened, request, settings.signing, trust))
            return opened, found, refusal
        except BaseException:
            opened.close()
            raise

    release_collector()  # imported: the file's inspection runs collected (entry.hold_collector)
    signature: dict[str, Any] | None = None
    try:
        opened, signature, refusal = open_it()
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
        from loadwarden.worker.cli import _rows  # rich only where the output needs it

        _rows.show(_rows.inspection_rows(document))
    raise typer.Exit(EXIT_OK if document["outcome"] == "ok" else EXIT_OUTCOME)


def _open_here(source: str, policy: SourcePolicy, caps: InspectionCaps) -> OpenedModel:
    """The model's files, opened as a load opens them: here, blocking (no event loop to keep
    free, and asyncio is not imported for it), but a URL's download."""
    from loadwarden.worker.sources import open_model, open_model_here

    opened = open_model_here(source, policy=policy, caps=caps)
    if opened is None:
        opened = _on_a_loop(open_model(source, expected_sha256=None, policy=policy, caps=caps))
    return opened


def _on_a_loop(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` on an event loop of its own: what ``inspect`` needs one for (a download,
    a signature to verify and hash) imports asyncio, the rest does not."""
    import asyncio

    return asyncio.run(work)


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
    import asyncio

    from loadwarden.producer.catalog import load_catalog
    from loadwarden.producer.errors import CatalogError
    from loadwarden.worker._files import resolved
    from loadwarden.worker.cli import _render
    from loadwarden.worker.cli import calibrate as calib
    from loadwarden.worker.ops.logs import configure_logging

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
