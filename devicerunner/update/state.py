"""The crash-safe state of one app's updates (``apps/<app>/state.json``). Pure.

``AppState`` is the single commit point of an app; AppSlots (update.slots)
reads and writes it. ``from_json`` treats the file as untrusted input: a
wrong shape raises ValueError (StateFileError) naming the field, and the
caller takes the corruption path. The file carries a SHA-256 of its content
(runtime.statefile.seal), so a bit flip that still parses (a digit of
``highest_sequence``) is corruption too, never a silently different state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

from devicerunner.runtime.statefile import StateFileError, seal, unseal
from devicerunner.update.events import Phase

SLOTS = ("a", "b")
MAX_BAD_SEQUENCES = 256
MAX_STATE_DEPTH = 4
MAX_TEXT = 4096
"""Longest reason/error text kept in state.json (longer ones are cut)."""
MAX_SEQUENCE = 2**53
SEQ_RE = re.compile(r"[0-9]{1,16}")
LEGACY_REFUSALS = tuple(
    f"{r}: " for r in ("expired", "artifact_mismatch", "wrong_target", "capability_escalation", "unsupported")
)
"""Prefixes of ``bad_sequences`` reasons that were refusals, not rollbacks."""


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
        return seal({f: getattr(self, f) for f in self.__dataclass_fields__})

    @classmethod
    def from_json(cls, data: bytes) -> AppState:
        """The state ``to_json`` wrote; StateFileError (a ValueError) naming the
        first field that is missing, unknown, of the wrong type or out of range."""
        obj = unseal(data, MAX_STATE_DEPTH, legacy_keys=_FIELD_NAMES - _ADDED_FIELDS)
        for name in _ADDED_FIELDS:  # a file written before the field existed: null
            obj.setdefault(name, None)
        if set(obj) != _FIELD_NAMES:
            extra, missing = sorted(set(obj) - _FIELD_NAMES), sorted(_FIELD_NAMES - set(obj))
            raise StateFileError(f"state.json: unknown fields {extra}, missing fields {missing}")
        if obj["schema"] != 1 or isinstance(obj["schema"], bool):
            raise StateFileError(f"state.json: schema {obj['schema']!r}, expected 1")
        for name in ("active", "pending"):
            if obj[name] not in (None, *SLOTS):
                raise StateFileError(f"state.json: {name} must be null, 'a' or 'b', got {obj[name]!r:.40}")
        if not isinstance(obj["phase"], str) or obj["phase"] not in Phase.__members__:
            raise StateFileError(f"state.json: unknown phase {obj['phase']!r:.40}")
        for name in ("active_sequence", "highest_sequence", "trial_attempts"):
            _check_int(obj, name, optional=False)
        _check_int(obj, "pending_sequence", optional=True)
        _check_int(obj, "last_error_sequence", optional=True)
        for name in ("active_version", "pending_version", "last_error", "last_reason"):
            _check_text(obj, name)
        bad = obj["bad_sequences"]
        if not isinstance(bad, dict) or len(bad) > MAX_BAD_SEQUENCES:
            raise StateFileError(f"state.json: bad_sequences must be an object of <= {MAX_BAD_SEQUENCES}")
        for k, v in bad.items():
            if not SEQ_RE.fullmatch(k) or not isinstance(v, str) or len(v) > MAX_TEXT:
                raise StateFileError(f"state.json: bad_sequences entry {k[:20]!r} is malformed")
        if (obj["pending"] is None) != (obj["pending_sequence"] is None):
            raise StateFileError("state.json: pending and pending_sequence must be set together")
        obj["phase"] = Phase(obj["phase"])
        return cls(**obj)

    @property
    def bad(self) -> frozenset[int]:
        """Sequences this device rolled back. Entries an older version wrote for
        a mere refusal (``"<reason>: ..."``) do not count: a refusal never burns
        a sequence (docs/operations.md), so such devices recover by themselves."""
        return frozenset(
            int(s) for s, why in self.bad_sequences.items() if not str(why).startswith(LEGACY_REFUSALS)
        )

    def mark_bad(self, sequence: int, reason: str) -> AppState:
        bad = dict(self.bad_sequences)
        bad[str(sequence)] = reason[:MAX_TEXT]
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


_FIELD_NAMES = frozenset(f.name for f in fields(AppState))
_ADDED_FIELDS = frozenset({"last_error_sequence"})
"""Fields newer than some state files on devices: missing means null."""


def _check_int(obj: dict[str, Any], name: str, *, optional: bool) -> None:
    v = obj[name]
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_SEQUENCE:
        raise StateFileError(f"state.json: {name} must be an integer 0..2^53, got {v!r:.40}")


def _check_text(obj: dict[str, Any], name: str) -> None:
    v = obj[name]
    if v is not None and (not isinstance(v, str) or len(v) > MAX_TEXT):
        raise StateFileError(f"state.json: {name} must be null or a string of <= {MAX_TEXT}")


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
