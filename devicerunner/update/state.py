"""The crash-safe state of one app's updates (``apps/<app>/state.json``). Pure.

``AppState`` is the single commit point of an app; AppSlots (update.slots)
reads and writes it. ``from_json`` treats the file as untrusted input: a
wrong shape raises ValueError and the caller takes the corruption path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

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

    def other_slot(self) -> str:
        return "b" if self.active == "a" else "a"
