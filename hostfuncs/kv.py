"""Capability ``kv``: a small persistent key-value store per app.

Invariants:
- Quota: the sum of len(key) + len(value) over all entries never exceeds
  ``quota_bytes``; a set that would exceed it fails with ERR_QUOTA and
  changes nothing.
- A host call never waits on storage: ``set``/``delete`` change memory and
  mark the store dirty; the daemon's flusher persists a whole snapshot
  atomically (see devicerunner.device.kvfile). A clean stop flushes; a power cut
  loses at most the writes of the last flush interval, never corrupts.
- The store belongs to the app, not to an instance: a swap or rollback keeps it.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable
from typing import Protocol

from hostfuncs import codes
from hostfuncs.context import AppContext
from hostfuncs.registry import hostfunc

MAX_KEY = 256
MAX_VALUE = 64 * 1024


class KvBackend(Protocol):
    def load(self) -> bytes | None: ...
    def save(self, data: bytes) -> None: ...


class KvCorruptError(ValueError):
    pass


class KvStore:
    def __init__(self, quota_bytes: int, backend: KvBackend | None = None) -> None:
        self.quota_bytes = quota_bytes
        self._backend = backend
        self._data: dict[bytes, bytes] = {}
        self._used = 0
        self._lock = threading.Lock()
        self._version = 0
        self._saved_version = 0
        self.on_dirty: Callable[[], None] | None = None
        """Called (outside the lock; must not block) when a clean store
        changes: its flusher need not poll."""
        if backend is not None:
            raw = backend.load()
            if raw:
                self._data = decode(raw)
                self._used = sum(len(k) + len(v) for k, v in self._data.items())

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def dirty(self) -> bool:
        return self._version != self._saved_version

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def set(self, key: bytes, value: bytes) -> int:
        with self._lock:
            old = self._data.get(key)
            delta = len(key) + len(value) - (0 if old is None else len(key) + len(old))
            if self._used + delta > self.quota_bytes:
                return codes.ERR_QUOTA
            self._data[key] = value
            self._used += delta
            was_clean = self._version == self._saved_version
            self._version += 1
        if was_clean and self.on_dirty is not None:
            self.on_dirty()
        return codes.OK

    def delete(self, key: bytes) -> int:
        with self._lock:
            old = self._data.pop(key, None)
            if old is None:
                return codes.ERR_NOT_FOUND
            self._used -= len(key) + len(old)
            was_clean = self._version == self._saved_version
            self._version += 1
        if was_clean and self.on_dirty is not None:
            self.on_dirty()
        return codes.OK

    def flush(self) -> None:
        """Persist a snapshot if anything changed (called off the scheduler thread)."""
        if self._backend is None:
            return
        with self._lock:
            version = self._version
            if version == self._saved_version:
                return
            snapshot = encode(self._data)
        self._backend.save(snapshot)
        self._saved_version = version


def encode(data: dict[bytes, bytes]) -> bytes:
    obj = {base64.b64encode(k).decode(): base64.b64encode(v).decode() for k, v in data.items()}
    return json.dumps({"kv": 1, "entries": obj}, sort_keys=True).encode()


def decode(raw: bytes) -> dict[bytes, bytes]:
    try:
        obj = json.loads(raw)
        entries = obj["entries"]
        return {base64.b64decode(k): base64.b64decode(v) for k, v in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise KvCorruptError(f"kv snapshot unreadable: {e}") from e


def _store(ctx: AppContext) -> KvStore:
    assert isinstance(ctx.kv, KvStore)  # only linked when the app has a kv store
    return ctx.kv


def _key(ctx: AppContext, ptr: int, length: int) -> bytes | int:
    if not 0 < length & 0xFFFFFFFF <= MAX_KEY:
        return codes.ERR_TOO_LARGE if length & 0xFFFFFFFF else codes.ERR_INVALID
    return ctx.memory.read(ptr, length)


@hostfunc(
    "kv",
    "get",
    ("i32", "i32", "i32", "i32"),
    ("i32",),
    args={
        "kptr": "address of the key (any bytes)",
        "klen": "the key's length in bytes (1..256)",
        "vptr": "address of the buffer that receives the value",
        "vcap": "the buffer's capacity in bytes",
    },
    returns="the value's length in bytes (the value is copied to `vptr`); ERR_NOT_FOUND, "
    "ERR_BUF_TOO_SMALL (nothing written; values are at most 64 KiB), ERR_TOO_LARGE / ERR_INVALID "
    "(key length), ERR_BOUNDS",
)
def get(ctx: AppContext, kptr: int, klen: int, vptr: int, vcap: int) -> int:
    """Copy the value of key into `vptr` (capacity `vcap`); its length, ERR_NOT_FOUND, ERR_BUF_TOO_SMALL."""
    key = _key(ctx, kptr, klen)
    if isinstance(key, int):
        return key
    value = _store(ctx).get(key)
    if value is None:
        return codes.ERR_NOT_FOUND
    if len(value) > vcap & 0xFFFFFFFF:
        return codes.ERR_BUF_TOO_SMALL
    ctx.memory.write(vptr, value)
    return len(value)


@hostfunc(
    "kv",
    "set",
    ("i32", "i32", "i32", "i32"),
    ("i32",),
    args={
        "kptr": "address of the key (any bytes)",
        "klen": "the key's length in bytes (1..256)",
        "vptr": "address of the value (any bytes)",
        "vlen": "the value's length in bytes (at most 65,536)",
    },
    returns="0 (persisted in the background within the flush interval); ERR_QUOTA (nothing "
    "changed), ERR_TOO_LARGE, ERR_INVALID (empty key), ERR_BOUNDS",
)
def set_(ctx: AppContext, kptr: int, klen: int, vptr: int, vlen: int) -> int:
    """Store value for key. 0, ERR_QUOTA (nothing changed), ERR_TOO_LARGE."""
    key = _key(ctx, kptr, klen)
    if isinstance(key, int):
        return key
    if vlen & 0xFFFFFFFF > MAX_VALUE:
        return codes.ERR_TOO_LARGE
    value = ctx.memory.read(vptr, vlen)
    return _store(ctx).set(key, value)


@hostfunc(
    "kv",
    "delete",
    ("i32", "i32"),
    ("i32",),
    args={"kptr": "address of the key", "klen": "the key's length in bytes (1..256)"},
    returns="0; ERR_NOT_FOUND, ERR_TOO_LARGE / ERR_INVALID (key length), ERR_BOUNDS",
)
def delete(ctx: AppContext, kptr: int, klen: int) -> int:
    """Remove key. 0 or ERR_NOT_FOUND."""
    key = _key(ctx, kptr, klen)
    if isinstance(key, int):
        return key
    return _store(ctx).delete(key)
