"""Human-readable output of the CLI (rich); ``--json`` output never passes through here."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from loadwarden.producer.client import DeadLetter, QueueStatus
from loadwarden.producer.contract import LoadReport, ModelSummary, Outcome
from loadwarden.producer.preload import PreloadEntry, PreloadResult

if TYPE_CHECKING:
    from loadwarden.worker.calibrate import Calibration

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
    if model.shards is not None:
        _shard_rows(table, model)


#: Shards listed one per line; a larger checkpoint's list is cut (--json has them all).
SHOWN_SHARDS = 32


def _shard_rows(table: Table, model: ModelSummary) -> None:
    shards = model.shards or []
    table.add_row("shards", f"{len(shards)} files, {_size(model.file_bytes)}")
    for shard in shards[:SHOWN_SHARDS]:
        # Names come from an untrusted index: Text, so "[...]" is never read as markup.
        line = Text(shard.file)
        line.append(f"  {_size(shard.bytes)}, {shard.tensors} tensors")
        if shard.sha256:
            line.append(f", sha256 {shard.sha256[:16]}…")
        table.add_row("", line)
    if len(shards) > SHOWN_SHARDS:
        table.add_row("", f"… and {len(shards) - SHOWN_SHARDS} more (--json lists them all)")


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
        f"queue [bold]{q.queue}[/bold]: {q.ready} ready, {q.deferred} deferred, "
        f"{q.running} running, {q.dead_letters} dead letters, "
        f"{len(q.workers)} live worker(s)"
    )
    if not q.workers:
        console.print("[red]no worker has sent a heartbeat lately[/red]")
        return
    table = Table(box=None)
    for column in ("worker", "running", "waiting", "memory in use / budget", "confinement"):
        table.add_column(column)
    for w in q.workers:
        table.add_row(
            w.id,
            f"{w.running}/{w.concurrency}",
            str(w.waiting),
            f"{_size(w.memory_in_use_bytes)} / {_size(w.memory_budget_bytes)}",
            f"{w.cgroups}, landlock ABI {w.landlock_abi or 'none'}",
        )
    console.print(table)


_STATE_STYLE = {
    "pending": "dim",
    "queued": "yellow",
    "running": "cyan",
    "skipped": "dim",
    "unfinished": "red",
}


def _entry_outcome(entry: PreloadEntry) -> str:
    if entry.report is None:
        return f"[{_STATE_STYLE.get(entry.state, '')}]{entry.state}[/]"
    style = "green" if entry.report.outcome is Outcome.OK else "red"
    cached = " (stored)" if entry.cached else ""
    return f"[{style}]{entry.report.outcome}[/{style}]{cached}"


def preload_progress(entries: list[PreloadEntry]) -> Table:
    """The live view: one row per entry with its state."""
    done = sum(e.report is not None for e in entries)
    table = Table(title=f"preloading: {done}/{len(entries)} done", title_justify="left", box=None)
    table.add_column("model")
    table.add_column("state")
    for entry in entries:
        table.add_row(entry.name, _entry_outcome(entry))
    return table


def preload_summary(result: PreloadResult) -> None:
    """The summary table: model, outcome, size, wall time, peak RSS, error."""
    table = Table(title="preload summary", title_justify="left")
    for column in ("model", "outcome", "size", "wall s", "peak RSS", "error"):
        table.add_column(
            column, justify="right" if column in ("size", "wall s", "peak RSS") else "left"
        )
    for e in result.entries:
        r = e.report
        res = r.resources if r else None
        table.add_row(
            e.name,
            _entry_outcome(e),
            _size(r.model.bytes) if r and r.model else "",
            f"{res.wall_seconds:.2f}" if res else "",
            _size(res.peak_rss_bytes) if res else "",
            r.error.code if r and r.error else "",
        )
    console.print(table)
    for e in result.entries:
        if e.report and e.report.error and e.duplicate_of is None:
            console.print(f"  [bold]{e.name}[/bold]: {e.report.error.message}", highlight=False)
    t = result.totals
    outcomes = ", ".join(f"{k} {v}" for k, v in t.by_outcome.items())
    console.print(
        f"{t.entries} entries ({t.jobs} jobs, {t.cached} answered from stored reports): "
        f"{outcomes}; {t.wall_seconds:.2f} s"
    )


def calibration(results: Sequence[Calibration]) -> None:
    """Measured cost and recommended limits per entry."""
    table = Table(title="calibration (recommended = measured x margins)", title_justify="left")
    for column in (
        "model",
        "outcome",
        "wall s",
        "cpu s",
        "peak",
        "→ memory",
        "→ cpu s",
        "→ deadline s",
    ):
        table.add_column(column, justify="left" if column in ("model", "outcome") else "right")
    for c in results:
        res, lim = c.report.resources, c.recommended
        table.add_row(
            c.name,
            _entry_outcome_of(c.report),
            f"{res.wall_seconds:.3f}" if res else "",
            f"{res.cpu_user_seconds + res.cpu_system_seconds:.3f}" if res else "",
            _size(res.peak_rss_bytes) if res else "",
            _size(lim.memory_bytes or 0) if lim else "",
            f"{lim.cpu_seconds:g}" if lim else "",
            f"{lim.timeout_seconds:g}" if lim else "",
        )
    console.print(table)


def _entry_outcome_of(report: LoadReport) -> str:
    style = "green" if report.outcome is Outcome.OK else "red"
    return f"[{style}]{report.outcome}[/{style}]"


def dead_letters(letters: Sequence[DeadLetter]) -> None:
    if not letters:
        console.print("no dead letters")
        return
    table = Table(title="dead letters (newest first)", title_justify="left")
    for column in ("id", "job", "outcome", "attempts", "source", "error"):
        table.add_column(column)
    for d in letters:
        r = d.report
        table.add_row(
            d.id,
            d.job_id,
            str(r.outcome),
            str(len(r.attempts)),
            r.source,
            r.error.code if r.error else "",
        )
    console.print(table)


_BLOCKS = " ▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float]) -> str:
    """Values as a line of block characters, scaled to their own maximum."""
    top = max(values, default=0.0)
    if top <= 0:
        return _BLOCKS[1] * len(values)
    return "".join(_BLOCKS[max(1, round(v / top * (len(_BLOCKS) - 1)))] for v in values)


def resource_chart(r: LoadReport) -> None:
    """Memory and CPU of a load over time, from the samples kept in its report."""
    series = r.resources.series if r.resources else []
    if len(series) < 2:
        console.print(
            "[dim]no samples to chart (the load was shorter than one sampling interval)[/dim]"
        )
        return
    rss = [s.rss_bytes for s in series]
    busy = [0.0] + [
        max(0.0, (b.cpu_s - a.cpu_s) / (b.t_s - a.t_s)) if b.t_s > a.t_s else 0.0
        for a, b in itertools.pairwise(series)
    ]
    span = series[-1].t_s
    console.print(f"memory  {sparkline(rss)}  peak {_size(max(rss))}")
    console.print(f"cpu     {sparkline(busy)}  peak {max(busy) * 100:.0f}% of a core")
    console.print(
        f"        0 s{' ' * max(1, len(series) - 8)}{span:.1f} s  ({len(series)} samples)"
    )
