"""Capability ``clock``: wall-clock and monotonic time.

Monotonic time as apps see it (here and through WASI's ``clock_time_get``)
is the device clock's plus ``MONOTONIC_ORIGIN_S``, so it is never 0, not
even at the first tick of ``app run``'s virtual clock (which starts at 0):
runtimes treat a zero monotonic clock as unset (Go's wasip1 runtime aborts
with "nanotime returning zero").
"""

from __future__ import annotations

from hostfuncs.context import AppContext
from hostfuncs.registry import hostfunc

MONOTONIC_ORIGIN_S = 1.0


def monotonic_ns(ctx: AppContext) -> int:
    """The app's monotonic time in nanoseconds; always > 0."""
    return int((ctx.clock.monotonic_s() + MONOTONIC_ORIGIN_S) * 1e9)


@hostfunc(
    "clock",
    "now_ms",
    (),
    ("i64",),
    args={},
    returns="milliseconds since 1970-01-01 UTC; may jump when the device's clock is set",
)
def now_ms(ctx: AppContext) -> int:
    """Wall-clock time, milliseconds since the Unix epoch."""
    return ctx.clock.wall_ms()


@hostfunc(
    "clock",
    "monotonic_us",
    (),
    ("i64",),
    args={},
    returns="microseconds since an arbitrary origin; always > 0 and never decreasing (also in "
    "`app run`'s virtual time)",
)
def monotonic_us(ctx: AppContext) -> int:
    """Monotonic time in microseconds (arbitrary origin); never goes back."""
    return monotonic_ns(ctx) // 1000
