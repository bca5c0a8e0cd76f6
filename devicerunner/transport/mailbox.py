"""The handover from the I/O loop to a lane: bounded, newest-wins per key.

What the broker delivers is not queued message by message: a lane that
falls behind a flood would hold every message ever published. Instead each
message lands in a slot named by its key (for the device: its topic, i.e.
one (app, channel) release or rollout document, one trust-root topic, one
chunk); a message for a slot that is still waiting *replaces* the waiting
one (counted in ``replaced``), because only the newest document of a topic
can matter. At most ``max_keys`` slots wait at once; a message for a new
key beyond that is dropped (``dropped``). So what waits is bounded by
``max_keys`` times the largest packet the connection accepts.

Slots are handled in the order their keys first arrived, one at a time, as
one task on the lane at a time (never one task per message).

Thread-safe: ``put`` runs on the I/O loop thread, ``_drain`` on the lane.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

Post = Callable[[Callable[[], None]], object]
"""The lane's ``post`` (its result, e.g. False for a closed lane, is not needed:
a closed lane is a stopped device)."""
Handler = Callable[[str, bytes], None]


class Mailbox:
    def __init__(self, post: Post, handle: Handler, max_keys: int = 64, batch: int = 16) -> None:
        self._post = post
        self._handle = handle
        self.max_keys = max_keys
        self._batch = batch
        self._lock = threading.Lock()
        self._slots: dict[str, bytes] = {}
        self._scheduled = False
        self.accepted = 0
        self.replaced = 0
        self.dropped = 0
        self.peak_waiting = 0
        self._replaced_keys: set[str] = set()
        """Keys whose waiting message was replaced since ``take_replaced`` (<= max_keys)."""

    def put(self, key: str, payload: bytes) -> bool:
        """Hand one message over; False if it was dropped (too many keys waiting)."""
        with self._lock:
            if key in self._slots:
                self.replaced += 1
                self._replaced_keys.add(key)
            elif len(self._slots) >= self.max_keys:
                self.dropped += 1
                return False
            self._slots[key] = payload
            self.accepted += 1
            self.peak_waiting = max(self.peak_waiting, len(self._slots))
            if self._scheduled:
                return True
            self._scheduled = True
        self._post(self._drain)
        return True

    def take_replaced(self) -> set[str]:
        """Keys that had a waiting message replaced since the last call."""
        with self._lock:
            keys, self._replaced_keys = self._replaced_keys, set()
        return keys

    def waiting(self) -> int:
        with self._lock:
            return len(self._slots)

    def waiting_bytes(self) -> int:
        with self._lock:
            return sum(len(p) for p in self._slots.values())

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "accepted": self.accepted,
                "replaced": self.replaced,
                "dropped": self.dropped,
                "waiting": len(self._slots),
                "peak_waiting": self.peak_waiting,
            }

    def _drain(self) -> None:
        for _ in range(self._batch):
            with self._lock:
                if not self._slots:
                    self._scheduled = False
                    return
                key = next(iter(self._slots))
                payload = self._slots.pop(key)
            try:
                self._handle(key, payload)
            except Exception:
                log.exception("handling a message on %s failed", key)
        self._post(self._drain)  # more waiting: let the lane's other tasks run first
