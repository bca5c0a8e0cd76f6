"""Capability ``clock``: wall-clock and monotonic time."""

from __future__ import annotations

from hostfuncs.context import AppContext
from hostfuncs.registry import hostfunc


@hostfunc("clock", "now_ms", (), ("i64",))
def now_ms(ctx: AppContext) -> int:
    """Wall-clock time, milliseconds since the Unix epoch."""
    return ctx.clock.wall_ms()


@hostfunc("clock", "monotonic_us", (), ("i64",))
def monotonic_us(ctx: AppContext) -> int:
    """Monotonic time in microseconds (arbitrary origin); never goes back."""
    return int(ctx.clock.monotonic_s() * 1_000_000)
