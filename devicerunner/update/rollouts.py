"""Staged rollouts on the device: which signed rollout document holds per
app, and releases waiting until the rollout reaches this device.

A document is accepted only if it verifies (rollout role, unexpired) and is
newer than the last one accepted for the app; the last accepted one is kept
in ``apps/<app>/rollout.json`` (its version is the replay floor across
reboots) and verified again when read back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from devicerunner.errors import RollbackError, VerificationError
from devicerunner.runtime.fsutil import atomic_write, makedirs
from devicerunner.runtime.statefile import read_bounded
from devicerunner.trust import verify as trust
from devicerunner.trust.manifest import MAX_ROLLOUT_BYTES, Manifest, RolloutDoc
from devicerunner.update.verification import Verifier

log = logging.getLogger(__name__)

ROLLOUT_FILE = "rollout.json"
"""The last accepted rollout document of an app (its version is the replay floor)."""


class RolloutGate:
    def __init__(
        self,
        state_dir: Path,
        device_id: str,
        apps: Iterable[str],
        verifier: Verifier,
        refuse: Callable[[str, bytes, VerificationError, str], None],
    ) -> None:
        """``refuse(app, document, error, what)``: report a refused document
        (the updater's refusal memory: once per digest, rate-limited)."""
        self._dir = Path(state_dir) / "apps"
        self._device_id = device_id
        self._apps = frozenset(apps)
        self._verifier = verifier
        self._refuse = refuse
        self.documents: dict[str, RolloutDoc] = {}
        self.waiting: dict[str, Manifest] = {}
        """app -> a verified release this device is not (yet) in the rollout of."""
        self.counts = {"accepted": 0, "stale": 0, "refused": 0}
        """Rollout documents received, by outcome (counted once decided)."""

    def path(self, app: str) -> Path:
        return self._dir / app / ROLLOUT_FILE

    def eligible(self, m: Manifest) -> bool:
        """Is this device in the release's rollout (stable hash of id and salt)?"""
        return trust.eligible(self._device_id, m, self.documents.get(m.app))

    def restore(self) -> None:
        """The last rollout document accepted per app, verified again (a stored
        file is not trusted more than a message)."""
        for app in self._apps:
            try:  # bounded before reading: the verifier refuses larger ones anyway
                payload = read_bounded(self.path(app), MAX_ROLLOUT_BYTES)
            except (OSError, ValueError) as e:
                log.warning("rollout document for %s unreadable: %s", app, e)
                continue
            if payload is None:
                continue
            try:
                doc = self._verifier.rollout(payload, last_version=0)
            except VerificationError as e:
                log.info("stored rollout document for %s no longer applies: %s", app, e)
                continue
            if doc.app == app:
                self.documents[app] = doc

    def on_document(self, app: str, payload: bytes) -> Manifest | None:
        """A rollout document arrived for ``app``: accept it if it verifies and
        is newer. Returns a waiting release this device is now in, if any."""
        if not payload or app not in self._apps:
            return None
        current = self.documents.get(app)
        try:
            doc = self._verifier.rollout(payload, current.version if current else 0)
        except RollbackError:
            self.counts["stale"] += 1
            return None  # the same (or an older) document again: nothing new
        except VerificationError as e:
            self._refuse(app, payload, e, "rollout document")  # anyone can publish: once, rate-limited
            self.counts["refused"] += 1
            return None
        if doc.app != app:
            self.counts["refused"] += 1
            return None
        self.documents[app] = doc
        self.counts["accepted"] += 1
        try:  # kept across reboots: a replayed older document stays refused
            makedirs(self.path(app).parent)
            atomic_write(self.path(app), payload)
        except OSError as e:
            log.warning("rollout document for %s not persisted: %s", app, e)
        waiting = self.waiting.get(app)
        if waiting is not None and self.eligible(waiting):
            del self.waiting[app]
            log.info("rollout of %s sequence %d reached this device (%d%%)", app, doc.sequence, doc.percent)
            return waiting
        return None


def claimed_version(payload: bytes) -> int | None:
    """The ``version`` a (refused, so unverified) rollout document claims, if any."""
    try:
        v = json.loads(payload)["signed"]["version"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None
