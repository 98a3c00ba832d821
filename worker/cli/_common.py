"""What every ``loadwarden`` command shares: the app, its options, settings and exits.

Importing this module costs typer and nothing of loadwarden's own stack: ``--help``
and a usage error need no more, so what a command uses is imported when it runs.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

import typer
from typer.core import TyperGroup

from loadwarden.worker._text import clean

if TYPE_CHECKING:
    from loadwarden.producer.client import Client
    from loadwarden.producer.contract import LoadReport, LoadRequest
    from loadwarden.worker.config import Settings
    from loadwarden.worker.config.policies import InspectionCaps
    from loadwarden.worker.config.trust import SigningPolicy, SourcePolicy

EXIT_OK, EXIT_OUTCOME, EXIT_USAGE, EXIT_NO_ANSWER = 0, 1, 2, 3
#: How long `enqueue --wait` and `report --wait` wait unless told (--timeout-s; 0: no limit):
#: ten minutes is the derived deadline of a 30 GB model at the slowest acceptable bandwidth,
#: and a wait that nothing will ever answer (no worker) ends with a message, not silence.
DEFAULT_WAIT_S = 600.0
T = TypeVar("T")
#: click's UsageError, the base of every usage error (typer re-exports only its BadParameter
#: subclass, and where click lives depends on typer's version).
_UsageError = cast(
    type[Exception], next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
)
_WANTS_JSON = "loadwarden.json"


class _Commands(TyperGroup):
    """The commands: under ``--json``, a usage error is also one JSON document on stdout
    (its message still goes to stderr), so stdout always holds exactly one document."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta[_WANTS_JSON] = "--json" in itertools.takewhile(lambda a: a != "--", args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _UsageError as exc:
            if ctx.meta.get(_WANTS_JSON):
                error = {"type": type(exc).__name__, "message": str(exc)}
                typer.echo(json.dumps({"error": error}))
            raise


def new_app() -> typer.Typer:
    """The ``loadwarden`` command group, with no command yet (``main`` adds them)."""
    return typer.Typer(
        cls=_Commands,
        name="loadwarden",
        help="Load ML model files in sandboxed, resource-limited child processes, from a Redis "
        "queue or right here.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        # Help texts name TOML tables like [[model]]: rich markup would swallow them.
        rich_markup_mode=None,
    )


app = new_app()

