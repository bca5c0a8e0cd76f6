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


def read_root(state_dir: Path, provisioned: Path | None) -> tuple[Root | None, Path | None]:
    """The root a device trusts and the file it came from, without writing:
    ``<state_dir>/trust/root.json`` when it is valid, else the provisioned
    file (device.trust_root). A provisioned path that does not exist, or a
    provisioned root that does not verify, is a ConfigError naming the path,
    unless the device already holds a valid root (it rotated since). Sizes
    are checked before reading."""
    current = Path(state_dir) / "trust" / "root.json"
    try:
        raw = read_bounded(current, MAX_ROOT_BYTES)
        if raw is not None:
            return trust.load_trusted_root(raw), current
    except (OSError, VerificationError, StateFileError) as e:
        log.error("trust root %s unreadable (%s); using the provisioned one", current, e)
    if provisioned is None:
        return None, None
    try:
        data = read_bounded(provisioned, MAX_ROOT_BYTES)
    except (OSError, StateFileError) as e:
        raise ConfigError(f"device.trust_root: {provisioned}: {getattr(e, 'strerror', None) or e}") from e
    if data is None:
        raise ConfigError(
            f"device.trust_root: {provisioned} does not exist (paths are relative to device.toml)"
        )
    try:
        return trust.load_trusted_root(data), provisioned
    except VerificationError as e:
        raise ConfigError(f"device.trust_root: {provisioned}: {e}") from e


def read_time_floor(state_dir: Path) -> int:
    """The trusted-time floor, read as untrusted input (bounded, sealed,
    type-checked); a damaged one is rebuilt from the committed slots."""
    state_dir = Path(state_dir)
    try:
        raw = read_bounded(state_dir / "trust" / "state.json", 4096)
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
        rebuilt = _floor_from_slots(state_dir)
        log.error(
            "trust state.json unreadable (%s); time floor rebuilt from the committed slots: %d", e, rebuilt
        )
        return rebuilt


def _floor_from_slots(state_dir: Path) -> int:
    floor = 0
    for marker in state_dir.glob("apps/*/slots/*/committed"):
        try:
            raw = read_bounded(marker.parent / "manifest.json", MAX_MANIFEST_BYTES)
            if raw is not None:
                floor = max(floor, parse_manifest(raw).issued)
        except (OSError, ValueError, VerificationError):
            continue
    return floor


class TrustStore:
    def __init__(self, state_dir: Path, provisioned: Path | None) -> None:
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "trust"
        self._lock = threading.Lock()
        self.root = self._load_root(provisioned)
        self.time_floor = read_time_floor(self.state_dir)

    def _load_root(self, provisioned: Path | None) -> Root | None:
        root, source = read_root(self.state_dir, provisioned)
        if root is not None and source != self.dir / "root.json":
            makedirs(self.dir)
            atomic_write(self.dir / "root.json", root.raw)
        return root

    def raise_floor(self, issued: int, now: int) -> None:
        """After accepting a document issued at ``issued``, judged at the device
        clock's ``now`` (trust.next_floor: one document cannot push it far)."""
        with self._lock:
            if self.root is None:
                return
            floor = trust.next_floor(self.time_floor, issued, now=now, root=self.root)
            if floor > self.time_floor:
                self._write_floor(floor)

    def _write_floor(self, floor: int) -> None:
        makedirs(self.dir)
        atomic_write(self.dir / "state.json", seal({"time_floor": floor}))
        self.time_floor = floor

    def rotate(self, data: bytes) -> Root:
        """Accept a new root (or a chain ending in it); raises RootRotationError."""
        with self._lock:
            if self.root is None:
                raise VerificationError("no trust root provisioned on this device")
            new = trust.update_root(self.root, data)
            atomic_write(self.dir / "root.json", new.raw)
            self.root = new
            floor = trust.floor_after_rotation(new)
            if floor != self.time_floor:
                log.warning(
                    "trust root v%d: trusted-time floor reset to %d (was %d)",
                    new.version,
                    floor,
                    self.time_floor,
                )
                self._write_floor(floor)
            return new
