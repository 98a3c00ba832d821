"""Human-readable output of the CLI (rich); ``--json`` output never passes through here.

Everything a file or a producer wrote (sources, tensor names, labels, error
messages, ids) is untrusted: it reaches the terminal only through ``safe``,
which never interprets rich markup and shows control characters (ANSI and OSC
escapes, newlines, bidi overrides) as visible escapes. Columns fold instead of
cutting, so an id or a path can always be copied as printed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from loadwarden.producer.contract import Outcome
from loadwarden.worker._text import clean
from loadwarden.worker._text import human_bytes as _size
from loadwarden.worker.cli import _rows

if TYPE_CHECKING:
    from loadwarden.producer.client import DeadLetter, QueueStatus
    from loadwarden.producer.contract import FailingModel, LoadReport
    from loadwarden.producer.preload import PreloadEntry, PreloadResult
    from loadwarden.worker.cli.calibrate import Calibration


console = Console(highlight=False)
#: Progress goes to stderr, so stdout stays the result alone.
err_console = Console(stderr=True, highlight=False)


def safe(value: object, style: str = "") -> Text:
    """Untrusted text for rich: no markup interpreted, control characters escaped."""
    return Text(clean(value), style=style)


def _table(*columns: str, **options: Any) -> Table:
    """A table whose columns fold long values onto more lines instead of cutting them."""
    table = Table(**options)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _pairs() -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    return table


def _cell(value: _rows.Value) -> str | Text:
    return Text(value.text, style=value.style) if isinstance(value, _rows.Shown) else value


def _add(table: Table, rows: Sequence[_rows.Row]) -> None:
    for name, value in rows:
        table.add_row(name, _cell(value))


def pairs(rows: Sequence[_rows.Row]) -> None:
    """Rows as a two-column table, names in bold (``_rows.show`` writes it plain)."""
    table = _pairs()
    _add(table, rows)
    console.print(table)


def _outcome(outcome: Outcome) -> Text:
    shown = _rows.outcome(outcome)
    return Text(shown.text, style=shown.style)


def report(r: LoadReport) -> None:
    table = _pairs()
    table.add_row("job", safe(r.job_id))
    table.add_row("source", safe(r.source))
    table.add_row("outcome", _outcome(r.outcome))
    if r.labels:
        table.add_row("labels", safe(", ".join(f"{k}={v}" for k, v in sorted(r.labels.items()))))
    if r.error:
        table.add_row("error", safe(f"{r.error.type} ({r.error.code}): {r.error.message}"))
    if r.model:
        _add(table, _rows.model_rows(r.model))
    if r.signature:
        sig = r.signature
        table.add_row(
            "signature",
            safe(
                f"{'verified' if sig.verified else 'not verified'}: {sig.file} "
                f"(sha256 {sig.sha256[:16]}…), signer {sig.signer or 'unknown'}, "
                f"{sig.files} files signed"
            ),
        )
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
            f"{_size(res.peak_rss_bytes)} (the kernel's high-water mark), "
            f"read {_size(res.read_bytes)}",
        )
    if r.confinement:
        table.add_row("confinement", safe(", ".join(r.confinement)))
    for a in r.attempts:
        delay = f", retried after {a.delay_s:g} s" if a.delay_s is not None else ""
        code = f" ({a.error_code})" if a.error_code else ""
        took = (a.finished_at - a.started_at).total_seconds()
        table.add_row(
            f"attempt {a.number}",
            safe(f"{a.outcome}{code} on {a.worker}, {took:.3f} s{delay}"),
        )
    console.print(table)


def queue_status(q: QueueStatus) -> None:
    line = Text("queue ")
    line.append(clean(q.queue), style="bold")
    line.append(
        f": {q.ready} ready, {q.deferred} deferred, {q.running} running, "
        f"{q.dead_letters} dead letters, {len(q.workers)} live worker(s)"
    )
    console.print(line)
    if not q.workers:
        console.print(Text("no worker has sent a heartbeat lately", style="red"))
        return
    # One block per worker, one line per job: ids and paths printed whole (soft-wrapped by
    # the terminal, never folded or cut), so they can be copied into `show` or `cancel`.
    for w in q.workers:
        head = Text("worker ")
        head.append(clean(w.id), style="bold")
        head.append(
            f"  running {w.running}/{w.concurrency}, waiting {w.waiting}, memory "
            f"{_size(w.memory_in_use_bytes)} / {_size(w.memory_budget_bytes)}"
        )
        console.print(head, soft_wrap=True)
        confinement = f"{w.cgroups}, landlock ABI {w.landlock_abi or 'none'}"
        console.print(Text(f"  confinement: {clean(confinement)}"), soft_wrap=True)
        for j in w.jobs:
            line = Text("  job ")
            line.append(clean(j.job_id), style="bold")
            line.append(f"  {j.phase} for {(w.seen_at - j.since).total_seconds():.1f} s  ")
            line.append(clean(j.source))
            console.print(line, soft_wrap=True)


_STATE_STYLE = {
    "pending": "dim",
    "queued": "yellow",
    "running": "cyan",
    "skipped": "dim",
    "unfinished": "red",
}


def _entry_outcome(entry: PreloadEntry) -> Text:
    if entry.report is None:
        return Text(str(entry.state), style=_STATE_STYLE.get(entry.state, ""))
    text = _outcome(entry.report.outcome)
    if entry.cached:
        text.append(" (stored)")
    return text


def preload_progress(entries: Sequence[PreloadEntry], total: int) -> Group:
    """The live view: a title out of the catalog's whole size, then one row per entry."""
    done = sum(e.report is not None for e in entries)
    table = _table("model", "state", box=None)
    for entry in entries:
        table.add_row(safe(entry.name), _entry_outcome(entry))
    return Group(Text(f"preloading: {done}/{total} done", style="italic"), table)


