"""Capability ``wasi``: a minimal ``wasi_snapshot_preview1``.

Enough for ordinary C/Zig toolchains (printf, clock, random, exit): there
are no preopened directories, so no file is ever reachable; stdout and
stderr go to the app's log line by line (stdout at info, stderr at
warning); stdin is empty. Functions return WASI errno values, not the
devicerunner codes (EFAULT for out-of-bounds pointers).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from typing import Any

from hostfuncs.clock import monotonic_ns
from hostfuncs.context import AppContext
from hostfuncs.registry import hostfunc

SUCCESS = 0
EBADF = 8
EFAULT = 21
EINVAL = 28
ESPIPE = 70
MAX_IOVS = 1024
MAX_WRITE = 64 * 1024
MAX_RANDOM = 64 * 1024
MAX_PENDING_LINE = 1024
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_STDIO_LEVEL = {1: logging.INFO, 2: logging.WARNING}


class AppExit(Exception):
    """The app called proc_exit: its current call ends as a trap."""

    def __init__(self, code: int) -> None:
        super().__init__(f"app called proc_exit({code})")
        self.code = code


_ERRNO = "errno: 0 success"


def _wasi(
    name: str,
    params: tuple[str, ...],
    results: tuple[str, ...] = ("i32",),
    *,
    args: dict[str, str],
    returns: str = _ERRNO,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return hostfunc("wasi", name, params, results, args=args, returns=returns, on_bounds=EFAULT)


def _emit(ctx: AppContext, fd: int, data: bytes) -> None:
    buf = ctx.stdio_buffers.setdefault(fd, bytearray())
    buf += data
    while True:
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > MAX_PENDING_LINE:  # a runaway line is cut, not hoarded
                nl = MAX_PENDING_LINE
            else:
                return
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        ctx.emit_log(_STDIO_LEVEL[fd], line.decode("utf-8", "replace"))


@_wasi(
    "fd_write",
    ("i32", "i32", "i32", "i32"),
    args={
        "fd": "1 stdout (logged at info) or 2 stderr (warning), a line per `\\n`",
        "iovs": "address of `iovs_len` (ptr u32, len u32) pairs",
        "iovs_len": "how many pairs (at most 1,024; 64 KiB in all)",
        "nwritten_ptr": "address of a u32 that receives the bytes written",
    },
    returns=_ERRNO + ", 8 EBADF (other fd), 28 EINVAL, 21 EFAULT",
)
def fd_write(ctx: AppContext, fd: int, iovs: int, iovs_len: int, nwritten_ptr: int) -> int:
    """stdout/stderr into the app log; any other fd is EBADF."""
    if fd not in _STDIO_LEVEL:
        return EBADF
    if not 0 <= iovs_len <= MAX_IOVS:
        return EINVAL
    raw = ctx.memory.read(iovs, iovs_len * 8)
    total = 0
    chunks = []
    for i in range(iovs_len):
        ptr, length = struct.unpack_from("<II", raw, i * 8)
        if total + length > MAX_WRITE:
            return EINVAL
        chunks.append(ctx.memory.read(ptr, length))
        total += length
    ctx.memory.write(nwritten_ptr, _U32.pack(total))
    _emit(ctx, fd, b"".join(chunks))
    return SUCCESS


@_wasi(
    "fd_read",
    ("i32", "i32", "i32", "i32"),
    args={
        "fd": "0 stdin",
        "iovs": "address of (ptr, len) pairs (unused: nothing is read)",
        "iovs_len": "how many pairs",
        "nread_ptr": "address of a u32 that receives 0",
    },
    returns=_ERRNO + " (end of file), 8 EBADF",
)
def fd_read(ctx: AppContext, fd: int, iovs: int, iovs_len: int, nread_ptr: int) -> int:
    """stdin is empty (reads 0 bytes); any other fd is EBADF."""
    if fd != 0:
        return EBADF
    ctx.memory.write(nread_ptr, _U32.pack(0))
    return SUCCESS


@_wasi("fd_close", ("i32",), args={"fd": "a file descriptor"}, returns=_ERRNO + " for 0..2, 8 EBADF")
def fd_close(ctx: AppContext, fd: int) -> int:
    """Closing stdio succeeds and does nothing; other fds are EBADF."""
    return SUCCESS if 0 <= fd <= 2 else EBADF


@_wasi(
    "fd_seek",
    ("i32", "i64", "i32", "i32"),
    args={"fd": "a file descriptor", "offset": "unused", "whence": "unused", "out_ptr": "unused"},
    returns="70 ESPIPE for 0..2, 8 EBADF",
)
def fd_seek(ctx: AppContext, fd: int, offset: int, whence: int, out_ptr: int) -> int:
    """stdio is not seekable (ESPIPE)."""
    return ESPIPE if 0 <= fd <= 2 else EBADF


@_wasi(
    "fd_fdstat_get",
    ("i32", "i32"),
    args={"fd": "a file descriptor", "out_ptr": "address of a 24-byte fdstat"},
    returns=_ERRNO + ", 8 EBADF",
)
def fd_fdstat_get(ctx: AppContext, fd: int, out_ptr: int) -> int:
    """stdio reports a character device; other fds are EBADF."""
    if not 0 <= fd <= 2:
        return EBADF
    # filetype u8 (2 = character device), flags u16, rights_base u64, rights_inheriting u64
    ctx.memory.write(out_ptr, struct.pack("<BxHxxxxQQ", 2, 0, (1 << 64) - 1, (1 << 64) - 1))
    return SUCCESS


@_wasi(
    "fd_prestat_get",
    ("i32", "i32"),
    args={"fd": "a file descriptor", "out_ptr": "unused"},
    returns="8 EBADF",
)
def fd_prestat_get(ctx: AppContext, fd: int, out_ptr: int) -> int:
    """There are no preopened directories: always EBADF (ends libc's scan)."""
    return EBADF


@_wasi(
    "fd_prestat_dir_name",
    ("i32", "i32", "i32"),
    args={"fd": "a file descriptor", "ptr": "unused", "length": "unused"},
    returns="8 EBADF",
)
def fd_prestat_dir_name(ctx: AppContext, fd: int, ptr: int, length: int) -> int:
    """No preopened directories: EBADF."""
    return EBADF


@_wasi(
    "environ_sizes_get",
    ("i32", "i32"),
    args={"count_ptr": "address of a u32 that receives 0", "size_ptr": "address of a u32 that receives 0"},
)
def environ_sizes_get(ctx: AppContext, count_ptr: int, size_ptr: int) -> int:
    """The environment is empty."""
    ctx.memory.write(count_ptr, _U32.pack(0))
    ctx.memory.write(size_ptr, _U32.pack(0))
    return SUCCESS


@_wasi("environ_get", ("i32", "i32"), args={"environ_ptr": "unused", "buf_ptr": "unused"})
def environ_get(ctx: AppContext, environ_ptr: int, buf_ptr: int) -> int:
    """The environment is empty."""
    return SUCCESS


@_wasi(
    "args_sizes_get",
    ("i32", "i32"),
    args={"count_ptr": "address of a u32 that receives 0", "size_ptr": "address of a u32 that receives 0"},
)
def args_sizes_get(ctx: AppContext, count_ptr: int, size_ptr: int) -> int:
    """There are no arguments."""
    ctx.memory.write(count_ptr, _U32.pack(0))
    ctx.memory.write(size_ptr, _U32.pack(0))
    return SUCCESS


@_wasi("args_get", ("i32", "i32"), args={"argv_ptr": "unused", "buf_ptr": "unused"})
def args_get(ctx: AppContext, argv_ptr: int, buf_ptr: int) -> int:
    """There are no arguments."""
    return SUCCESS


@_wasi(
    "clock_time_get",
    ("i32", "i64", "i32"),
    args={
        "clock_id": "0 realtime; any other id monotonic (never 0)",
        "precision": "ignored",
        "out_ptr": "address of a u64 that receives nanoseconds",
    },
)
def clock_time_get(ctx: AppContext, clock_id: int, precision: int, out_ptr: int) -> int:
    """Realtime (id 0) or monotonic (any other id), in nanoseconds."""
    ns = ctx.clock.wall_ms() * 1_000_000 if clock_id == 0 else monotonic_ns(ctx)
    ctx.memory.write(out_ptr, _U64.pack(ns & ((1 << 64) - 1)))
    return SUCCESS


@_wasi(
    "random_get",
    ("i32", "i32"),
    args={"ptr": "address of the buffer", "length": "bytes to fill (at most 65,536)"},
    returns=_ERRNO + ", 28 EINVAL (too long), 21 EFAULT",
)
def random_get(ctx: AppContext, ptr: int, length: int) -> int:
    """Fill the buffer from the OS CSPRNG (at most 64 KiB a call)."""
    length &= 0xFFFFFFFF
    if length > MAX_RANDOM:
        return EINVAL
    ctx.memory.write(ptr, os.urandom(length))
    return SUCCESS


@_wasi("sched_yield", (), args={})
def sched_yield(ctx: AppContext) -> int:
    """Does nothing: apps are scheduled by ticks."""
    return SUCCESS


@_wasi("proc_exit", ("i32",), (), args={"code": "the exit status"}, returns="does not return")
def proc_exit(ctx: AppContext, code: int) -> None:
    """Ends the current call as a trap naming the exit code (one log line, no traceback)."""
    raise AppExit(code)


@_wasi(
    "fd_fdstat_set_flags",
    ("i32", "i32"),
    args={"fd": "a file descriptor", "flags": "fdflags (e.g. 4 NONBLOCK)"},
    returns=_ERRNO + " for 0..2 (nothing changes: stdio never blocks), 8 EBADF",
)
def fd_fdstat_set_flags(ctx: AppContext, fd: int, flags: int) -> int:
    """Accepted and ignored for stdio (Go's runtime sets O_NONBLOCK on it)."""
    return SUCCESS if 0 <= fd <= 2 else EBADF


_SUBSCRIPTION = struct.Struct("<QB7xIxxxxQQH6x")  # userdata, tag, clock id, timeout, precision, flags
_SUB_FD = struct.Struct("<QB7xI")  # userdata, tag, fd
_EVENT = struct.Struct("<QHBxxxxxQH6x")  # userdata, error, type, nbytes, flags
MAX_SUBSCRIPTIONS = 64
_EVENTTYPE_CLOCK, _EVENTTYPE_FD_READ, _EVENTTYPE_FD_WRITE = 0, 1, 2


@_wasi(
    "poll_oneoff",
    ("i32", "i32", "i32", "i32"),
    args={
        "in_ptr": "address of `nsubscriptions` subscriptions (48 bytes each)",
        "out_ptr": "address of room for as many events (32 bytes each)",
        "nsubscriptions": "how many (1..64)",
        "nevents_ptr": "address of a u32 that receives the number of events",
    },
    returns=_ERRNO + ", 28 EINVAL (0 or more than 64 subscriptions), 21 EFAULT",
)
def poll_oneoff(ctx: AppContext, in_ptr: int, out_ptr: int, nsubscriptions: int, nevents_ptr: int) -> int:
    """Never waits: clock subscriptions fire at once (a sleep inside a tick
    returns immediately), stdio is always ready, other fds get EBADF."""
    n = nsubscriptions & 0xFFFFFFFF
    if not 0 < n <= MAX_SUBSCRIPTIONS:
        return EINVAL
    raw = ctx.memory.read(in_ptr, n * _SUBSCRIPTION.size)
    events = bytearray()
    for i in range(n):
        userdata, tag, fd = _SUB_FD.unpack_from(raw, i * _SUBSCRIPTION.size)
        if tag == _EVENTTYPE_CLOCK:
            events += _EVENT.pack(userdata, SUCCESS, tag, 0, 0)
        elif tag in (_EVENTTYPE_FD_READ, _EVENTTYPE_FD_WRITE):
            ok = fd == 0 if tag == _EVENTTYPE_FD_READ else fd in _STDIO_LEVEL
            events += _EVENT.pack(userdata, SUCCESS if ok else EBADF, tag, 0, 0)
        else:
            events += _EVENT.pack(userdata, EINVAL, tag, 0, 0)
    ctx.memory.write(out_ptr, bytes(events))
    ctx.memory.write(nevents_ptr, _U32.pack(n))
    return SUCCESS
