"""On-disk A/B slots and the crash-safe app state of one app.

The only writer of ``state.json`` and ``slots/``; the app's ``kv/``
(device.kvfile), ``config/`` and ``rollout.json`` (update.rollouts) sit
beside them and are written by their owners.

Layout under ``<state_dir>/apps/<app>/``::

    state.json              the single commit point (AppState)
    slots/{a,b}/module.wasm
    slots/{a,b}/manifest.json
    slots/{a,b}/committed   marker: "this slot was committed at sequence N"

Invariants:
- Every write is temp file + fsync + rename + fsync(dir) (fsutil.atomic_write;
  a slot's two files share one fsync of their directory).
- ``state.json.active`` changes only at commit. While an update is staged or
  on trial it lives in the *other* slot (``pending``), so at every instant
  the active slot holds a verified, runnable version (or the device is on
  its bootstrap module and ``active`` is null).
- Before a slot is overwritten its ``committed`` marker is removed, so a
  marker never vouches for content it did not see committed.
- A missing, truncated or corrupt state.json is never fatal: ``load`` falls
  back to the committed slot with the highest sequence whose module still
  matches its manifest, and says why.
- Every file here is untrusted input on load (runtime.statefile): sizes are
  checked before reading, nesting before parsing, state.json field by field
  and against its SHA-256 (update.state). A slot counts only if its manifest
  parses in full and its module matches it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from devicerunner.errors import VerificationError
from devicerunner.runtime.fsutil import atomic_write, fsync_dir, makedirs
from devicerunner.runtime.statefile import read_bounded
from devicerunner.trust.manifest import MAX_ARTIFACT_BYTES, MAX_MANIFEST_BYTES, Manifest, parse_manifest
from devicerunner.update.events import Phase
from devicerunner.update.state import SEQ_RE, SLOTS, AppState

log = logging.getLogger(__name__)

MODULE = "module.wasm"
MANIFEST = "manifest.json"
MARKER = "committed"
MAX_STATE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class SlotContent:
    slot: str
    module: bytes
    manifest: bytes
    parsed: Manifest


class AppSlots:
    """Files of one app. Methods are the file-system steps of the update path."""

    def __init__(self, state_dir: Path, app: str) -> None:
        self.app = app
        self.root = Path(state_dir) / "apps" / app
        self.state_path = self.root / "state.json"
        self._known: AppState | None = None
        """The state last read cleanly or written by this object: while the
        daemon runs it is the only writer of state.json, so reads (several per
        update, and every status) need not go back to the disk."""

    def slot_dir(self, slot: str) -> Path:
        return self.root / "slots" / slot

    # -- state --------------------------------------------------------------

    def load(self) -> tuple[AppState, str | None]:
        """The app's state and, when it had to be reconstructed, why."""
        known = self._known
        if known is not None:
            return known, None
        try:
            raw = read_bounded(self.state_path, MAX_STATE_BYTES)
            if raw is not None:
                st = AppState.from_json(raw)
                self._known = st
                return st, None
            # A fresh app has no state yet; one that has slots lost its state.
            why = "state.json missing" if (self.root / "slots").exists() else None
        except (OSError, ValueError) as e:
            why = f"state.json unreadable ({type(e).__name__}: {e})"
        if why is None:
            self._known = st = AppState()  # nothing on disk yet: until save() writes it
            return st, None
        st = self._reconstruct()
        log.error(
            "app %s: %s; fell back to %s",
            self.app,
            why,
            f"committed slot {st.active} (sequence {st.active_sequence})" if st.active else "no slot",
        )
        return st, why

    def _reconstruct(self) -> AppState:
        best: tuple[int, str] | None = None
        for slot in SLOTS:
            seq = self.committed_sequence(slot)
            if seq is not None and self.read_slot(slot) is not None and (best is None or seq > best[0]):
                best = (seq, slot)
        if best is None:
            return AppState(last_error="state lost; no committed slot")
        seq, slot = best
        return AppState(
            active=slot,
            active_sequence=seq,
            highest_sequence=seq,
            phase=Phase.COMMITTED,
            last_error="state.json was lost and rebuilt from the committed slot",
        )

    def save(self, st: AppState) -> None:
        makedirs(self.root)
        atomic_write(self.state_path, st.to_json())
        self._known = st

    def note(self, st: AppState) -> None:
        """Show ``st`` (``load`` returns it) without writing it: for a phase
        that a power cut may lose because it is rebuilt from elsewhere
        (DOWNLOADING: the download store holds the release and resumes it).
        The next ``save`` writes whatever is noted by then."""
        self._known = st

    # -- slots --------------------------------------------------------------

    def committed_sequence(self, slot: str) -> int | None:
        try:
            raw = read_bounded(self.slot_dir(slot) / MARKER, 32)
        except (OSError, ValueError):
            return None
        text = None if raw is None else raw.strip().decode("ascii", "replace")
        # fullmatch on ASCII digits: int() also takes "1_0", "+5" and Arabic-Indic digits
        return int(text) if text is not None and SEQ_RE.fullmatch(text) else None

    def read_slot(self, slot: str) -> SlotContent | None:
        """Slot content whose manifest parses in full and whose module matches
        the sha256 in it, else None (and the caller falls back to the other slot).
        The signatures are not checked again here: they were before it was written."""
        d = self.slot_dir(slot)
        try:
            manifest = read_bounded(d / MANIFEST, MAX_MANIFEST_BYTES)
            if manifest is None:
                return None
            m = parse_manifest(manifest)
            module = read_bounded(d / MODULE, min(m.artifact.size, MAX_ARTIFACT_BYTES))
        except (OSError, ValueError, VerificationError) as e:
            log.warning("app %s: slot %s unusable: %s", self.app, slot, e)
            return None
        if module is None or hashlib.sha256(module).hexdigest() != m.artifact.sha256:
            return None
        return SlotContent(slot, module, manifest, m)

    def write_slot(self, slot: str, module: bytes, manifest: bytes) -> None:
        d = self.slot_dir(slot)
        makedirs(d)
        marker = d / MARKER
        if marker.exists():
            os.unlink(marker)
            fsync_dir(d)
        # both files fsynced, then their directory once: neither counts before
        # state.json names this slot (written after this returns)
        atomic_write(d / MODULE, module, sync_dir=False)
        atomic_write(d / MANIFEST, manifest, sync_dir=False)
        fsync_dir(d)

    def mark_committed(self, slot: str, sequence: int) -> None:
        atomic_write(self.slot_dir(slot) / MARKER, f"{sequence}\n".encode())