def preload_line(entry: PreloadEntry, done: int, total: int) -> str:
    """One plain progress line for a log or CI (no terminal): an entry that just finished."""
    r = entry.report
    if r is None:
        return f"[{done}/{total}] {clean(entry.name)}: {entry.state}"
    cached = " (stored)" if entry.cached else ""
    wall = f" in {r.resources.wall_seconds:.2f} s" if r.resources else ""
    code = f" ({clean(r.error.code)})" if r.error else ""
    return f"[{done}/{total}] {clean(entry.name)}: {r.outcome}{code}{cached}{wall}"


def preload_summary(result: PreloadResult) -> None:
    """The summary table: model, outcome, size, wall time, peak RSS, error."""
    # Borderless, a rule under the header and one space between columns: at 80 columns
    # a frame's 19 characters folded names such as "mixed-wrong-digest" mid-word.
    table = Table(
        title="preload summary",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=0,
    )
    for column in ("model", "outcome", "size", "wall s", "peak RSS", "error"):
        right = column in ("size", "wall s", "peak RSS")
        table.add_column(column, justify="right" if right else "left", overflow="fold")
    for e in result.entries:
        r = e.report
        res = r.resources if r else None
        table.add_row(
            safe(e.name),
            _entry_outcome(e),
            _size(r.model.bytes) if r and r.model else "",
            f"{res.wall_seconds:.2f}" if res else "",
            _size(res.peak_rss_bytes) if res else "",
            safe(r.error.code) if r and r.error else "",
        )
    console.print(table)
    for e in result.entries:
        if e.report and e.report.error and e.duplicate_of is None:
            line = Text("  ")
            line.append(clean(e.name), style="bold")
            line.append(f": {clean(e.report.error.message)}")
            console.print(line)
    t = result.totals
    outcomes = ", ".join(f"{k} {v}" for k, v in t.by_outcome.items())
    console.print(
        f"{t.entries} entries ({t.jobs} jobs, {t.cached} answered from stored reports): "
        f"{outcomes}; {t.wall_seconds:.2f} s"
    )


