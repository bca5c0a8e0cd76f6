"""Log lines about input someone else controls, at a bounded rate.

A broker anyone may publish on can make the device refuse thousands of
messages a second; logging each would fill the disk and the journal. A
``RateLimitedLog`` lets ``burst`` lines through, then one per ``1/rate_per_s``
seconds, and counts what it held back: the next line that is let through
says how many were suppressed. ``now`` is passed in (monotonic seconds), so
the decision is testable without sleeping.
"""

from __future__ import annotations

import logging
import threading


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, rate_per_s: float = 1.0, burst: int = 10) -> None:
        self._log = logger
        self._rate = rate_per_s
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last: float | None = None
        self._lock = threading.Lock()
        self.suppressed = 0
        """Lines held back since the last one let through."""
        self.suppressed_total = 0

    def allow(self, now: float) -> int | None:
        """None if a line now must be suppressed (and counts it), else how many
        were suppressed before it."""
        with self._lock:
            if self._last is not None:
                self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens < 1.0:
                self.suppressed += 1
                self.suppressed_total += 1
                return None
            self._tokens -= 1.0
            held, self.suppressed = self.suppressed, 0
            return held

    def log(self, level: int, now: float, msg: str, *args: object) -> bool:
        held = self.allow(now)
        if held is None:
            return False
        if held:
            self._log.log(level, msg + " (%d similar line(s) suppressed)", *args, held)
        else:
            self._log.log(level, msg, *args)
        return True
