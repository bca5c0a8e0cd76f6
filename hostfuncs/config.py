"""Capability ``config``: the app reads its signed configuration.

The device verifies a config document (devicerunner.appconfig) and starts
the app's instance with its settings; a new config means a new instance
on trial (make-before-break), so the settings an instance sees never
change under it: an app may read them in ``dr_init`` once, or on any tick.

Values are JSON. ``config.get`` hands a string's text without quotes and
anything else as canonical JSON; ``config.get_f64`` converts an integer or
a decimal string (signed JSON has no floats: ``"21.5"``) to an f64.

Invariants: reads are O(1) on an immutable snapshot, never block, and
every (ptr, len) is bounds-checked before a byte is written.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hostfuncs import codes
from hostfuncs.context import AppContext
from hostfuncs.registry import hostfunc

MAX_KEY = 64
_F64 = struct.Struct("<d")


@dataclass(frozen=True)
class AppSettings:
    """One committed (or on-trial) config of one app, as its instance sees it."""

    version: int
    settings: Mapping[str, Any]
    document: bytes
    """Canonical JSON of ``settings``."""
    _values: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for k, v in self.settings.items():
            text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, separators=(",", ":"))
            self._values[k] = text.encode()

    def value(self, key: str) -> bytes | None:
        return self._values.get(key)

    def number(self, key: str) -> float | None:
        v = self.settings.get(key)
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return float(v)
        if isinstance(v, str):
            try:
                f = float(v)
            except ValueError:
                return None
            return f if math.isfinite(f) else None
        return None


EMPTY = AppSettings(0, {}, b"{}")
"""What an app without a config document sees: version 0, no keys."""


def _settings(ctx: AppContext) -> AppSettings:
    s = ctx.config
    return s if isinstance(s, AppSettings) else EMPTY


def _key(ctx: AppContext, ptr: int, length: int) -> str | None:
    if length & 0xFFFFFFFF > MAX_KEY:
        return None
    try:
        return ctx.memory.read(ptr, length).decode("utf-8")
    except UnicodeDecodeError:
        return None


@hostfunc(
    "config",
    "version",
    (),
    ("i64",),
    args={},
    returns="the version of the signed config this instance was started with; 0 without one",
)
def version(ctx: AppContext) -> int:
    """Version of the config this instance runs with (0: none)."""
    return _settings(ctx).version


@hostfunc(
    "config",
    "get",
    ("i32", "i32", "i32", "i32"),
    ("i32",),
    args={
        "key_ptr": "address of the setting's name (UTF-8)",
        "key_len": "the name's length in bytes (at most 64)",
        "out_ptr": "where to write the value: a string's text without quotes, anything else as JSON",
        "out_len": "capacity of the output buffer in bytes",
    },
    returns="the value's length in bytes; ERR_NOT_FOUND (no such setting), ERR_BUF_TOO_SMALL "
    "(nothing written), ERR_INVALID (name not UTF-8 or too long), ERR_BOUNDS",
)
def get(ctx: AppContext, key_ptr: int, key_len: int, out_ptr: int, out_len: int) -> int:
    """Write setting `key` (string text, else JSON) at out; its length, ERR_NOT_FOUND, ERR_BUF_TOO_SMALL."""
    key = _key(ctx, key_ptr, key_len)
    if key is None:
        return codes.ERR_INVALID
    data = _settings(ctx).value(key)
    if data is None:
        return codes.ERR_NOT_FOUND
    if len(data) > out_len & 0xFFFFFFFF:
        return codes.ERR_BUF_TOO_SMALL
    ctx.memory.write(out_ptr, data)
    return len(data)


@hostfunc(
    "config",
    "get_f64",
    ("i32", "i32", "i32"),
    ("i32",),
    args={
        "key_ptr": "address of the setting's name (UTF-8)",
        "key_len": "the name's length in bytes (at most 64)",
        "out_ptr": "where to write the value as an f64 (8 bytes, little-endian)",
    },
    returns="0; ERR_NOT_FOUND (no such setting), ERR_INVALID (not an integer or a decimal string, "
    "or a bad name), ERR_BOUNDS",
)
def get_f64(ctx: AppContext, key_ptr: int, key_len: int, out_ptr: int) -> int:
    """Write setting `key` as f64 at out (integer or decimal string); 0, ERR_NOT_FOUND, ERR_INVALID."""
    key = _key(ctx, key_ptr, key_len)
    if key is None:
        return codes.ERR_INVALID
    s = _settings(ctx)
    if key not in s.settings:
        return codes.ERR_NOT_FOUND
    v = s.number(key)
    if v is None:
        return codes.ERR_INVALID
    ctx.memory.write(out_ptr, _F64.pack(v))
    return codes.OK


@hostfunc(
    "config",
    "read",
    ("i32", "i32"),
    ("i32",),
    args={
        "out_ptr": "where to write every setting, as one canonical JSON object",
        "out_len": "capacity of the output buffer in bytes (settings are at most 8 KiB)",
    },
    returns="the document's length in bytes; ERR_BUF_TOO_SMALL (nothing written), ERR_BOUNDS",
)
def read(ctx: AppContext, out_ptr: int, out_len: int) -> int:
    """Write all settings (canonical JSON object) at out; its length or ERR_BUF_TOO_SMALL."""
    data = _settings(ctx).document
    if len(data) > out_len & 0xFFFFFFFF:
        return codes.ERR_BUF_TOO_SMALL
    ctx.memory.write(out_ptr, data)
    return len(data)
