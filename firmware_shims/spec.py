"""Typed access to a driver's option table, naming the key on every error."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from firmware_shims.errors import ShimConfigError


class Options:
    """Reads options out of a TOML table; unknown keys are an error at the end."""

    def __init__(self, table: Mapping[str, Any]) -> None:
        self._table = dict(table)
        self._used: set[str] = {"driver"}

    def _get(self, key: str) -> Any:
        self._used.add(key)
        return self._table.get(key)

    def text(self, key: str, default: str | None = None, choices: tuple[str, ...] = ()) -> str:
        v = self._get(key)
        if v is None:
            if default is None:
                raise ShimConfigError(key, "is required")
            return default
        if not isinstance(v, str):
            raise ShimConfigError(key, f"must be a string, got {type(v).__name__}")
        if choices and v not in choices:
            raise ShimConfigError(key, f"must be one of {', '.join(choices)}; got {v!r}")
        return v

    def opt_text(self, key: str) -> str | None:
        v = self._get(key)
        if v is not None and not isinstance(v, str):
            raise ShimConfigError(key, f"must be a string, got {type(v).__name__}")
        return v

    def number(self, key: str, default: float, *, min_value: float | None = None) -> float:
        v = self._get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ShimConfigError(key, f"must be a number, got {v!r}")
        if min_value is not None and v < min_value:
            raise ShimConfigError(key, f"must be >= {min_value}, got {v}")
        return float(v)

    def integer(self, key: str, default: int | None, *, min_value: int | None = None) -> int | None:
        v = self._get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise ShimConfigError(key, f"must be an integer, got {v!r}")
        if min_value is not None and v < min_value:
            raise ShimConfigError(key, f"must be >= {min_value}, got {v}")
        return v

    def finish(self) -> None:
        unknown = sorted(set(self._table) - self._used)
        if unknown:
            raise ShimConfigError(unknown[0], "unknown option")
