"""Placeholder until the autoscaling policy lands: desired workers from queue counts."""

from __future__ import annotations

import math

from loadwarden.producer.settings import Settings


def desired_from_counts(counts: dict[str, int], settings: Settings) -> int:
    backlog = counts["ready"] + counts["running"]
    return max(0, math.ceil(backlog / max(1, settings.concurrency)))
