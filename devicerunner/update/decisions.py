"""Pure update decisions: app state (and a manifest) in, new app state out.

No files, sockets or clocks here: the updater carries the results out
through AppSlots. Each function states the one transition it makes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from devicerunner.trust.manifest import Manifest
from devicerunner.update.events import Phase, Reason
from devicerunner.update.state import AppState


@dataclass(frozen=True)
class BootPlan:
    state: AppState
    retrial: bool
    """Re-verify the pending slot and run its trial again."""
    note: str | None = None


def plan_boot(st: AppState, attempts: int) -> BootPlan:
    """At boot: a trial interrupted ``attempts`` times is rolled back (each
    crash counted as a failed attempt); otherwise a pending slot is tried again."""
    if st.phase == Phase.TRIAL and st.pending is not None:
        if st.trial_attempts >= attempts:
            reason = f"trial interrupted by a crash or power loss ({st.trial_attempts} attempt(s))"
            seq = st.pending_sequence or 0
            new = replace(
                clear_pending(st.mark_bad(seq, reason), Phase.ROLLED_BACK),
                last_error=reason,
                last_reason=Reason.TRIAL_INTERRUPTED,
                last_error_sequence=seq or None,
            )
            return BootPlan(new, False, f"rolled back sequence {seq}: {reason}")
        return BootPlan(st, True, "trial interrupted; trying again")
    if st.phase == Phase.STAGED and st.pending is not None:
        return BootPlan(st, True, "staged update found; verifying it again")
    return BootPlan(st, False)


def clear_pending(st: AppState, phase: Phase) -> AppState:
    """No candidate any more; the active slot is untouched."""
    return replace(
        st, pending=None, pending_sequence=None, pending_version=None, phase=phase, trial_attempts=0
    )


def plan_stage(st: AppState, slot: str, m: Manifest) -> AppState:
    return replace(
        st,
        pending=slot,
        pending_sequence=m.sequence,
        pending_version=m.version,
        phase=Phase.STAGED,
        trial_attempts=0,
        last_error=None,
        last_reason=None,
        last_error_sequence=None,
    )


def plan_trial(st: AppState) -> AppState:
    """Persisted before any of the candidate's code runs: a crash from here on counts."""
    return replace(st, phase=Phase.TRIAL, trial_attempts=st.trial_attempts + 1)


def plan_commit(st: AppState, m: Manifest) -> AppState:
    return replace(
        clear_pending(st, Phase.COMMITTED),
        active=st.pending,
        active_sequence=m.sequence,
        active_version=m.version,
        highest_sequence=max(st.highest_sequence, m.sequence),
        last_error=None,
        last_reason=None,
        last_error_sequence=None,
    )


def plan_rollback(st: AppState, sequence: int, reason: str) -> AppState:
    return replace(
        clear_pending(st.mark_bad(sequence, reason), Phase.ROLLED_BACK),
        last_error=reason,
        last_reason=Reason.TRIAL_FAILED,
        last_error_sequence=sequence,
    )
