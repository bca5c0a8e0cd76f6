"""Capability ``telemetry``: apps publish small named payloads to an outbox.

The MQTT transport drains the outbox to
``{prefix}/devices/{id}/telemetry/{app}/{name}``. Invariants: the outbox is
bounded (oldest dropped and counted when full), payloads and names are
bounded, each app is rate-limited, and publishing never waits.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from hostfuncs import codes
from hostfuncs.context import AppContext
from hostfuncs.ratelimit import TokenBucket
from hostfuncs.registry import hostfunc

MAX_NAME = 64
MAX_PAYLOAD = 4096
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True, slots=True)
class TelemetryMessage:
    app: str
    name: str
    payload: bytes
    wall_ms: int


class Outbox:
    def __init__(self, capacity: int = 1000) -> None:
        self._q: deque[TelemetryMessage] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self.dropped = 0
        self.on_first: Callable[[], None] | None = None
        """Called (on the putting thread; must not block) when a message
        arrives in an empty outbox: the drainer need not poll."""

    def put(self, msg: TelemetryMessage) -> None:
        with self._lock:
            was_empty = not self._q
            if len(self._q) == self._q.maxlen:
                self.dropped += 1
            self._q.append(msg)
        if was_empty and self.on_first is not None:
            self.on_first()

    def drain(self, max_n: int = 1000) -> list[TelemetryMessage]:
        with self._lock:
            n = min(max_n, len(self._q))
            return [self._q.popleft() for _ in range(n)]

    def __len__(self) -> int:
        return len(self._q)


@dataclass
class TelemetryGrant:
    """An app's handle on the device outbox, with its own rate limit."""

    outbox: Outbox
    bucket: TokenBucket


@hostfunc(
    "telemetry",
    "publish",
    ("i32", "i32", "i32", "i32"),
    ("i32",),
    args={
        "nptr": "address of the message name (ASCII `[A-Za-z0-9_.-]`)",
        "nlen": "the name's length in bytes (1..64)",
        "pptr": "address of the payload (any bytes; usually JSON)",
        "plen": "the payload's length in bytes (at most 4,096)",
    },
    returns="0 (queued in the outbox; sent when connected); ERR_RATE_LIMITED (dropped), "
    "ERR_TOO_LARGE, ERR_INVALID (bad name), ERR_BOUNDS",
)
def publish(ctx: AppContext, nptr: int, nlen: int, pptr: int, plen: int) -> int:
    """Queue payload under name ([A-Za-z0-9_.-]{1,64}). 0, ERR_RATE_LIMITED, ERR_TOO_LARGE."""
    grant = ctx.telemetry
    assert isinstance(grant, TelemetryGrant)
    if nlen & 0xFFFFFFFF > MAX_NAME or plen & 0xFFFFFFFF > MAX_PAYLOAD:
        return codes.ERR_TOO_LARGE
    try:
        name = ctx.memory.read(nptr, nlen).decode("ascii")
    except UnicodeDecodeError:
        return codes.ERR_INVALID
    if not NAME_RE.fullmatch(name):
        return codes.ERR_INVALID
    payload = ctx.memory.read(pptr, plen)
    if not grant.bucket.take(ctx.clock.monotonic_s()):
        ctx.stats.telemetry_dropped += 1
        return codes.ERR_RATE_LIMITED
    grant.outbox.put(TelemetryMessage(ctx.app, name, payload, ctx.clock.wall_ms()))
    ctx.stats.telemetry_sent += 1
    return codes.OK