RedisOpt = Annotated[
    str | None,
    typer.Option(
        "--redis", envvar="LOADWARDEN_REDIS_URL", help="Redis URL, e.g. redis://127.0.0.1:6379/0."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")]
LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level(value: str) -> str:
    """A usage error (exit 2) for a level the logs do not know, before anything starts."""
    if value.lower() not in LOG_LEVELS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return value.lower()


LogOpt = Annotated[
    str,
    typer.Option(
        "--log-level",
        callback=_log_level,
        help="debug, info, warning or error (logs go to stderr).",
    ),
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
SignedByOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--signed-by",
        help="Require a signature by this signer, as the worker's signing.signers names it "
        "(repeatable: any of them; * : any the worker trusts).",
    ),
]
MemoryOpt = Annotated[
    int | None, typer.Option("--memory-bytes", help="Memory limit override.", min=1)
]
CpuOpt = Annotated[float | None, typer.Option("--cpu-s", help="CPU-time limit override.")]


def settings_from(redis: str | None = None, **overrides: Any) -> Settings:
    """The settings (environment first), with what the command line gave on top."""
    from loadwarden.worker.config import Settings

    values = {k: v for k, v in overrides.items() if v is not None}
    if redis:
        values["redis_url"] = redis
    try:
        return Settings(**values)
    except Exception as exc:  # pydantic's ValidationError or a bad environment variable
        raise typer.BadParameter(str(exc)) from None


def queue_settings(redis: str | None, who: str) -> Settings:
    """The settings of a command that only makes sense against a queue: a Redis URL is required."""
    settings = settings_from(redis)
    if not settings.redis_url:
        raise typer.BadParameter(
            f"{who} needs --redis or LOADWARDEN_REDIS_URL", param_hint="--redis"
        )
    return settings


def with_roots(settings: Settings, *roots: Path) -> Settings:
    """Settings whose local sources may come only from ``roots``."""
    policy = settings.sources.model_copy(update={"allow_roots": tuple(roots)})
    return settings.model_copy(update={"sources": policy})


class Policies:
    """What ``inspect`` reads of the settings (``local_policies``)."""

    __slots__ = ("inspection", "report_max_tensors", "signing", "sources")

    def __init__(
        self,
        inspection: InspectionCaps,
        sources: SourcePolicy,
        signing: SigningPolicy,
        report_max_tensors: int,
    ) -> None:
        self.inspection = inspection
        self.sources = sources
        self.signing = signing
        self.report_max_tensors = report_max_tensors


#: The one ``LOADWARDEN_*`` variable that sets nothing ``local_policies`` returns, and that
#: cannot make the settings invalid (a string, any string): the usual one in a shell.
_UNREAD = "LOADWARDEN_REDIS_URL"


def local_policies(*roots: Path) -> Policies:
    """The settings' policies and report cap (environment first), local sources only from
    ``roots``: what ``with_roots(settings_from(), *roots)`` holds of them.

    Where no ``LOADWARDEN_*`` variable is set (the Redis URL aside), that is each one's
    default, built here without the settings themselves: pydantic-settings and the
    ``Settings`` models cost ~25 ms of a ~250 ms ``inspect``. Any other such variable
    (in any case, as pydantic-settings reads them) builds the settings, and a bad one is
    the same usage error.
    """
    if any(k.upper().startswith("LOADWARDEN_") and k.upper() != _UNREAD for k in os.environ):
        settings = with_roots(settings_from(), *roots)
        return Policies(
            settings.inspection, settings.sources, settings.signing, settings.report_max_tensors
        )
    from loadwarden.worker.config.policies import REPORT_MAX_TENSORS, InspectionCaps
    from loadwarden.worker.config.trust import SigningPolicy, SourcePolicy

    sources = SourcePolicy().model_copy(update={"allow_roots": tuple(roots)})  # as with_roots
    return Policies(InspectionCaps(), sources, SigningPolicy(), REPORT_MAX_TENSORS)


def note_embedded(roots: tuple[Path, ...]) -> None:
    where = ", ".join(str(r) for r in roots) or "no local folder"
    typer.echo(
        f"loadwarden: no Redis configured (--redis / LOADWARDEN_REDIS_URL); running embedded: "
        f"private server + in-process worker reading {clean(where)}",
        err=True,
    )


def notice(text: str) -> None:
    typer.echo(f"loadwarden: {clean(text)}", err=True)


def source_arg(value: str) -> str:
    """Local paths are made absolute here: a worker resolves relative ones against its own cwd."""
    from loadwarden.producer.sources import is_url

    return value if is_url(value) else os.path.abspath(value)


def named_root(source: str) -> tuple[Path, ...]:
    """The allowed root of a source named on this command line: the folder holding it
    (a checkpoint folder's parent), or none for a URL or hf:// (the hub cache is its own)."""
    from loadwarden.producer.sources import is_url
    from loadwarden.worker._files import resolved

    return () if is_url(source) else (resolved(source).parent,)


def emit_report(report: LoadReport, as_json: bool) -> None:
    from loadwarden.producer.outcomes import Outcome

    if as_json:
        typer.echo(report.model_dump_json())
    else:
        from loadwarden.worker.cli import _render  # rich: only for the human output

        _render.report(report)
    raise typer.Exit(EXIT_OK if report.outcome is Outcome.OK else EXIT_OUTCOME)


def ask(redis: str | None, as_json: bool, query: Callable[[Client], Awaitable[T]]) -> T:
    """Run one query with a client; no Redis URL is a usage error (exit 2), and a failure
    to get an answer exits 3 with a clear message."""
    import asyncio

    from loadwarden.producer.client import Client
    from loadwarden.producer.errors import ClientError, ContractError

    settings = queue_settings(redis, "this command")

    async def go() -> T:
        async with Client(settings=settings) as client:
            return await query(client)

    try:
        return asyncio.run(go())
    except (ClientError, ContractError) as exc:
        raise no_answer(exc, as_json) from None


def no_answer(exc: Exception, as_json: bool) -> typer.Exit:
    if as_json:
        typer.echo(json.dumps({"error": {"type": type(exc).__name__, "message": str(exc)}}))
    else:
        typer.echo(f"loadwarden: {clean(exc)}", err=True)
    return typer.Exit(EXIT_NO_ANSWER)


def catalog_defects(message: str, defects: list[str], as_json: bool) -> typer.Exit:
    """An invalid catalog: every defect listed (JSON on stdout, or lines on stderr); exit 2."""
    if as_json:
        error = {"type": "CatalogError", "message": message, "defects": defects}
        typer.echo(json.dumps({"error": error}))
    else:
        typer.echo(f"loadwarden: {clean(message)}", err=True)
        for defect in defects:
            typer.echo(f"  - {clean(defect)}", err=True)
    return typer.Exit(EXIT_USAGE)


def labels_from(values: list[str] | None) -> dict[str, str]:
    """``--label KEY=VALUE`` options as a dict."""
    labels = {}
    for value in values or []:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{value!r} is not KEY=VALUE", param_hint="--label")
        labels[key] = text
    return labels


def load_request(
    source: str,
    sha256: str | None,
    labels: dict[str, str],
    signed_by: list[str] | None = None,
    **limits: Any,
) -> LoadRequest:
    """The request a command line names; a bad field is a usage error."""
    from loadwarden.producer.contract import LimitOverrides, LoadRequest

    try:
        return LoadRequest(
            source=source_arg(source),
            sha256=sha256,
            limits=LimitOverrides(**limits),
            labels=labels,
            signed_by=tuple(signed_by) if signed_by else None,
        )
    except Exception as exc:  # pydantic's ValidationError: say which field and why
        raise typer.BadParameter(str(exc)) from None
