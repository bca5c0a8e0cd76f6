"""Persistence for app kv stores: one snapshot file per app, written atomically,
and a flusher (a timer on a work lane) so host calls never wait on the disk.

Invariants (flash wear and a failing disk):
- At most one snapshot write per store per ``interval_s`` (``[device]
  kv_flush_interval_s``, default 5 s), however often the app writes; a clean
  stop writes whatever is still dirty. An unchanged store is never rewritten
  (hostfuncs.kv).
- A failing write (read-only or full disk) is retried with capped exponential
  backoff (up to MAX_RETRY_S), not at the flush rate, and logged once per
  LOG_EVERY_S with a count of the failures in between.
- A snapshot file is read only if it is no larger than the quota allows
  (``max_snapshot_bytes``); a bigger or unparsable one is set aside as
  ``data.corrupt`` and the app starts with an empty store, logged.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from devicerunner.runtime.fsutil import atomic_write, makedirs
from devicerunner.runtime.lanes import Lane, Timer
from hostfuncs.kv import KvCorruptError, KvStore, max_snapshot_bytes
from hostfuncs.logsafe import LogLimiter

log = logging.getLogger(__name__)
SNAPSHOT = "data.json"
FLUSH_INTERVAL_S = 5.0
MAX_RETRY_S = 300.0
LOG_EVERY_S = 60.0


class FileKvBackend:
    def __init__(self, directory: Path, max_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes

    def load(self) -> bytes | None:
        try:
            with open(self.directory / SNAPSHOT, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if self.max_bytes is not None and size > self.max_bytes:
                    # checked before reading: a planted 1 GB file must not be read into RAM
                    raise KvCorruptError(f"kv snapshot is {size} bytes, more than {self.max_bytes}")
                return f.read()
        except FileNotFoundError:
            return None

    def save(self, data: bytes) -> None:
        makedirs(self.directory)
        atomic_write(self.directory / SNAPSHOT, data, mode=0o600)


def open_store(directory: Path, quota_bytes: int) -> KvStore:
    """The app's store; a corrupt snapshot is set aside (kept for inspection), not fatal."""
    backend = FileKvBackend(directory, max_snapshot_bytes(quota_bytes))
    try:
        return KvStore(quota_bytes, backend)
    except KvCorruptError as e:
        bad = directory / SNAPSHOT
        log.error("kv store %s unreadable (%s); moved to %s.corrupt, starting empty", bad, e, bad)
        bad.replace(bad.with_suffix(".corrupt"))
        return KvStore(quota_bytes, backend)


class KvFlusher:
    """Persists dirty stores on its lane, at most once per ``interval_s``: a
    timer armed by the first change after a flush, not a poll (a thousand idle
    simulated devices must not wake up for nothing), and not a write per change
    (flash wear)."""

    def __init__(self, lane: Lane, interval_s: float = FLUSH_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.stores: list[KvStore] = []
        self.failures = 0
        """Consecutive failed flushes (0 after a success)."""
        self._lane = lane
        self._lock = threading.Lock()
        self._timer: Timer | None = None
        self._started = False
        self._limiter = LogLimiter(log, LOG_EVERY_S)

    def add(self, store: KvStore) -> None:
        self.stores.append(store)
        store.on_dirty = self._changed

    def start(self) -> None:
        self._started = True
        if any(s.dirty for s in self.stores):
            self._changed()

    def _delay_s(self) -> float:
        if not self.failures:
            return self.interval_s
        return min(MAX_RETRY_S, self.interval_s * float(2**self.failures))

    def _changed(self) -> None:
        with self._lock:
            if self._started and self._timer is None:
                self._timer = self._lane.call_later(self._delay_s(), self._flush_due)

    def _flush_due(self) -> None:
        with self._lock:
            self._timer = None
        self.flush_all()
        if any(s.dirty for s in self.stores):  # changed while saving, or a failed save: again later
            self._changed()

    def flush_all(self) -> bool:
        """Write every dirty store; False if one failed (it stays dirty)."""
        ok = True
        for s in list(self.stores):
            try:
                s.flush()
            except OSError as e:
                ok = False
                self._limiter.log(logging.ERROR, "flush", "kv flush failed (will retry with backoff): %s", e)
        if ok:
            if self.failures:
                log.info("kv flush works again after %d failed attempt(s)", self.failures)
                self._limiter.forget("flush")
            self.failures = 0
        else:
            self.failures = min(self.failures + 1, 30)
        return ok

    def stop(self) -> None:
        with self._lock:
            self._started = False
            if self._timer is not None:
                self._timer.cancel()
        self._lane.close(5)
        self.flush_all()
