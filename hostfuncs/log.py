"""Capability ``log``: the app writes lines to the device log.

Lines are UTF-8 (invalid bytes replaced), at most MAX_LINE bytes (longer
ones are cut, not refused: a log is for people), rate-limited per app, and
one line each: control characters (newlines, ANSI escapes, C1 controls) are
shown escaped (``\n``, ``\x1b``), so an app cannot forge other log lines.
"""

from __future__ import annotations

import logging

from hostfuncs import codes
from hostfuncs.context import AppContext
from hostfuncs.registry import hostfunc

MAX_LINE = 1024
LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR}


@hostfunc(
    "log",
    "write",
    ("i32", "i32", "i32"),
    ("i32",),
    args={
        "level": "0 debug, 1 info, 2 warn, 3 error (anything else: ERR_INVALID, nothing logged)",
        "ptr": "address of the message (UTF-8; invalid bytes are replaced)",
        "length": "the message's length in bytes; past 1,024 it is cut",
    },
    returns="0; ERR_RATE_LIMITED (the line was dropped: 50 lines/s, bursts of 200), ERR_INVALID "
    "(bad level), ERR_BOUNDS",
)
def write(ctx: AppContext, level: int, ptr: int, length: int) -> int:
    """Log `length` bytes at `ptr`; level 0 debug, 1 info, 2 warn, 3 error. 0, or ERR_RATE_LIMITED."""
    lvl = LEVELS.get(level)
    if lvl is None:
        return codes.ERR_INVALID
    data = ctx.memory.read(ptr, min(length & 0xFFFFFFFF, MAX_LINE))
    ok = ctx.emit_log(lvl, data.decode("utf-8", "replace"))
    return codes.OK if ok else codes.ERR_RATE_LIMITED
