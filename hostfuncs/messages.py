"""Capability ``messages``: cloud-to-app messages, pulled by the app between ticks.

An operator publishes to ``{p}/devices/{id}/apps/{app}/in/{topic}`` (one
device) or ``{p}/apps/{app}/in/{topic}`` (every device running the app);
the device's transport puts each message into that app's ``Inbox`` and
the app takes them with ``messages.next`` during its own ``dr_tick``.

Why a pull host function and not a ``dr_message`` export the scheduler
calls: the app decides when and how many messages it handles, inside a
tick whose CPU budget, trap and overrun accounting already exist; the
scheduler gains no new kind of call (a message flood cannot buy an app
extra calls, or starve another app's ticks); and an app that does not
care about messages needs no new export. Replies go out via ``telemetry``.

Invariants:
- The inbox belongs to the app, not to an instance: an update or a config
  trial keeps queued messages.
- Every bound is checked before anything is kept: topic suffix length,
  payload size, a per-app token bucket on arrivals, and the queue depth
  (full: the *oldest* message is dropped, so the newest command wins).
  Each drop is counted by cause and shown in the device status.
- ``put`` (transport lane) and ``next`` (scheduler lane) never wait: one
  short lock around a deque.
- A message whose buffers are too small stays queued; nothing is lost.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from dataclasses import dataclass

from hostfuncs import codes
from hostfuncs.context import AppContext
from hostfuncs.memory import check_range
from hostfuncs.ratelimit import TokenBucket
from hostfuncs.registry import hostfunc

MAX_PAYLOAD = 4096
MAX_TOPIC = 128
"""The topic suffix after ``.../in/`` (UTF-8 bytes)."""
DEFAULT_DEPTH = 32
DEFAULT_RATE_PER_S = 20.0
DEFAULT_BURST = 40
TOPIC_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    """The suffix after ``in/``, e.g. ``valve/open``."""
    payload: bytes
    broadcast: bool
    """True when sent to every device running the app, False to this device only."""


@dataclass
class InboxStats:
    received: int = 0
    delivered: int = 0
    dropped_full: int = 0
    dropped_rate: int = 0
    dropped_invalid: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "received": self.received,
            "delivered": self.delivered,
            "dropped_full": self.dropped_full,
            "dropped_rate": self.dropped_rate,
            "dropped_invalid": self.dropped_invalid,
        }


class Inbox:
    """One app's bounded message queue (any thread puts, the app takes)."""

    def __init__(
        self,
        now_s: float,
        depth: int = DEFAULT_DEPTH,
        rate_per_s: float = DEFAULT_RATE_PER_S,
        burst: int = DEFAULT_BURST,
    ) -> None:
        self._q: deque[Message] = deque()
        self.depth = depth
        self._bucket = TokenBucket(rate_per_s, burst, now_s)
        self._lock = threading.Lock()
        self.stats = InboxStats()

    def put(self, topic: str, payload: bytes, broadcast: bool, now_s: float) -> str | None:
        """Queue a message; None, or why it was dropped (``invalid``, ``rate``;
        a full queue drops the oldest and keeps this one)."""
        with self._lock:
            self.stats.received += 1
            if len(payload) > MAX_PAYLOAD or len(topic.encode()) > MAX_TOPIC or not TOPIC_RE.match(topic):
                self.stats.dropped_invalid += 1
                return "invalid"
            if not self._bucket.take(now_s):
                self.stats.dropped_rate += 1
                return "rate"
            if len(self._q) >= self.depth:
                self._q.popleft()
                self.stats.dropped_full += 1
            self._q.append(Message(topic, bytes(payload), broadcast))
            return None

    def peek(self) -> Message | None:
        with self._lock:
            return self._q[0] if self._q else None

    def take(self, expect: Message) -> None:
        """Remove ``expect`` if it is still the head (the app has copied it)."""
        with self._lock:
            if self._q and self._q[0] is expect:
                self._q.popleft()
                self.stats.delivered += 1

    def __len__(self) -> int:
        return len(self._q)


def _inbox(ctx: AppContext) -> Inbox:
    inbox = ctx.inbox
    assert isinstance(inbox, Inbox)  # the linker only defines these when granted
    return inbox


@hostfunc(
    "messages",
    "pending",
    (),
    ("i32",),
    args={},
    returns="how many messages are queued for this app now (at most the queue depth, 32 by default)",
)
def pending(ctx: AppContext) -> int:
    """Number of messages waiting for this app."""
    return len(_inbox(ctx))


@hostfunc(
    "messages",
    "next",
    ("i32", "i32", "i32", "i32"),
    ("i32",),
    args={
        "buf_ptr": "where to write the payload (any bytes, at most 4,096)",
        "buf_len": "capacity of the payload buffer in bytes",
        "topic_ptr": "where to write the topic after `.../in/` (ASCII), followed by a NUL byte",
        "topic_len": "capacity of the topic buffer in bytes (the topic is at most 128, plus the NUL)",
    },
    returns="the payload's length in bytes (the message is taken); ERR_NOT_FOUND (no message "
    "waiting), ERR_BUF_TOO_SMALL (either buffer; the message stays queued), ERR_BOUNDS (nothing taken)",
)
def next_(ctx: AppContext, buf_ptr: int, buf_len: int, topic_ptr: int, topic_len: int) -> int:
    """Take the oldest message: payload at buf, topic + NUL at topic; its length or ERR_NOT_FOUND.

    The topic is the suffix after ``in/``. Too small a buffer leaves the
    message queued; ERR_NOT_FOUND means the queue is empty."""
    inbox = _inbox(ctx)
    msg = inbox.peek()
    if msg is None:
        return codes.ERR_NOT_FOUND
    size = ctx.memory.size()
    buf_ptr, buf_len = check_range(buf_ptr, buf_len, size)
    topic_ptr, topic_len = check_range(topic_ptr, topic_len, size)
    topic = msg.topic.encode() + b"\0"
    if len(msg.payload) > buf_len or len(topic) > topic_len:
        return codes.ERR_BUF_TOO_SMALL
    ctx.memory.write(buf_ptr, msg.payload)
    ctx.memory.write(topic_ptr, topic)
    inbox.take(msg)
    return len(msg.payload)
