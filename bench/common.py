"""Shared bench helpers: fixed iterations, warm-ups, medians and p99."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Stat:
    name: str
    median: float
    p99: float
    n: int
    unit: str = "us"

    def row(self) -> str:
        return f"{self.name:<48} {self.median:>10.1f} {self.p99:>10.1f} {self.unit:<4} (n={self.n})"


def pctl(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def measure(name: str, fn: Callable[[], object], n: int, warmup: int = 200, scale: float = 1e6) -> Stat:
    for _ in range(warmup):
        fn()
    xs = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - t) * scale)
    return Stat(name, statistics.median(xs), pctl(xs, 99), n)


def from_samples(name: str, xs: list[float], unit: str = "us") -> Stat:
    return Stat(name, statistics.median(xs), pctl(xs, 99), len(xs), unit)


def proc_kib(pid: int | str, field: str = "VmRSS") -> int:
    """A KiB figure from ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``...); 0 when
    the process is gone or the field is missing. ``pid`` may be ``"self"``."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
