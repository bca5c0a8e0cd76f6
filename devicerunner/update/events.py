"""Update phases and events: one enum of phases, one event type, one JSON form.

Phases are the states of one app's update (state.json ``phase``); an event
says that an app entered one, or that something happened on the way
(``DOWNLOADED``, ``FAILED``, ``ROOT_ROTATED``). Both serialise as their
plain upper-case names, so status files, MQTT events and logs agree.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


class Phase(enum.StrEnum):
    """The phase of one app's update, persisted in state.json."""

    IDLE = "IDLE"
    DOWNLOADING = "DOWNLOADING"
    STAGED = "STAGED"
    TRIAL = "TRIAL"
    COMMITTED = "COMMITTED"
    REJECTED = "REJECTED"
    ROLLED_BACK = "ROLLED_BACK"


class Kind(enum.StrEnum):
    """What an event reports: a phase entered, or one of these happenings."""

    IDLE = "IDLE"
    DOWNLOADING = "DOWNLOADING"
    STAGED = "STAGED"
    TRIAL = "TRIAL"
    COMMITTED = "COMMITTED"
    REJECTED = "REJECTED"
    ROLLED_BACK = "ROLLED_BACK"
    DOWNLOADED = "DOWNLOADED"
    SOURCE_FAILED = "SOURCE_FAILED"
    """One artifact source failed for one download; the next one is tried."""
    FAILED = "FAILED"
    ROOT_ROTATED = "ROOT_ROTATED"
    # A signed app configuration's way (update.config_updates); its events carry
    # ``config_version``, never ``sequence``, so no release consumer mistakes them.
    CONFIG_STAGED = "CONFIG_STAGED"
    CONFIG_TRIAL = "CONFIG_TRIAL"
    CONFIG_COMMITTED = "CONFIG_COMMITTED"
    CONFIG_ROLLED_BACK = "CONFIG_ROLLED_BACK"
    CONFIG_REJECTED = "CONFIG_REJECTED"
    CONFIG_FAILED = "CONFIG_FAILED"


class Reason(enum.StrEnum):
    """Why an update did not go ahead, beyond the verification reasons that
    the error types carry (``VerificationError.reason``: malformed, expired...)."""

    TRIAL_FAILED = "trial_failed"
    TRIAL_INTERRUPTED = "trial_interrupted"
    IO_ERROR = "io_error"
    INTERNAL_ERROR = "internal_error"
    DOWNLOAD_STALLED = "download_stalled"
    CONFIG_CORRUPT = "config_corrupt"
    """A stored config document does not match the sha256 its state pins."""
    STATE_CORRUPT = "state_corrupt"
    """A config state file is unreadable: the app starts without a config."""
    DOWNLOAD_FAILED = "download_failed"


WARNING_KINDS = frozenset(
    {
        Kind.REJECTED,
        Kind.ROLLED_BACK,
        Kind.FAILED,
        Kind.CONFIG_REJECTED,
        Kind.CONFIG_ROLLED_BACK,
        Kind.CONFIG_FAILED,
    }
)


@dataclass(frozen=True)
class Event:
    """One update event. ``fields`` holds the optional details (sequence,
    version, reason, reason_text, source, slot, chunk counts...)."""

    device: str
    app: str
    kind: Kind
    fields: Mapping[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=lambda: round(time.time(), 3))

    def to_dict(self) -> dict[str, Any]:
        """The one JSON form (MQTT ``events`` topic, status file, CLI)."""
        return {"ts": self.ts, "device": self.device, "app": self.app, "phase": str(self.kind), **self.fields}

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


EventListener = Callable[[Event], None]
