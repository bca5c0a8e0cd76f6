"""Text from outside going into the device log: escaped, and repeats rate-limited.

What this module owns:
- ``escape_controls``: app-supplied (or peer-supplied) text can neither start a
  new log line nor drive a terminal. Every C0 control, DEL, C1 control, the
  Unicode line/paragraph separators and the bidirectional overrides become a
  visible escape (``\\n``, ``\\x1b``, ``\\u2028``); printable text, including
  backslashes, is kept as is. The result has no line break of any kind
  (``str.splitlines`` returns one line).
- ``LogLimiter``: the same failure repeated (a trap storm, a disk that refuses
  every write) is logged at most once per interval per key; the next line let
  through says how many were suppressed. Keys are bounded (the least recently
  used is forgotten first), so a stream of distinct keys cannot grow memory.

It never blocks and never raises on odd input.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(m: re.Match[str]) -> str:
    ch = m.group()
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with every control or line-breaking character made visible."""
    return _UNSAFE.sub(_escape_one, text)


class LogLimiter:
    """At most one line per ``interval_s`` per key, counting the suppressed ones.

    ``limiter.log(logging.WARNING, ("app", name, "trap"), "app %s: %s", name, msg)``
    logs the first occurrence at once; repeats within the interval are counted,
    and the next line let through ends with "(N similar suppressed)"."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        *,
        max_keys: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.max_keys = max_keys
        self.suppressed_total = 0
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()
        """key -> (when its last line was let through, suppressed since)"""

    def log(self, level: int, key: Hashable, msg: str, *args: object) -> bool:
        """Log unless ``key`` was logged less than ``interval_s`` ago; True if logged."""
        now = self._clock()
        with self._lock:
            last = self._keys.get(key)
            if last is not None and now - last[0] < self.interval_s:
                self._keys[key] = (last[0], last[1] + 1)
                self._keys.move_to_end(key)
                self.suppressed_total += 1
                return False
            suppressed = 0 if last is None else last[1]
            self._keys[key] = (now, 0)
            self._keys.move_to_end(key)
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        if suppressed:
            msg = f"{msg} (%d similar suppressed in the last %.0f s)"
            args = (*args, suppressed, now - last[0] if last else 0.0)
        self.logger.log(level, msg, *args)
        return True

    def forget(self, key: Hashable) -> None:
        """The condition behind ``key`` is over (say, a write succeeded again):
        its next occurrence is logged at once."""
        with self._lock:
            self._keys.pop(key, None)
