"""Human-readable output of the CLI (rich); ``--json`` output never passes through here."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from loadwarden.producer.client import QueueStatus
from loadwarden.producer.contract import LoadReport, ModelSummary, Outcome

console = Console()


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _model_rows(table: Table, model: ModelSummary) -> None:
    table.add_row("format", str(model.format))
    table.add_row("tensors", f"{len(model.tensors)} ({model.parameters:,} parameters)")
    table.add_row("tensor bytes", _size(model.bytes))
    table.add_row("dtypes", ", ".join(f"{d}: {n:,}" for d, n in sorted(model.dtypes.items())))
    if model.sha256:
        table.add_row("sha256", model.sha256)


def report(r: LoadReport) -> None:
    style = "green" if r.outcome is Outcome.OK else "red"
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("job", r.job_id)
    table.add_row("source", r.source)
    table.add_row("outcome", f"[{style}]{r.outcome}[/{style}]")
    if r.error:
        table.add_row("error", f"{r.error.type} ({r.error.code}): {r.error.message}")
    if r.model:
        _model_rows(table, r.model)
    if r.limits:
        lim = r.limits
        table.add_row(
            "limits",
            f"memory {_size(lim.memory_bytes)} ({lim.derivation.memory_bytes}), "
            f"cpu {lim.cpu_seconds:g} s ({lim.derivation.cpu_seconds}), "
            f"deadline {lim.timeout_seconds:g} s ({lim.derivation.timeout_seconds})",
        )
    if r.resources:
        res = r.resources
        table.add_row(
            "resources",
            f"wall {res.wall_seconds:.3f} s, cpu "
            f"{res.cpu_user_seconds + res.cpu_system_seconds:.3f} s, peak RSS "
            f"{_size(res.peak_rss_bytes)}, read {_size(res.read_bytes)}",
        )
    if r.confinement:
        table.add_row("confinement", ", ".join(r.confinement))
    console.print(table)


def inspection(document: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    ok = document["outcome"] == "ok"
    table.add_row("outcome", "[green]ok[/green]" if ok else f"[red]{document['outcome']}[/red]")
    if document["error"]:
        err = document["error"]
        table.add_row("error", f"{err['type']} ({err['code']}): {err['message']}")
    if document["model"]:
        _model_rows(table, ModelSummary.model_validate(document["model"]))
    console.print(table)


def queue_status(q: QueueStatus) -> None:
    console.print(
        f"queue [bold]{q.queue}[/bold]: {q.queued} queued, {q.running} running, "
        f"workers {'alive' if q.workers_alive else '[red]none alive[/red]'}"
    )
