"""Typed access to a driver's option table, naming the key on every error."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, overload

from devicerunner.runtime.strict import REQUIRED, Strict
from firmware_shims.errors import ShimConfigError


class Options(Strict):
    """Reads a driver's options (runtime.strict), as ShimConfigError naming the
    key; unknown keys are an error at ``finish()``."""

    def __init__(self, table: Mapping[str, Any]) -> None:
        super().__init__(table, "", ShimConfigError, unknown="unknown option")
        self.used.add("driver")

    def text(self, key: str, default: str | None = None, choices: tuple[str, ...] = ()) -> str:  # type: ignore[override]
        return str(
            super().text(key, REQUIRED if default is None else default, choices=choices, nonempty=False)
        )

    def opt_text(self, key: str) -> str | None:
        return None if self.get(key) is None else self.text(key)

    def number(self, key: str, default: float, *, min_value: float | None = None) -> float:  # type: ignore[override]
        return float(super().number(key, default, lo=min_value))

    @overload  # type: ignore[override]
    def integer(self, key: str, default: int, *, min_value: int | None = None) -> int: ...
    @overload
    def integer(self, key: str, default: None, *, min_value: int | None = None) -> int | None: ...

    def integer(self, key: str, default: int | None, *, min_value: int | None = None) -> int | None:
        """The integer under ``key``, or ``default`` when absent. A present 0 is 0:
        never write ``o.integer(...) or default``, which turns 0 into the default."""
        v = super().integer(key, default, lo=min_value)
        return None if v is None else int(v)
