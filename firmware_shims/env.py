"""What one device's drivers share: its serial ports, its sysfs root, its I/O worker."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from firmware_shims.serial_port import PortRegistry

log = logging.getLogger(__name__)


class IoWorker:
    """One thread per device that does the slow file I/O of sysfs drivers
    (polling sensors, writing actuators), so host calls never wait on it."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._pollers: list[tuple[float, Callable[[], None]]] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], None]) -> None:
        self._ensure()
        self._q.put(fn)

    def every(self, period_s: float, fn: Callable[[], None]) -> None:
        with self._lock:
            self._pollers.append((period_s, fn))
        self._ensure()
        self._q.put(fn)  # a first sample right away

    def _ensure(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="shim-io", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._q.put(None)
        if self._thread is not None:
            self._thread.join(2)

    def _run(self) -> None:
        import time

        due: dict[int, float] = {}
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                pollers = list(enumerate(self._pollers))
            wait = 1.0
            for i, (period, fn) in pollers:
                at = due.get(i, now + period)
                if at <= now:
                    self._safe(fn)
                    at = now + period
                due[i] = at
                wait = min(wait, at - now)
            try:
                job = self._q.get(timeout=max(0.0, wait))
            except queue.Empty:
                continue
            if job is None:
                break
            self._safe(job)

    @staticmethod
    def _safe(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("shim I/O job failed")


@dataclass
class ShimEnv:
    sysfs_root: Path = Path("/sys")
    ports: PortRegistry = field(default_factory=PortRegistry)
    io: IoWorker = field(default_factory=IoWorker)

    def close(self) -> None:
        self.io.stop()
        for p in self.ports.ports.values():
            p.stop()
