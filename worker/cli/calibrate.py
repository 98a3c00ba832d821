"""Measure what each catalog entry really costs under generous limits, and recommend limits.

The seed's "performance testing to determine limits", as a command: each entry
is loaded once in the sandbox with the worker's ceilings as limits; its wall
time, CPU time and peak memory become recommended limits with margins (never
below the worker's floors nor above its ceilings), written as the catalog again
with each entry's ``[model.limits]`` replaced: a file that can stand in for the
catalog as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tomli_w
from pydantic import BaseModel, ConfigDict

from loadwarden.producer.catalog import Catalog
from loadwarden.producer.contract import LimitOverrides, LoadReport, LoadRequest, Outcome
from loadwarden.worker._text import clean
from loadwarden.worker.config import LimitPolicy, Settings
from loadwarden.worker.load.supervisor import Supervisor

MiB = 1024 * 1024
#: Time margins cover a busier node than the one calibrating (run-to-run spread < 2x).
TIME_MARGIN = 3.0
#: A fixed allowance on top: process start and first page faults, noisy at small sizes.
TIME_ALLOWANCE_S = 1.0
#: Memory margin on the measured peak, plus a fixed allowance for allocator noise.
MEMORY_MARGIN = 1.25
MEMORY_ALLOWANCE_BYTES = 16 * MiB


class Calibration(BaseModel):
    """One entry: what it cost, the limits recommended for it (None if it did not load), why."""

    model_config = ConfigDict(frozen=True)

    name: str
    report: LoadReport
    recommended: LimitOverrides | None
    reasons: list[str] = []


def _fit(
    name: str, unit: str, measured: float, derived: float, floor: float, ceiling: float, rule: str
) -> tuple[float, str]:
    """A recommended value within the worker's floor and ceiling, and the sentence saying why."""
    if derived < floor:
        return floor, f"{name} {floor:g}{unit}: the worker's floor ({rule} = {derived:g}{unit})"
    if derived > ceiling:
        return (
            ceiling,
            f"{name} {ceiling:g}{unit}: the worker's ceiling ({rule} = {derived:g}{unit})",
        )
    return derived, f"{name} {derived:g}{unit} = {rule} (measured {measured:g}{unit})"


def recommend(report: LoadReport, policy: LimitPolicy | None = None) -> Calibration | None:
    """Limits from one measured load, kept within the policy's floors and ceilings (pure)."""
    p = policy or LimitPolicy()
    res = report.resources
    if report.outcome is not Outcome.OK or res is None:
        return None
    peak = max(res.peak_rss_bytes, res.cgroup_peak_bytes or 0)
    cpu = res.cpu_user_seconds + res.cpu_system_seconds
    memory, why_memory = _fit(
        "memory",
        " bytes",
        peak,
        int(peak * MEMORY_MARGIN) + MEMORY_ALLOWANCE_BYTES,
        p.memory_floor_bytes,
        p.memory_ceiling_bytes,
        f"peak x {MEMORY_MARGIN:g} + {MEMORY_ALLOWANCE_BYTES // MiB} MiB",
    )
    cpu_s, why_cpu = _fit(
        "cpu",
        " s",
        round(cpu, 3),
        round(TIME_ALLOWANCE_S + cpu * TIME_MARGIN, 3),
        p.cpu_floor_s,
        p.cpu_ceiling_s,
        f"{TIME_ALLOWANCE_S:g} s + cpu x {TIME_MARGIN:g}",
    )
    wall, why_wall = _fit(
        "deadline",
        " s",
        round(res.wall_seconds, 3),
        round(TIME_ALLOWANCE_S + res.wall_seconds * TIME_MARGIN, 3),
        p.timeout_floor_s,
        p.timeout_ceiling_s,
        f"{TIME_ALLOWANCE_S:g} s + wall x {TIME_MARGIN:g}",
    )
    return Calibration(
        name="",
        report=report,
        recommended=LimitOverrides(
            memory_bytes=int(memory), cpu_seconds=cpu_s, timeout_seconds=wall
        ),
        reasons=[why_memory, why_cpu, why_wall],
    )


async def calibrate(
    requests: Sequence[tuple[str, LoadRequest]],
    settings: Settings,
    supervisor: Supervisor | None = None,
) -> list[Calibration]:
    """Load each entry once, one at a time, with generous limits; recommend limits for each."""
    policy = settings.limits
    own = supervisor is None
    sup = supervisor or Supervisor(settings)
    if own:
        await sup.start()
    try:
        generous = LimitOverrides(
            memory_bytes=min(policy.memory_ceiling_bytes, sup.admission.budget_bytes),
            cpu_seconds=policy.cpu_ceiling_s,
            timeout_seconds=policy.timeout_ceiling_s,
        )
        out = []
        for name, request in requests:
            report = await sup.load(request.model_copy(update={"limits": generous}))
            found = recommend(report, policy)
            out.append(
                found.model_copy(update={"name": name})
                if found is not None
                else Calibration(
                    name=name,
                    report=report,
                    recommended=None,
                    reasons=[f"not loaded ({report.outcome}): no recommendation"],
                )
            )
        return out
    finally:
        if own:
            await sup.close()


def to_toml(catalog: Catalog, calibrations: Sequence[Calibration]) -> str:
    """The catalog again, each measured entry with its recommended ``[model.limits]``.

    Everything else stays as written (relative sources, sha256, labels, format, the
    defaults), so the file can replace the catalog as it is; each entry's reasons
    come first as comments. Written with tomli-w: names and paths are quoted by a
    TOML writer, not by hand; write it as UTF-8, as TOML is.
    """
    by_name = {c.name: c for c in calibrations}
    head = [
        # The file's name is anyone's: escaped, or a newline in it would end the comment.
        f"# {clean(catalog.name)} with the limits recommended by `loadwarden calibrate`.",
        f"# memory = peak x {MEMORY_MARGIN:g} + {MEMORY_ALLOWANCE_BYTES // MiB} MiB; "
        f"cpu, deadline = {TIME_ALLOWANCE_S:g} s + measured x {TIME_MARGIN:g}; "
        "each within the worker's floors and ceilings.",
    ]
    document: dict[str, Any] = {"version": 1}
    defaults = catalog.defaults.model_dump(mode="json", exclude_defaults=True)
    if defaults:
        document["defaults"] = defaults
    parts = ["\n".join(head), tomli_w.dumps(document).rstrip()]
    for entry in catalog.models:
        table = entry.model_dump(mode="json", exclude_defaults=True)
        found = by_name.get(entry.name)
        if found is not None and found.recommended is not None:
            table["limits"] = found.recommended.model_dump(exclude_none=True)
        comments = [f"# {reason}" for reason in (found.reasons if found else [])]
        parts.append("\n".join([*comments, _model_table(table)]))
    return "\n\n".join(parts) + "\n"


def _model_table(table: dict[str, Any]) -> str:
    """One ``[[model]]`` written as a table, never inline (tomli-w inlines short arrays)."""
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    text = "[[model]]\n" + tomli_w.dumps(scalars)
    if tables:
        text += "\n" + tomli_w.dumps({"model": tables})
    return text.rstrip()
