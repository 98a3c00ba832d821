"""When a lost fork server may be started again (``forkserver.ForkServer`` restarts it).

A lost fork server (killed, crashed) is started again at once; the second in a row lost
SHORT_LIFE_S or less after its start (or one that did not start) makes the next start wait
1 s, the third 2 s, doubling up to RESTART_WAIT_MAX_S: one that dies at once on every start
does not spin. Loads meanwhile wait for the restart (``_restart``), within their deadline.

The down time (``down_s``: ``/livez``, the gauge ``loadwarden_forkserver_down_seconds``) runs
from the first loss until a fork server has stayed up SHORT_LIFE_S: one that starts and dies
again soon after each start (a crash loop) does not reset it, though it runs in between.
"""

from __future__ import annotations

import time

SHORT_LIFE_S = 30.0
RESTART_WAIT_MAX_S = 60.0


def restart_wait_s(short_lives: int) -> float:
    """How long to wait before the next start after that many short lives in a row."""
    return 0.0 if short_lives <= 1 else min(RESTART_WAIT_MAX_S, 2.0 ** (short_lives - 2))


class Backoff:
    """Fork servers in a row lost soon after their start or not started, when the last one
    was ready, and the time before which none is started."""

    def __init__(self) -> None:
        self.short_lives = 0
        self.ready_at = 0.0
        self.not_before = 0.0
        #: A fork server runs (started, not lost since).
        self.up = False
        #: When the fork server was first lost, while none has stayed up SHORT_LIFE_S since.
        self.down_since: float | None = None

    def down_s(self) -> float:
        """How long since a fork server was first lost while none has stayed up SHORT_LIFE_S
        since (0.0 once one has, or none was lost)."""
        now = time.monotonic()
        if self.down_since is None or (self.up and now - self.ready_at >= SHORT_LIFE_S):
            return 0.0
        return now - self.down_since

    def wait_s(self) -> float:
        return round(max(0.0, self.not_before - time.monotonic()), 3)

    def refusal(self) -> str | None:
        """Why no start may be tried now, or None."""
        if self.not_before <= time.monotonic():
            return None
        return (
            f"the fork server failed {self.short_lives} times in a row (lost soon after its "
            f"start, or not started); starting it again in {self.wait_s():.2f} s"
        )

    def started(self) -> None:
        self.ready_at = time.monotonic()
        self.up = True

    def failed(self) -> float:
        """Count a start that failed; returns the wait before the next."""
        self.short_lives += 1
        self.not_before = time.monotonic() + restart_wait_s(self.short_lives)
        return self.wait_s()

    def lost(self) -> tuple[float, float]:
        """Count a lost fork server's life; returns how long it lived and the wait before
        the next start."""
        lived_s = time.monotonic() - self.ready_at
        self.up = False
        if self.down_since is None or lived_s >= SHORT_LIFE_S:  # else the crash loop goes on
            self.down_since = time.monotonic()
        self.short_lives = self.short_lives + 1 if lived_s < SHORT_LIFE_S else 0
        self.not_before = time.monotonic() + restart_wait_s(self.short_lives)
        return round(lived_s, 3), self.wait_s()