def calibration(results: Sequence[Calibration]) -> None:
    """Measured cost and recommended limits per entry, and why each limit is what it is."""
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
        left = column in ("model", "outcome")
        table.add_column(column, justify="left" if left else "right", overflow="fold")
    for c in results:
        res, lim = c.report.resources, c.recommended
        table.add_row(
            safe(c.name),
            _outcome(c.report.outcome),
            f"{res.wall_seconds:.3f}" if res else "",
            f"{res.cpu_user_seconds + res.cpu_system_seconds:.3f}" if res else "",
            _size(res.peak_rss_bytes) if res else "",
            _size(lim.memory_bytes or 0) if lim else "",
            f"{lim.cpu_seconds:g}" if lim else "",
            f"{lim.timeout_seconds:g}" if lim else "",
        )
    console.print(table)
    for c in results:
        for reason in c.reasons:
            line = Text("  ")
            line.append(clean(c.name), style="bold")
            line.append(f": {clean(reason)}")
            console.print(line)


def dead_letters(letters: Sequence[DeadLetter]) -> None:
    """One block per dead letter, ids and sources in full (no column ever cuts them)."""
    if not letters:
        console.print("no dead letters")
        return
    console.print(Text("dead letters (newest first)", style="bold"))
    for d in letters:
        r = d.report
        code = f" ({r.error.code})" if r.error else ""
        head = Text(clean(d.id), style="bold")
        head.append(f"  job {clean(d.job_id)}  ")
        head.append(clean(f"{r.outcome}{code}"), style="red")
        head.append(f"  {len(r.attempts)} attempt(s)  at {clean(d.at)}")
        console.print(head, soft_wrap=True)
        console.print(Text(f"  source: {clean(r.source)}"), soft_wrap=True)
        if r.error:
            console.print(Text(f"  error: {clean(r.error.message)}"), soft_wrap=True)


def failing_models(models: Sequence[FailingModel]) -> None:
    """One block per model the failure memory holds: identity whole, then each failure."""
    if not models:
        console.print("no failing models")
        return
    console.print(Text("failing models (refused first)", style="bold"))
    for m in models:
        head = Text(clean(m.identity), style="bold")
        head.append("  refused" if m.refused else "  counting", style="red" if m.refused else "")
        head.append(f"  {len(m.failures)} failure(s), forgotten at ")
        head.append(m.expires_at.isoformat(timespec="seconds"))
        console.print(head, soft_wrap=True)
        for f in m.failures:
            line = Text(f"  {f.at.isoformat(timespec='seconds')}  ")
            line.append(clean(f"{f.outcome} ({f.error_code})"), style="red")
            line.append(f"  job {clean(f.job_id)}  source: {clean(f.source)}")
            console.print(line, soft_wrap=True)


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
            Text(
                "no samples to chart (the load was shorter than one sampling interval)",
                style="dim",
            )
        )
        return
    rss = [s.rss_bytes for s in series]
    busy = [0.0] + [
        max(0.0, (b.cpu_s - a.cpu_s) / (b.t_s - a.t_s)) if b.t_s > a.t_s else 0.0
        for a, b in itertools.pairwise(series)
    ]
    span = series[-1].t_s
    # The samples see RSS every interval; the kernel's high-water mark (the report's
    # peak RSS) also sees what happened between two samples, so it can only be higher.
    console.print(f"memory  {sparkline(rss)}  highest sample {_size(max(rss))}")
    console.print(f"cpu     {sparkline(busy)}  highest {max(busy) * 100:.0f}% of a core")
    console.print(
        f"        0 s{' ' * max(1, len(series) - 8)}{span:.1f} s  ({len(series)} samples; "
        "peak RSS above is the kernel's high-water mark, which sees between samples)"
    )
