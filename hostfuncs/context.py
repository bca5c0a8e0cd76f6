"""Per-app state that host functions act on.

One AppContext per app *instance* (a swap creates a new one that shares the
app's kv store and telemetry outbox). It owns nothing the sandbox owns: the
sandbox fills in ``memory`` after instantiation; the context lives as long
as its instance (no teardown: dropping the instance drops it).

Invariant: host functions reach the outside world only through this object,
and everything in it answers without blocking.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from firmware_shims.base import Actuator, Clock, Sensor
from hostfuncs.logsafe import escape_controls
from hostfuncs.memory import GuestMemory
from hostfuncs.ratelimit import TokenBucket

LogSink = Callable[[str, int, str], None]
"""(app, logging level, message) -> None"""


@dataclass
class HostStats:
    log_lines: int = 0
    log_dropped: int = 0
    telemetry_sent: int = 0
    telemetry_dropped: int = 0
    sensor_reads: int = 0
    host_errors: int = 0


class _NoMemory:
    def size(self) -> int:
        return 0

    def read(self, ptr: int, length: int) -> bytes:
        from hostfuncs.memory import GuestMemoryError

        raise GuestMemoryError("app has no memory export")

    def write(self, ptr: int, data: bytes) -> None:
        from hostfuncs.memory import GuestMemoryError

        raise GuestMemoryError("app has no memory export")


@dataclass
class AppContext:
    app: str
    clock: Clock
    sensors: Mapping[str, Sensor] = field(default_factory=dict)
    actuators: Mapping[str, Actuator] = field(default_factory=dict)
    kv: object | None = None  # hostfuncs.kv.KvStore
    telemetry: object | None = None  # hostfuncs.telemetry.Outbox
    inbox: object | None = None  # hostfuncs.messages.Inbox (the app's, shared by its instances)
    config: object | None = None  # hostfuncs.config.AppSettings (immutable for this instance)
    log_sink: LogSink | None = None
    log_rate_per_s: float = 50.0
    log_burst: float = 200.0
    memory: GuestMemory = field(default_factory=_NoMemory)
    stats: HostStats = field(default_factory=HostStats)

    def __post_init__(self) -> None:
        self.logger = logging.getLogger(f"app.{self.app}")
        # ids are indices into these lists: O(1) lookups on the hot path
        self.sensor_list: list[Sensor] = list(self.sensors.values())
        self.sensor_ids: dict[str, int] = {s: i for i, s in enumerate(self.sensors)}
        self.sensor_cursor: list[int] = [-1] * len(self.sensor_list)
        self.actuator_list: list[Actuator] = list(self.actuators.values())
        self.actuator_ids: dict[str, int] = {a: i for i, a in enumerate(self.actuators)}
        self.log_bucket = TokenBucket(self.log_rate_per_s, self.log_burst, self.clock.monotonic_s())
        self.stdio_buffers: dict[int, bytearray] = {}

    def emit_log(self, level: int, message: str) -> bool:
        """Log a line from the app; False when the rate limit dropped it. Control
        characters are escaped here, once for every sink: an app cannot forge a
        log line (``\n``) or drive the operator's terminal (ANSI escapes)."""
        if not self.log_bucket.take(self.clock.monotonic_s()):
            self.stats.log_dropped += 1
            return False
        self.stats.log_lines += 1
        message = escape_controls(message)
        if self.log_sink is not None:
            self.log_sink(self.app, level, message)
        else:
            self.logger.log(level, "%s", message)
        return True
