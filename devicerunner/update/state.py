"""The crash-safe state of one app's updates (``apps/<app>/state.json``). Pure.

``AppState`` is the single commit point of an app; AppSlots (update.slots)
reads and writes it. ``from_json`` treats the file as untrusted input: a
wrong shape raises ValueError and the caller takes the corruption path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from devicerunner.update.events import Phase

SLOTS = ("a", "b")
MAX_BAD_SEQUENCES = 256


@dataclass(frozen=True)
class AppState:
    schema: int = 1
    active: str | None = None
    active_sequence: int = 0
    active_version: str | None = None
    pending: str | None = None
    pending_sequence: int | None = None
    pending_version: str | None = None
    phase: str = Phase.IDLE
    trial_attempts: int = 0
    highest_sequence: int = 0
    bad_sequences: dict[str, str] = field(default_factory=dict)
    last_error: str | None = None
    last_reason: str | None = None
    last_error_sequence: int | None = None
    """The release ``last_error`` is about (None: not about one release)."""

    def to_json(self) -> bytes:
        # a field-by-field dict: asdict's deep copy was a tenth of an update's CPU
        doc = {f: getattr(self, f) for f in self.__dataclass_fields__}
        return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> AppState:
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("schema") != 1:
            raise ValueError("not a schema-1 app state")
        known = {f for f in cls.__dataclass_fields__}
        st = cls(**{k: v for k, v in obj.items() if k in known})
        if (
            st.phase not in Phase.__members__
            or st.active not in (None, *SLOTS)
            or st.pending not in (None, *SLOTS)
        ):
            raise ValueError(f"invalid phase/slot in state: {st.phase}/{st.active}/{st.pending}")
        if not isinstance(st.bad_sequences, dict) or not isinstance(st.highest_sequence, int):
            raise ValueError("invalid field types in state")
        return st

    @property
    def bad(self) -> frozenset[int]:
        return frozenset(int(s) for s in self.bad_sequences)

    def mark_bad(self, sequence: int, reason: str) -> AppState:
        bad = dict(self.bad_sequences)
        bad[str(sequence)] = reason
        while len(bad) > MAX_BAD_SEQUENCES:  # bounded: the oldest (lowest) go first
            bad.pop(str(min(int(s) for s in bad)))
        return replace(self, bad_sequences=bad)

    def retry_above(self, sequence: int) -> int | None:
        """When ``sequence`` can no longer be taken here (decided already, or
        marked bad), the sequence a new release must be above; else None."""
        if sequence <= self.highest_sequence or sequence in self.bad:
            return max(self.highest_sequence, max(self.bad, default=0))
        return None

    def other_slot(self) -> str:
        return "b" if self.active == "a" else "a"


def releases(st: AppState, running_version: str | None, downloading: Any = None) -> dict[str, Any]:
    """The active release and the candidate (downloading, staged or on trial)
    apart, so that a status never mixes one's version with the other's
    sequence; and the last error with the sequence it is about.
    ``downloading``: the manifest of a download in progress, if any."""
    candidate: dict[str, Any] | None = None
    if st.pending is not None:
        candidate = {
            "version": st.pending_version,
            "sequence": st.pending_sequence,
            "slot": st.pending,
            "phase": str(st.phase),
        }
    elif downloading is not None:
        candidate = {
            "version": downloading.version,
            "sequence": downloading.sequence,
            "slot": None,
            "phase": "DOWNLOADING",
        }
    active_version = st.active_version
    if active_version is None:  # bootstrap (the configured module) or never swapped
        active_version = running_version if st.pending is None else None
    error: dict[str, Any] | None = None
    if st.last_error:
        error = {"text": st.last_error, "reason": st.last_reason, "sequence": st.last_error_sequence}
        if st.last_error_sequence is not None:
            error["retry_above"] = st.retry_above(st.last_error_sequence)
    return {
        "active": {"version": active_version, "sequence": st.active_sequence, "slot": st.active},
        "candidate": candidate,
        "error": error,
    }
