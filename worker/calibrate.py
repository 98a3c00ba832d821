"""Measure what each catalog entry really costs under generous limits, and recommend limits.

The seed's "performance testing to determine limits", as a command: each entry
is loaded once in the sandbox with the worker's ceilings as limits; its wall
time, CPU time and peak memory become recommended limits with margins, written
as a catalog-shaped TOML file whose ``[model.limits]`` tables can be pasted
into the catalog.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from loadwarden.producer.contract import LimitOverrides, LoadReport, LoadRequest, Outcome
from loadwarden.producer.settings import Settings
from loadwarden.worker.supervisor import Supervisor

MiB = 1024 * 1024
#: Time margins cover a busier node than the one calibrating (run-to-run spread < 2x).
TIME_MARGIN = 3.0
#: A fixed allowance on top: process start and first page faults, noisy at small sizes.
TIME_ALLOWANCE_S = 1.0
#: Memory margin on the measured peak, plus a fixed allowance for allocator noise.
MEMORY_MARGIN = 1.25
MEMORY_ALLOWANCE_BYTES = 16 * MiB


class Calibration(BaseModel):
    """One entry: what it cost, and the limits recommended for it (None if it did not load)."""

    model_config = ConfigDict(frozen=True)

    name: str
    report: LoadReport
    recommended: LimitOverrides | None


def recommend(report: LoadReport) -> LimitOverrides | None:
    """Limits from one measured load (a pure function of the report)."""
    res = report.resources
    if report.outcome is not Outcome.OK or res is None:
        return None
    peak = max(res.peak_rss_bytes, res.cgroup_peak_bytes or 0)
    cpu = res.cpu_user_seconds + res.cpu_system_seconds
    return LimitOverrides(
        memory_bytes=int(peak * MEMORY_MARGIN) + MEMORY_ALLOWANCE_BYTES,
        cpu_seconds=round(TIME_ALLOWANCE_S + cpu * TIME_MARGIN, 3),
        timeout_seconds=round(TIME_ALLOWANCE_S + res.wall_seconds * TIME_MARGIN, 3),
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
            out.append(Calibration(name=name, report=report, recommended=recommend(report)))
        return out
    finally:
        if own:
            await sup.close()


def to_toml(calibrations: Sequence[Calibration]) -> str:
    """The recommendations as TOML: one ``[[model]]`` with its ``[model.limits]`` per entry."""
    lines = [
        "# Limits recommended by `loadwarden calibrate`: measured peak x margins.",
        f"# memory = peak x {MEMORY_MARGIN} + {MEMORY_ALLOWANCE_BYTES // MiB} MiB; "
        f"cpu, deadline = {TIME_ALLOWANCE_S:g} s + measured x {TIME_MARGIN:g}",
        "",
    ]
    for c in calibrations:
        lines += [
            "[[model]]",
            f"name = {json.dumps(c.name)}",
            f"source = {json.dumps(c.report.source)}",
        ]
        if c.recommended is None:
            lines += [f"# not loaded ({c.report.outcome}): no recommendation", ""]
            continue
        lim = c.recommended
        lines += [
            "[model.limits]",
            f"memory_bytes = {lim.memory_bytes}",
            f"cpu_seconds = {lim.cpu_seconds}",
            f"timeout_seconds = {lim.timeout_seconds}",
            "",
        ]
    return "\n".join(lines)
