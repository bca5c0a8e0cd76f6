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


class TrustStore:
    def __init__(self, state_dir: Path, provisioned: Path | None) -> None:
        self.dir = Path(state_dir) / "trust"
        self._lock = threading.Lock()
        self.root = self._load_root(provisioned)
        self.time_floor = self._load_floor()

    def _load_root(self, provisioned: Path | None) -> Root | None:
        current = self.dir / "root.json"
        for path in (current, provisioned):
            if path is None or not path.exists():
                continue
            try:
                root = trust.load_trusted_root(path.read_bytes())
            except (OSError, VerificationError) as e:
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
            obj = json.loads((self.dir / "state.json").read_bytes())
            return int(obj["time_floor"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

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
