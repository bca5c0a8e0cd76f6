"""The device's persisted trust state: its current root and trusted-time floor.

``<state_dir>/trust/root.json`` is the current root (replaced only by a
verified rotation); ``<state_dir>/trust/state.json`` holds the time floor.
On first boot the root comes from the provisioned file named in device.toml.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from devicerunner.errors import ConfigError, VerificationError
from devicerunner.runtime.fsutil import atomic_write, makedirs
from devicerunner.trust import verify as trust
from devicerunner.trust.manifest import Root

log = logging.getLogger(__name__)


def read_root(state_dir: Path, provisioned: Path | None) -> tuple[Root | None, Path | None]:
    """The root a device trusts and the file it came from, without writing:
    ``<state_dir>/trust/root.json`` when it is valid, else the provisioned
    file (device.trust_root). A provisioned path that does not exist, or a
    provisioned root that does not verify, is a ConfigError naming the path,
    unless the device already holds a valid root (it rotated since)."""
    current = Path(state_dir) / "trust" / "root.json"
    if current.exists():
        try:
            return trust.load_trusted_root(current.read_bytes()), current
        except (OSError, VerificationError) as e:
            log.error("trust root %s unreadable (%s); using the provisioned one", current, e)
    if provisioned is None:
        return None, None
    try:
        data = provisioned.read_bytes()
    except FileNotFoundError as e:
        raise ConfigError(
            f"device.trust_root: {provisioned} does not exist (paths are relative to device.toml)"
        ) from e
    except OSError as e:
        raise ConfigError(f"device.trust_root: {provisioned}: {e.strerror or e}") from e
    try:
        return trust.load_trusted_root(data), provisioned
    except VerificationError as e:
        raise ConfigError(f"device.trust_root: {provisioned}: {e}") from e


def read_time_floor(state_dir: Path) -> int:
    try:
        obj = json.loads((Path(state_dir) / "trust" / "state.json").read_bytes())
        return int(obj["time_floor"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


class TrustStore:
    def __init__(self, state_dir: Path, provisioned: Path | None) -> None:
        self.dir = Path(state_dir) / "trust"
        self._lock = threading.Lock()
        self.root = self._load_root(provisioned)
        self.time_floor = self._load_floor()

    def _load_root(self, provisioned: Path | None) -> Root | None:
        root, source = read_root(self.dir.parent, provisioned)
        if root is not None and source != self.dir / "root.json":
            makedirs(self.dir)
            atomic_write(self.dir / "root.json", root.raw)
        return root

    def _load_floor(self) -> int:
        return read_time_floor(self.dir.parent)

    def raise_floor(self, issued: int) -> None:
        with self._lock:
            if issued <= self.time_floor:
                return
            makedirs(self.dir)
            atomic_write(self.dir / "state.json", json.dumps({"time_floor": issued}).encode())
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
