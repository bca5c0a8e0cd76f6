"""Capability ``kv``: a small persistent key-value store per app.

Invariants:
- Quota: counts what is stored, not what the app handed in. ``used_bytes``
  is the size of the snapshot's entries exactly as written (base64 key and
  value, quotes, colon, comma), so the file is at most ``quota_bytes`` plus
  ``FRAMING_BYTES``; a set that would exceed it fails with ERR_QUOTA and
  changes nothing.
- A host call never waits on storage: ``set``/``delete`` change memory and
  mark the store dirty; the daemon's flusher persists a whole snapshot
  atomically (see devicerunner.device.kvfile). A clean stop flushes; a power
  cut loses at most the writes of the last flush interval, never corrupts.
- Flash-friendly: setting a key to the value it has changes nothing (the store
  stays clean), and a snapshot identical to the last one written is not
  written again.
- A snapshot on disk is untrusted input: its size and nesting are bounded
  before it is parsed, its shape checked after; anything else is
  KvCorruptError (the daemon sets the file aside and starts empty).
- The store belongs to the app, not to an instance: a swap or rollback keeps it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
from collections.abc import Callable
from typing import Protocol

from hostfuncs import codes
from hostfuncs.context import AppContext
from hostfuncs.registry import hostfunc

MAX_KEY = 256
MAX_VALUE = 64 * 1024
FRAMING_BYTES = len(b'{"entries":{},"kv":1}')
"""What a snapshot holds besides its entries."""


def _b64len(n: int) -> int:
    return 4 * ((n + 2) // 3)


def entry_bytes(key: bytes, value: bytes) -> int:
    """Bytes one entry takes in the snapshot: ``"KEY":"VALUE",`` in base64."""
    return _b64len(len(key)) + _b64len(len(value)) + 6


def max_snapshot_bytes(quota_bytes: int) -> int:
    """The largest snapshot file worth parsing for this quota (older, less compact
    snapshots and a quota lowered since included); larger is corrupt or planted."""
    return 4 * quota_bytes + 4096


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
        self._saved_digest = b""
        self.writes = 0
        """Snapshots handed to the backend (the flash-wear counter)."""
        self.on_dirty: Callable[[], None] | None = None
        """Called (outside the lock; must not block) when a clean store
        changes: its flusher need not poll."""
        if backend is not None:
            raw = backend.load()
            if raw:
                if len(raw) > max_snapshot_bytes(quota_bytes):
                    raise KvCorruptError(
                        f"kv snapshot is {len(raw)} bytes, more than {max_snapshot_bytes(quota_bytes)} "
                        f"for a {quota_bytes}-byte quota"
                    )
                self._data = decode(raw)
                self._used = sum(entry_bytes(k, v) for k, v in self._data.items())
                self._saved_digest = hashlib.sha256(encode(self._data)).digest()

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
            if old == value:
                return codes.OK  # nothing changes: nothing to write
            delta = entry_bytes(key, value) - (0 if old is None else entry_bytes(key, old))
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
            self._used -= entry_bytes(key, old)
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
        digest = hashlib.sha256(snapshot).digest()
        if digest != self._saved_digest:  # changed and changed back: the file holds it already
            self._backend.save(snapshot)
            self.writes += 1
            self._saved_digest = digest
        self._saved_version = version


def encode(data: dict[bytes, bytes]) -> bytes:
    obj = {base64.b64encode(k).decode(): base64.b64encode(v).decode() for k, v in data.items()}
    return json.dumps({"kv": 1, "entries": obj}, sort_keys=True, separators=(",", ":")).encode()


def decode(raw: bytes) -> dict[bytes, bytes]:
    """Entries of a snapshot; KvCorruptError for anything that is not one.

    Base64 and the two fixed keys never contain ``{`` or ``[``: a snapshot has
    exactly two ``{`` and no ``[``, which bounds nesting before ``json.loads``
    (a deeply nested file raised RecursionError through the daemon)."""
    if raw.count(b"{") != 2 or b"[" in raw:
        raise KvCorruptError("kv snapshot unreadable: not the flat {kv, entries} shape")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise KvCorruptError(f"kv snapshot unreadable: {e}") from None
    if not isinstance(obj, dict) or obj.get("kv") != 1 or not isinstance(obj.get("entries"), dict):
        raise KvCorruptError("kv snapshot unreadable: not a version-1 snapshot")
    out: dict[bytes, bytes] = {}
    for k, v in obj["entries"].items():
        if not isinstance(v, str):
            raise KvCorruptError(f"kv snapshot unreadable: value of {k[:20]!r} is not a string")
        try:
            key, value = base64.b64decode(k, validate=True), base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError) as e:
            raise KvCorruptError(f"kv snapshot unreadable: bad base64: {e}") from None
        if not 0 < len(key) <= MAX_KEY or len(value) > MAX_VALUE:
            raise KvCorruptError("kv snapshot unreadable: key or value out of bounds")
        out[key] = value
    return out


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
