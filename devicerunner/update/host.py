"""The seam between the update layer and the device that runs the apps.

The updater never sees the daemon: it receives an ``AppHost`` (what it may
ask of the running apps) and ``UpdateSettings`` (what it must know of the
device). Both are implemented and built by devicerunner.device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from devicerunner.trust.manifest import Manifest
from devicerunner.trust.verify import DeviceIdentity


class Candidate(Protocol):
    """A new version, compiled, linked and initialised, not yet ticking."""


Verdict = Callable[[str], None]
"""Called once when a trial ends: update.trial.PASSED or the reason it failed."""


class AppHost(Protocol):
    def prepare(self, app: str, m: Manifest, module: bytes) -> Candidate:
        """Compile, link, instantiate and run ``dr_init`` of a new version while
        the current one keeps ticking. Raises DeviceRunnerError (SandboxError...)."""
        ...

    def begin_trial(self, app: str, m: Manifest, candidate: Candidate, on_verdict: Verdict) -> None:
        """Switch the candidate in between two ticks (the old instance stays
        warm) and watch it under ``m.health``. On a failed trial the host has
        switched back before ``on_verdict`` runs. Raises if the switch fails."""
        ...

    def end_trial(self, app: str) -> None:
        """After a commit: free the old instance kept warm for the trial."""
        ...

    def on_trial(self, app: str) -> bool:
        """Is a trial of ``app`` running now?"""
        ...


class Clock(Protocol):
    def wall_ms(self) -> int: ...

    def monotonic_s(self) -> float: ...


@dataclass(frozen=True)
class UpdateSettings:
    """What the update layer knows of the device (from its config)."""

    state_dir: Path
    identity: DeviceIdentity
    channels: Mapping[str, str]
    """app -> the release channel it follows; also the set of apps."""
    trial_attempts: int
    inbox_scan_s: float = 0.25
