"""Simulated sensors and actuators: waveforms, noise and injected faults.

Invariants:
- A sample is a pure function of (seed, sample index) for every waveform but
  ``random_walk`` (which is a pure function of the seed and all previous
  indices), so two runs with the same seed and clock see the same values.
- Reads never block and never allocate per call beyond the reading itself.

Faults (``fault = ...``), starting ``fault_after_s`` after creation:
``stuck`` (the value freezes), ``dropout`` (a share ``fault_rate`` of samples
is missing, so reads go stale), ``spike`` (a share of samples jumps by
``spike_magnitude``), ``offline`` (every read reports OFFLINE).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Any

from firmware_shims.base import Clock, SensorReading, Status
from firmware_shims.spec import Options

WAVEFORMS = ("constant", "sine", "step", "random_walk")
FAULTS = ("none", "stuck", "dropout", "spike", "offline")
_HISTORY = 1024
_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _uniform(seed: int, k: int, salt: int) -> float:
    return (_mix(seed ^ (k * 0x100000001B3) ^ salt) >> 11) / float(1 << 53)


def _gauss(seed: int, k: int, salt: int) -> float:
    u1 = max(_uniform(seed, k, salt), 1e-12)
    u2 = _uniform(seed, k, salt + 1)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2 * math.pi * u2)


class SimSensor:
    def __init__(self, name: str, table: Mapping[str, Any], clock: Clock) -> None:
        o = Options(table)
        self.name = name
        self.unit = o.text("unit", "")
        self.waveform = o.text("waveform", "sine", WAVEFORMS)
        self.base = o.number("base", 20.0)
        self.amplitude = o.number("amplitude", 1.0)
        self.period_s = o.number("period_s", 60.0, min_value=1e-3)
        self.step_at_s = o.number("step_at_s", self.period_s / 2, min_value=0.0)
        self.walk_step = o.number("walk_step", 0.1, min_value=0.0)
        self.noise = o.number("noise", 0.0, min_value=0.0)
        interval_ms = o.integer("sample_interval_ms", 100, min_value=1)
        self.dt_s = interval_ms / 1000.0
        self.max_age_s = o.integer("max_age_ms", 5 * interval_ms, min_value=1) / 1000.0
        self.fault = o.text("fault", "none", FAULTS)
        self.fault_after_s = o.number("fault_after_s", 0.0, min_value=0.0)
        self.fault_rate = o.number("fault_rate", 0.1, min_value=0.0)
        self.spike_magnitude = o.number("spike_magnitude", 100.0)
        self.seed = o.integer("seed", zlib.crc32(name.encode()))
        o.finish()
        self._clock = clock
        self._t0 = clock.monotonic_s()
        self._walk_k = -1
        self._walk_v = self.base
        self._stuck_value: float | None = None
        self._memo_k = -1
        self._memo_v = math.nan

    # -- waveform ---------------------------------------------------------

    def _clean(self, k: int) -> float:
        t = k * self.dt_s
        w = self.waveform
        if w == "constant":
            v = self.base
        elif w == "sine":
            v = self.base + self.amplitude * math.sin(2 * math.pi * t / self.period_s)
        elif w == "step":
            v = self.base + (self.amplitude if t >= self.step_at_s else 0.0)
        else:
            v = self._walk(k)
        if self.noise:
            v += self.noise * _gauss(self.seed, k, 7)
        return v

    def _walk(self, k: int) -> float:
        if k < self._walk_k:  # time only moves forward; answer the latest
            return self._walk_v
        while self._walk_k < k:
            self._walk_k += 1
            self._walk_v += self.walk_step * _gauss(self.seed, self._walk_k, 3)
        return self._walk_v

    def _faulted(self, k: int) -> bool:
        return self.fault != "none" and k * self.dt_s >= self.fault_after_s

    def _present(self, k: int) -> bool:
        if self._faulted(k) and self.fault == "dropout":
            return _uniform(self.seed, k, 11) >= self.fault_rate
        return True

    def _value(self, k: int) -> float:
        if k == self._memo_k:  # several reads within one sample period (or several apps)
            return self._memo_v
        v = self._compute(k)
        self._memo_k, self._memo_v = k, v
        return v

    def _compute(self, k: int) -> float:
        if self._faulted(k):
            if self.fault == "stuck":
                if self._stuck_value is None:
                    k0 = max(0, math.ceil(self.fault_after_s / self.dt_s) - 1)
                    self._stuck_value = self._clean(k0)
                return self._stuck_value
            if self.fault == "spike" and _uniform(self.seed, k, 13) < self.fault_rate:
                return self._clean(k) + self.spike_magnitude
        return self._clean(k)

    def _index_now(self) -> int:
        return max(0, int((self._clock.monotonic_s() - self._t0) / self.dt_s))

    # -- Sensor protocol --------------------------------------------------

    def read(self) -> SensorReading:
        k = self._index_now()
        if self._faulted(k) and self.fault == "offline":
            return SensorReading(Status.OFFLINE, math.nan, self._t0 + k * self.dt_s)
        j = k
        # A dropout leaves a gap; the newest present sample may be old.
        while j >= 0 and not self._present(j) and k - j < _HISTORY:
            j -= 1
        if j < 0 or not self._present(j):
            return SensorReading(Status.STALE, math.nan, self._t0)
        t = self._t0 + j * self.dt_s
        value = self._value(j)
        age = self._clock.monotonic_s() - t
        status = Status.STALE if age > self.max_age_s else Status.OK
        return SensorReading(status, value, t)

    def samples_since(self, seq: int, max_n: int) -> tuple[list[float], int]:
        k = self._index_now()
        if max_n <= 0 or (self._faulted(k) and self.fault == "offline"):
            return [], seq
        first = max(seq + 1, k - max_n + 1, 0)
        out = [self._value(j) for j in range(first, k + 1) if self._present(j)]
        return out[-max_n:], max(seq, k)

    def close(self) -> None:
        pass


class SimActuator:
    """Records what it was told; ``fault = "offline"`` makes every set fail."""

    def __init__(self, name: str, table: Mapping[str, Any], clock: Clock) -> None:
        o = Options(table)
        self.name = name
        self.unit = o.text("unit", "")
        self.fault = o.text("fault", "none", ("none", "offline"))
        self.initial = o.number("initial", 0.0)
        o.finish()
        self._value: float | None = self.initial
        self.writes = 0
        self._clock = clock

    def set(self, value: float) -> Status:
        if self.fault == "offline":
            return Status.OFFLINE
        self._value = value
        self.writes += 1
        return Status.OK

    @property
    def value(self) -> float | None:
        return self._value

    def close(self) -> None:
        pass
