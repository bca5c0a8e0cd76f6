"""The device's persisted trust state: its current root and trusted-time floor.

``<state_dir>/trust/root.json`` is the current root (replaced only by a
verified rotation); ``<state_dir>/trust/state.json`` holds the time floor.
On first boot the root comes from the provisioned file named in device.toml.

Both files are untrusted input on load: sizes bounded before reading, the
floor file sealed with a SHA-256 and type-checked. A damaged floor is rebuilt
from the ``issued`` times of the committed slots' manifests (every committed
release raised the floor at least that far), and logged.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from devicerunner.errors import ConfigError, VerificationError
from devicerunner.runtime.fsutil import atomic_write, makedirs
from devicerunner.runtime.statefile import StateFileError, read_bounded, seal, unseal
from devicerunner.trust import verify as trust
from devicerunner.trust.manifest import MAX_MANIFEST_BYTES, MAX_ROOT_BYTES, Root, parse_manifest

MAX_FLOOR = 2**40

log = logging.getLogger(__name__)


class TrustStore:
    def __init__(self, state_dir: Path, provisioned: Path | None) -> None:
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "trust"
        self._lock = threading.Lock()
        self.root = self._load_root(provisioned)
        self.time_floor = self._load_floor()

    def _load_root(self, provisioned: Path | None) -> Root | None:
        current = self.dir / "root.json"
        for path in (current, provisioned):
            if path is None or not path.exists():
                continue
            try:
                raw = read_bounded(path, MAX_ROOT_BYTES)
                if raw is None:
                    continue
                root = trust.load_trusted_root(raw)
            except (OSError, VerificationError, StateFileError) as e:
                if path == current:
                    log.error("trust root %s unreadable (%s); using the provisioned one", path, e)
                    continue
                raise ConfigError(f"device.trust_root: {path}: {e}") from e
            if path != current:
                makedirs(self.dir)
                atomic_write(current, root.raw)
            return root
        return None

    def _load_floor(self) -> int:
        try:
            raw = read_bounded(self.dir / "state.json", 4096)
            if raw is None:
                return 0
            obj = unseal(raw, 2, legacy_keys=frozenset({"time_floor"}))
            floor = obj.get("time_floor")
            if set(obj) != {"time_floor"} or isinstance(floor, bool) or not isinstance(floor, int):
                raise StateFileError(f"time_floor must be an integer, got {floor!r:.40}")
            if not 0 <= floor <= MAX_FLOOR:
                raise StateFileError(f"time_floor {floor} out of range")
            return floor
        except (OSError, ValueError) as e:
            rebuilt = self._floor_from_slots()
            log.error(
                "trust state.json unreadable (%s); time floor rebuilt from the committed slots: %d",
                e,
                rebuilt,
            )
            return rebuilt

    def _floor_from_slots(self) -> int:
        floor = 0
        for marker in self.state_dir.glob("apps/*/slots/*/committed"):
            try:
                raw = read_bounded(marker.parent / "manifest.json", MAX_MANIFEST_BYTES)
                if raw is not None:
                    floor = max(floor, parse_manifest(raw).issued)
            except (OSError, ValueError, VerificationError):
                continue
        return floor

    def raise_floor(self, issued: int) -> None:
        with self._lock:
            if issued <= self.time_floor:
                return
            makedirs(self.dir)
            atomic_write(self.dir / "state.json", seal({"time_floor": issued}))
            self.time_floor = issued

    def rotate(self, data: bytes) -> Root:
        """Accept a new root (or a chain ending in it); raises RootRotationError."""
        with self._lock:
            if self.root is None:
                raise VerificationError("no trust root provisioned on this device")
            new = trust.update_root(self.root, data)
            atomic_write(self.dir / "root.json", new.raw)
            self.root = new
            return new
