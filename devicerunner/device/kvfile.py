"""Persistence for app kv stores: one snapshot file per app, written atomically,
and a flusher (a timer on a work lane) so host calls never wait on the disk."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from devicerunner.runtime.fsutil import atomic_write, makedirs
from devicerunner.runtime.lanes import Lane, Timer
from hostfuncs.kv import KvCorruptError, KvStore

log = logging.getLogger(__name__)
SNAPSHOT = "data.json"


class FileKvBackend:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def load(self) -> bytes | None:
        try:
            return (self.directory / SNAPSHOT).read_bytes()
        except FileNotFoundError:
            return None

    def save(self, data: bytes) -> None:
        makedirs(self.directory)
        atomic_write(self.directory / SNAPSHOT, data, mode=0o600)


def open_store(directory: Path, quota_bytes: int) -> KvStore:
    """The app's store; a corrupt snapshot is set aside (kept for inspection), not fatal."""
    backend = FileKvBackend(directory)
    try:
        return KvStore(quota_bytes, backend)
    except KvCorruptError as e:
        bad = directory / SNAPSHOT
        log.error("kv store %s unreadable (%s); moved to %s.corrupt, starting empty", bad, e, bad)
        bad.replace(bad.with_suffix(".corrupt"))
        return KvStore(quota_bytes, backend)


class KvFlusher:
    """Persists dirty stores on its lane, at most ``interval_s`` after the
    first change: a timer armed by the change, not a poll (a thousand idle
    simulated devices must not wake up twice a second for nothing)."""

    def __init__(self, lane: Lane, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.stores: list[KvStore] = []
        self._lane = lane
        self._lock = threading.Lock()
        self._timer: Timer | None = None
        self._started = False

    def add(self, store: KvStore) -> None:
        self.stores.append(store)
        store.on_dirty = self._changed

    def start(self) -> None:
        self._started = True
        if any(s.dirty for s in self.stores):
            self._changed()

    def _changed(self) -> None:
        with self._lock:
            if self._started and self._timer is None:
                self._timer = self._lane.call_later(self.interval_s, self._flush_due)

    def _flush_due(self) -> None:
        with self._lock:
            self._timer = None
        self.flush_all()
        if any(s.dirty for s in self.stores):  # changed while saving, or a failed save: again later
            self._changed()

    def flush_all(self) -> None:
        for s in list(self.stores):
            try:
                s.flush()
            except OSError as e:
                log.error("kv flush failed (will retry): %s", e)

    def stop(self) -> None:
        with self._lock:
            self._started = False
            if self._timer is not None:
                self._timer.cancel()
        self._lane.close(5)
        self.flush_all()
