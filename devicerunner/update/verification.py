"""One verification context for every channel a document arrives by.

The inbox, MQTT and any later source hand raw bytes to the same
``Verifier``, so the same failure gives the same reason whichever way the
document came. It reads the device's trust state, the app's history and
the device clock, then calls the pure checks in devicerunner.trust.verify.
It never writes: deciding what a failure changes is the updater's job.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping

from devicerunner.errors import NoTrustRootError, UpdateError
from devicerunner.trust import verify as trust
from devicerunner.trust.manifest import Manifest, RolloutDoc, Root, parse_manifest
from devicerunner.trust.store import TrustStore
from devicerunner.update.host import Clock, UpdateSettings
from devicerunner.update.slots import AppSlots

AUTHENTIC_CACHE = 64
"""Manifests whose signatures verified, kept by (digest, root version): a
release is checked on arrival and again before it is staged."""


class Verifier:
    def __init__(
        self, settings: UpdateSettings, trust_store: TrustStore, slots: Mapping[str, AppSlots], clock: Clock
    ) -> None:
        self._settings = settings
        self._trust = trust_store
        self._slots = slots
        self._clock = clock
        self._authentic: OrderedDict[tuple[bytes, int], Manifest] = OrderedDict()
        self._lock = threading.Lock()  # the updater's and the channel's lanes both verify

    def now(self) -> int:
        """The device's wall clock in seconds: it may be off (see threat-model.md)."""
        return self._clock.wall_ms() // 1000

    def root(self) -> Root:
        root = self._trust.root
        if root is None:
            raise NoTrustRootError("no trust root is provisioned on this device (device.trust_root)")
        return root

    def release(self, manifest: bytes, module: bytes | None = None) -> Manifest:
        """The verified manifest (and, given the module, its artifact), or VerificationError."""
        root = self.root()
        app = peek_app(manifest)
        history = {}
        if app in self._slots:
            st, _ = self._slots[app].load()
            history[app] = trust.AppHistory(st.highest_sequence, st.bad)
        m = trust.check_release(
            self._authenticate(manifest, root),
            root=root,
            device=self._settings.identity,
            history=history,
            time_floor=self._trust.time_floor,
            now=self.now(),
            channel=self._settings.channels.get(app),
        )
        if module is not None:
            trust.verify_artifact(m, module)
        return m

    def _authenticate(self, manifest: bytes, root: Root) -> Manifest:
        key = (hashlib.sha256(manifest).digest(), root.version)
        with self._lock:
            m = self._authentic.get(key)
            if m is not None:
                self._authentic.move_to_end(key)
                return m
        m = trust.authenticate_release(manifest, root)  # raises: failures are not cached
        with self._lock:
            self._authentic[key] = m
            while len(self._authentic) > AUTHENTIC_CACHE:
                self._authentic.popitem(last=False)
        return m

    def rollout(self, payload: bytes, last_version: int) -> RolloutDoc:
        return trust.verify_rollout(
            payload,
            root=self.root(),
            time_floor=self._trust.time_floor,
            now=self.now(),
            last_version=last_version,
        )


def peek_app(manifest: bytes) -> str:
    """The app a manifest names, unverified (for routing and reports only)."""
    m = _peek(manifest)
    return "unknown" if m is None else str(m.app)


def peek_sequence(manifest: bytes) -> int | None:
    m = _peek(manifest)
    return None if m is None else m.sequence


@functools.lru_cache(maxsize=16)
def _peek(manifest: bytes) -> Manifest | None:
    """A release is peeked at several times on its way (routing, events): parse once."""
    try:
        return parse_manifest(manifest)
    except (UpdateError, ValueError):
        return None
