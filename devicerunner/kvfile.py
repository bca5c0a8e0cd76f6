"""Persistence for app kv stores: one snapshot file per app, written atomically,
and a flusher thread so host calls never wait on the disk."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from devicerunner.fsutil import atomic_write, makedirs
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
    """Persists dirty stores every ``interval_s`` on its own thread."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.stores: list[KvStore] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-flusher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def flush_all(self) -> None:
        for s in list(self.stores):
            try:
                s.flush()
            except OSError as e:
                log.error("kv flush failed (will retry): %s", e)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.flush_all()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush_all()
