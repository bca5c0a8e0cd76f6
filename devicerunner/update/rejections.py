"""What this device refused, remembered by the manifest's digest.

A refusal is evidence about one document -- these exact bytes, delivered
this way, judged at this time -- never about a sequence number: an artifact
or chunk that did not match, a manifest delivered on a topic or channel it
was not signed for, an expiry judged by a clock, an I/O error or a stalled
download says nothing about the genuine release that carries the same
sequence. So nothing here ever stops a later delivery from being processed
afresh; the memory exists to report (status, events) and to say a repeated
refusal once instead of on every reconnect.

Only a trial that this device ran and rolled back burns a sequence
(``AppState.bad_sequences``, written by the updater's rollback).

Bounded: at most ``max_entries`` digests, least recently refused evicted
first (``evicted`` counts them). In memory only: a restart forgets it (a
refusal is cheap to repeat; what must survive a power cut lives in
state.json). Pure apart from its lock: the caller passes ``now``.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

MAX_ENTRIES = 256
MAX_TEXT = 300


def digest(document: bytes) -> str:
    return hashlib.sha256(document).hexdigest()


@dataclass
class Rejection:
    digest: str
    app: str
    sequence: int | None
    reason: str
    text: str
    source: str
    first_ts: float
    last_ts: float
    count: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Rejections:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[str, Rejection] = OrderedDict()
        self._lock = threading.Lock()
        self.noted = 0
        self.repeats = 0
        self.evicted = 0

    def note(
        self,
        doc_digest: str,
        *,
        app: str,
        sequence: int | None,
        reason: str,
        text: str,
        source: str,
        now: float,
    ) -> bool:
        """Remember one refusal; True if it is news (this digest was not
        refused for this reason before, as far as the memory reaches)."""
        with self._lock:
            self.noted += 1
            old = self._items.get(doc_digest)
            if old is not None and old.reason == reason:
                old.count += 1
                old.last_ts = now
                self._items.move_to_end(doc_digest)
                self.repeats += 1
                return False
            self._items[doc_digest] = Rejection(
                doc_digest, app, sequence, reason, text[:MAX_TEXT], source, now, now
            )
            self._items.move_to_end(doc_digest)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
                self.evicted += 1
            return True

    def get(self, doc_digest: str) -> Rejection | None:
        with self._lock:
            return self._items.get(doc_digest)

    def recent(self, n: int = 10) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self._items.values())[-n:]
        return [r.to_dict() for r in reversed(items)]

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "remembered": len(self._items),
                "noted": self.noted,
                "repeats": self.repeats,
                "evicted": self.evicted,
            }
