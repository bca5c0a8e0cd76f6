"""Reading the device's own state files as untrusted input.

A file on disk may have been truncated, bit-flipped, replaced by hand or
planted; it gets no more trust than a message. This module owns the first
steps of every load:

- ``read_bounded``: the size is checked (``fstat``) before a byte is read,
  so a planted 1.5 GB file costs nothing;
- ``loads_bounded``: the nesting depth is checked by a linear scan before
  ``json.loads``, so a deeply nested file cannot raise RecursionError (or
  exhaust the stack) in the parser;
- ``seal`` / ``unseal``: a JSON object stored with a SHA-256 of its
  canonical content next to it, so a bit flip that still parses (a digit of
  ``highest_sequence``) is detected, not silently believed.

Every failure is StateFileError (a ValueError) naming the file's problem;
callers take their corruption path (rebuild, fall back, start empty) and
log it. Nothing here writes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from devicerunner.runtime.strict import too_deep

SEAL_KEY = "sha256"


class StateFileError(ValueError):
    pass


def read_bounded(path: Path, max_bytes: int) -> bytes | None:
    """The file's bytes, None if it does not exist; StateFileError if it is
    larger than ``max_bytes`` (checked before reading). Other OSErrors pass."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise StateFileError(f"{path.name} is {size} bytes, more than {max_bytes}")
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        return None
    if len(data) > max_bytes:  # grew while we read it
        raise StateFileError(f"{path.name} is more than {max_bytes} bytes")
    return data


def loads_bounded(data: bytes, max_depth: int) -> Any:
    """``json.loads`` after a nesting check; StateFileError for anything wrong."""
    if too_deep(data, max_depth):
        raise StateFileError(f"nested deeper than {max_depth}")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StateFileError(f"not JSON: {e}") from None


def _digest(obj: dict[str, Any]) -> str:
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def seal(obj: dict[str, Any]) -> bytes:
    """Pretty JSON of ``obj`` plus ``"sha256"``: the digest of its canonical form."""
    if SEAL_KEY in obj:
        raise ValueError(f"{SEAL_KEY!r} is reserved")
    return json.dumps({**obj, SEAL_KEY: _digest(obj)}, indent=2, sort_keys=True).encode() + b"\n"


def unseal(data: bytes, max_depth: int, *, legacy_keys: frozenset[str] | None = None) -> dict[str, Any]:
    """The object ``seal`` wrote, its digest checked; StateFileError otherwise.

    ``legacy_keys``: a file written before sealing existed is accepted without a
    digest only if its keys are exactly these (a flip that damages the
    ``"sha256"`` key leaves an unknown key behind, so it is not mistaken for one)."""
    obj = loads_bounded(data, max_depth)
    if not isinstance(obj, dict):
        raise StateFileError("not a JSON object")
    digest = obj.pop(SEAL_KEY, None)
    if digest is None:
        if legacy_keys is not None and set(obj) == legacy_keys:
            return obj
        raise StateFileError(f"no {SEAL_KEY} over the content")
    if not isinstance(digest, str) or digest != _digest(obj):
        raise StateFileError("content does not match its sha256 (damaged on disk?)")
    return obj
