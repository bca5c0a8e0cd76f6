"""Token bucket: O(1), no threads, time passed in by the caller."""

from __future__ import annotations


class TokenBucket:
    def __init__(self, rate_per_s: float, burst: float, now_s: float) -> None:
        self.rate = rate_per_s
        self.burst = burst
        self._tokens = burst
        self._t = now_s

    def take(self, now_s: float, n: float = 1.0) -> bool:
        elapsed = now_s - self._t
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._t = now_s
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False
