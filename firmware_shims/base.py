"""Sensor and Actuator protocols, sample status, and the clocks shims read.

Invariants:
- ``Sensor.read`` and ``Sensor.samples_since`` are O(1)/O(n in the answer)
  and never block: they return what a reader thread (or a formula) already
  has. Hardware I/O happens on the driver's own thread, never in a host call.
- Status is a value, not an exception: a host call maps it to an ABI error
  code without paying for a raise.
"""

from __future__ import annotations

import enum
import threading
import time
from typing import NamedTuple, Protocol, runtime_checkable


class Status(enum.IntEnum):
    OK = 0
    STALE = 1
    OFFLINE = 2


class SensorReading(NamedTuple):
    status: Status
    value: float
    t_s: float
    """Monotonic time (of the sensor's clock) the value was sampled at."""


class Clock(Protocol):
    def monotonic_s(self) -> float: ...
    def wall_ms(self) -> int: ...


class RealClock:
    def monotonic_s(self) -> float:
        return time.monotonic()

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000


class SkewedClock(RealClock):
    """Real time, with the wall clock off by ``offset_s`` (a device whose RTC
    drifted, or was never set): simulated fleets are not in lockstep."""

    def __init__(self, offset_s: float) -> None:
        self.offset_ms = int(offset_s * 1000)

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms


class VirtualClock:
    """A clock that moves only when told to: deterministic app runs and tests."""

    def __init__(self, start_wall_ms: int = 1_767_225_600_000) -> None:
        self._mono = 0.0
        self._wall0 = start_wall_ms
        self._lock = threading.Lock()

    def monotonic_s(self) -> float:
        return self._mono

    def wall_ms(self) -> int:
        return self._wall0 + int(self._mono * 1000)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._mono += seconds


@runtime_checkable
class Sensor(Protocol):
    name: str
    unit: str

    def read(self) -> SensorReading:
        """The newest sample, with its status. Never blocks."""
        ...

    def samples_since(self, seq: int, max_n: int) -> tuple[list[float], int]:
        """Up to ``max_n`` newest samples with sequence > ``seq``, oldest first,
        and the sequence number of the newest one returned (``seq`` if none)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Actuator(Protocol):
    name: str
    unit: str

    def set(self, value: float) -> Status:
        """Apply ``value``; never blocks on hardware (drivers queue the write)."""
        ...

    @property
    def value(self) -> float | None: ...

    def close(self) -> None: ...
