"""When a lost fork server may be started again (``forkserver.ForkServer`` restarts it).

A lost fork server (killed, crashed) is started again at once; the second in a row lost
SHORT_LIFE_S or less after its start (or one that did not start) makes the next start wait
1 s, the third 2 s, doubling up to RESTART_WAIT_MAX_S: one that dies at once on every start
does not spin. Loads meanwhile wait for the restart (``_restart``), within their deadline.
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
        #: When the fork server was lost, while none has started since (None: it runs).
        self.down_since: float | None = None

    def down_s(self) -> float:
        """How long no fork server has run since one was lost (0.0 while one runs)."""
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since

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
        self.down_since = None

    def failed(self) -> float:
        """Count a start that failed; returns the wait before the next."""
        self.short_lives += 1
        self.not_before = time.monotonic() + restart_wait_s(self.short_lives)
        return self.wait_s()

    def lost(self) -> tuple[float, float]:
        """Count a lost fork server's life; returns how long it lived and the wait before
        the next start."""
        lived_s = time.monotonic() - self.ready_at
        if self.down_since is None:
            self.down_since = time.monotonic()
        self.short_lives = self.short_lives + 1 if lived_s < SHORT_LIFE_S else 0
        self.not_before = time.monotonic() + restart_wait_s(self.short_lives)
        return round(lived_s, 3), self.wait_s()
