"""The health-checked trial of a new app version (pure: counters and time in, verdict out).

A trial passes when at least ``trial_ticks`` ticks *and* ``trial_seconds``
have passed with: no more traps than ``max_traps``, no more overruns than
``max_overruns``, no failed ``dr_health``, memory within the limit, and the
broker (when the daemon has one) not lost for longer than
``max_broker_loss_s`` *during the trial* (a device offline before an install
is not judged for it). The first violated rule fails it, with that reason.

Pure: counters, times and the broker's loss are passed in; no clock is held.
"""

from __future__ import annotations

from dataclasses import dataclass

from devicerunner.trust.manifest import Health

PASSED = "passed"


@dataclass(frozen=True)
class Snapshot:
    ticks: int
    traps: int
    overruns: int
    health_failures: int


@dataclass(frozen=True)
class Trial:
    health: Health
    started_s: float
    base: Snapshot
    memory_limit: int

    def elapsed(self, now_s: float) -> float:
        return max(0.0, now_s - self.started_s)

    def verdict(
        self, now: Snapshot, now_s: float, memory_bytes: int, broker_lost_s: float, last_error: str | None
    ) -> str | None:
        """None while running; PASSED; or the reason it failed. ``broker_lost_s``:
        how long the broker has been unreachable now (0 while connected)."""
        h = self.health
        traps = now.traps - self.base.traps
        if traps > h.max_traps:
            return f"trapped {traps} time(s) (allowed {h.max_traps}): {last_error}"
        overruns = now.overruns - self.base.overruns
        if overruns > h.max_overruns:
            return f"overran its tick budget {overruns} time(s) (allowed {h.max_overruns}): {last_error}"
        if now.health_failures > self.base.health_failures:
            return f"dr_health reported unhealthy: {last_error}"
        if memory_bytes > self.memory_limit:
            return f"memory {memory_bytes} bytes above the limit {self.memory_limit}"
        lost_in_trial_s = min(broker_lost_s, self.elapsed(now_s))
        if lost_in_trial_s > h.max_broker_loss_s:
            allowed = h.max_broker_loss_s
            return f"broker unreachable for {lost_in_trial_s:.0f} s of the trial (allowed {allowed} s)"
        if now.ticks - self.base.ticks >= h.trial_ticks and now_s - self.started_s >= h.trial_seconds:
            return PASSED
        return None
