"""Crash-safe file writes.

Invariant: after ``atomic_write(path, data)`` returns, ``path`` holds exactly
``data`` and survives a power cut; if it raises or the power fails first,
``path`` holds its previous content (or does not exist). The sequence is the
one every state write in this project uses: temp file in the same
directory, write, fsync, rename, fsync the directory.

Temp files are named ``.<name>.tmp-<pid>-<n>`` so boot recovery can find
and remove leftovers with ``clean_temp_files``. ``DirLock`` keeps a state
directory to one daemon at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import time
import weakref
from pathlib import Path

from devicerunner.errors import StateDirLockedError

_counter = itertools.count()
TMP_MARK = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: Path, data: bytes, *, mode: int = 0o644, durable: bool = True, sync_dir: bool = True
) -> None:
    """``durable=False`` skips the fsyncs: still atomic (never torn), but may be
    lost in a power cut; for informational files rewritten often (status), or
    files that are verified again whenever they are read (downloaded chunks).
    ``sync_dir=False`` leaves the directory's fsync to the caller, who writes
    several files into it and then calls ``fsync_dir`` once: none of them is
    durable before that."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{next(_counter)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable and sync_dir:
        fsync_dir(path.parent)


def _writer_alive(name: str) -> bool:
    """Is the process that is writing this temp file still running (not us)?"""
    try:
        pid = int(name.rsplit(TMP_MARK, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_temp_files(directory: Path, *, recursive: bool = False) -> int:
    """Remove temp files a crash left behind in ``directory``; how many. A temp
    file whose writer is still alive (another process mid-write) is left alone."""
    removed = 0
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    entries = directory.rglob(f".*{TMP_MARK}*") if recursive else directory.glob(f".*{TMP_MARK}*")
    for p in list(entries):
        if p.is_file() and not _writer_alive(p.name):
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
    return removed


def makedirs(path: Path, mode: int = 0o755) -> None:
    """mkdir -p, fsyncing each directory created, so the tree survives a power cut."""
    path = Path(path)
    if path.is_dir():  # the common case: one stat, no walk up the tree
        return
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, mode)
        fsync_dir(d.parent)


class DirListing:
    """The names in one directory, listed again only when the directory changed.

    An inbox is polled several times a second and after every update step,
    and is nearly always empty or unchanged: a ``stat`` costs a fraction of
    ``open`` + ``getdents`` + ``close``. Adding, removing or renaming an entry
    moves the directory's mtime, but file times are coarse (one clock tick;
    two seconds on FAT), so a change made in the same tick as the listing
    could leave them where they were: a listing is reused only when the
    directory was last changed more than ``RACY_S`` before the listing began,
    and never for longer than ``max_age_s`` (whatever the file system does
    with its times, a change is seen within that: a minute by default, not the
    poll interval -- a listing renewed on every poll saved nothing on the polls
    themselves). A missing directory lists as empty."""

    RACY_S = 2.0
    MAX_AGE_S = 60.0

    def __init__(self, directory: Path, max_age_s: float = MAX_AGE_S) -> None:
        self.dir = Path(directory)
        self.max_age_s = max_age_s
        self._key: tuple[int, int, int] | None = None
        self._listed_at = 0.0
        self._names: list[str] = []

    def names(self) -> list[str]:
        """Sorted entry names (a copy); raises OSError as ``os.listdir`` would, but
        not for a missing directory."""
        now_ns = time.time_ns()  # before the stat: a change after it moves the times
        try:
            st = os.stat(self.dir)
        except FileNotFoundError:
            self._key = None
            return []
        key = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        fresh = time.monotonic() - self._listed_at < self.max_age_s
        if key != self._key or not fresh:
            names = sorted(os.listdir(self.dir))
            settled = now_ns - max(st.st_mtime_ns, st.st_ctime_ns) > self.RACY_S * 1e9
            self._key = key if settled else None
            self._listed_at = time.monotonic()
            self._names = names
        return list(self._names)

    def paths(self, suffix: str) -> list[Path]:
        return [self.dir / n for n in self.names() if n.endswith(suffix) and n != suffix]


class DirLock:
    """An exclusive lock on ``<directory>/lock`` for its holder's lifetime
    (``flock``: the kernel drops it when the process dies, so a crash or a
    power cut never leaves a stale lock). The file holds the holder's PID,
    for the message a second taker gets; the lock itself is the flock, not
    the file's existence or content."""

    NAME = "lock"

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise StateDirLockedError naming the directory and holder."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise StateDirLockedError(self.path.parent, int(holder) if holder.isdigit() else None) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        # an owner dropped without release() (its constructor raised) frees the lock too
        self._finalizer = weakref.finalize(self, os.close, fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            self._finalizer()  # closes the descriptor, which drops the flock
