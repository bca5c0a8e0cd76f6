"""One strict reader for typed dict input: documents, device.toml, driver options.

Every value someone else wrote (a signed document, a config file, a state
file) is read through ``Strict``: type-checked (``True`` is not an integer,
``1.0`` is not a string), range-checked, matched with ``fullmatch`` (so a
trailing newline is never accepted), and keys nobody read are refused at
``finish()``. Errors name the full key path and are raised through the
caller's ``fail(key, message)``, so each format keeps its own error family
(MalformedError, ConfigError, ShimConfigError) while the rules live here.
Pure: no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

Fail = Callable[[str, str], Exception]
"""(key path, message) -> the exception to raise."""

REQUIRED: Any = object()
"""The default of a read that must find a value."""


class Strict:
    def __init__(
        self,
        obj: Any,
        where: str,
        fail: Fail,
        *,
        what: str = "table",
        unknown: str = "unknown key",
        required: Iterable[str] = (),
    ) -> None:
        self.where = where
        self._fail = fail
        self._unknown = unknown
        if not isinstance(obj, Mapping):
            self.error(None, f"must be a {what}")
        self.obj: Mapping[str, Any] = obj
        self.used: set[str] = set()
        for k in required:
            if k not in obj:
                self.error(k, "missing")

    # -- errors --------------------------------------------------------------------

    def key(self, k: str | None) -> str:
        if k is None:
            return self.where
        return f"{self.where}.{k}" if self.where else k

    def error(self, k: str | None, message: str) -> NoReturn:
        raise self._fail(self.key(k), message)

    # -- reads ---------------------------------------------------------------------

    def get(self, k: str, default: Any = None) -> Any:
        self.used.add(k)
        return self.obj.get(k, default)

    def _value(self, k: str, default: Any) -> Any:
        v = self.get(k, REQUIRED)
        if v is REQUIRED or v is None:
            if default is REQUIRED:
                self.error(k, "is required")
            return default
        return v

    def text(
        self,
        k: str,
        default: Any = REQUIRED,
        *,
        pattern: re.Pattern[str] | None = None,
        choices: Iterable[str] = (),
        nonempty: bool = True,
    ) -> Any:
        v = self._value(k, default)
        if v is default and default is not REQUIRED:
            return v
        if not isinstance(v, str):
            self.error(k, f"must be a string, got {type(v).__name__}")
        if nonempty and not v:
            self.error(k, "must be a non-empty string")
        if pattern is not None and not pattern.fullmatch(v):
            self.error(k, f"invalid value {v!r} (must match {pattern.pattern})")
        options = tuple(choices)
        if options and v not in options:
            self.error(k, f"must be one of {', '.join(options)}; got {v!r}")
        return v

    def integer(
        self, k: str, default: Any = REQUIRED, *, lo: int | None = None, hi: int | None = None
    ) -> Any:
        v = self._value(k, default)
        if v is default and default is not REQUIRED:
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            self.error(k, f"must be an integer, got {v!r}")
        self._range(k, v, lo, hi)
        return v

    def number(
        self, k: str, default: Any = REQUIRED, *, lo: float | None = None, hi: float | None = None
    ) -> Any:
        v = self._value(k, default)
        if v is default and default is not REQUIRED:
            return v
        if isinstance(v, bool) or not isinstance(v, int | float):
            self.error(k, f"must be a number, got {v!r}")
        if not math.isfinite(v):
            self.error(k, f"must be a finite number, got {v!r}")
        self._range(k, v, lo, hi)
        return float(v)

    def _range(self, k: str, v: float, lo: float | None, hi: float | None) -> None:
        if lo is not None and hi is not None and not lo <= v <= hi:
            self.error(k, f"must be between {lo} and {hi}, got {v}")
        if lo is not None and v < lo:
            self.error(k, f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            self.error(k, f"must be <= {hi}, got {v}")

    def text_list(
        self,
        k: str,
        default: Any = REQUIRED,
        *,
        pattern: re.Pattern[str] | None = None,
        max_n: int = 256,
        unique: bool = False,
    ) -> Any:
        v = self._value(k, default)
        if v is default and default is not REQUIRED:
            return v
        if not isinstance(v, list) or len(v) > max_n:
            self.error(k, f"must be a list of at most {max_n} strings")
        for x in v:
            if not isinstance(x, str) or (pattern is not None and not pattern.fullmatch(x)):
                self.error(k, f"invalid entry {x!r}")
        if unique and len(set(v)) != len(v):
            self.error(k, "duplicate entries")
        return tuple(v)

    def finish(self) -> None:
        """Refuse keys nobody read (typos, fields from a newer format)."""
        unknown = sorted(set(self.obj) - self.used)
        if unknown:
            self.error(unknown[0], self._unknown)


def json_depth(data: bytes, limit: int) -> int:
    """Nesting depth of JSON text (strings skipped), or ``limit + 1`` as soon
    as it is exceeded. Linear, no recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for b in data:
        if in_string:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:  # quote
                in_string = False
        elif b == 0x22:
            in_string = True
        elif b in (0x7B, 0x5B):  # { [
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif b in (0x7D, 0x5D):  # } ]
            depth -= 1
    return deepest


def too_deep(data: bytes, limit: int) -> bool:
    """Is the JSON text ``data`` nested deeper than ``limit``? Decided before
    ``json.loads``: its C decoder recurses once per level, and code that runs
    at that depth (a finalizer the garbage collector calls) fails with
    RecursionError of its own. Brackets are counted first (in C): a text with
    at most ``limit`` of them cannot be deeper, and only the rest are scanned."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    return json_depth(data, limit) > limit
