"""Serial ports shared by sensors: one reader (or poller) thread per port.

Invariants:
- Host calls never touch the port: each sensor keeps its newest sample and
  a short history, written by the port's thread, read in O(1).
- A failing or unplugged port marks its sensors OFFLINE, is closed, and is
  reopened with capped exponential backoff with full jitter; sensors come
  back by themselves when the device returns.
- Malformed input (bad checksum, unparsable line, over-long line, bad CRC)
  is counted per sensor/port and logged at most once per LOG_EVERY_S; it
  never ends the thread.
- The port is opened by URL or path (``serial.serial_for_url``): device
  paths, ``loop://``, ``socket://host:port``, ``rfc2217://host:port``.
- A sensor that joins a port already open is online at once: "online" is
  the port's state, copied into every cell under one lock, whenever the
  cell joined.
- On a Modbus RTU bus every request follows at least t3.5 (3.5 character
  times) of silence after the previous frame, as the standard requires.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import termios
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from firmware_shims.base import SensorReading, Status
from firmware_shims.errors import ShimConfigError
from firmware_shims.spec import Options

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0
MAX_LINE = 512
HISTORY = 1024
PARITIES = {"N": "N", "E": "E", "O": "O", "M": "M", "S": "S"}


@dataclass(frozen=True)
class PortSettings:
    url: str
    baudrate: int
    parity: str
    bytesize: int
    stopbits: float
    timeout_s: float
    reconnect_min_s: float
    reconnect_max_s: float

    @classmethod
    def from_options(cls, o: Options) -> PortSettings:
        url = o.opt_text("port")
        if not url:
            raise ShimConfigError(
                "port", "is required (a device path or a pyserial URL such as socket://host:port)"
            )
        settings = cls(
            url=url,
            baudrate=o.integer("baudrate", 9600, min_value=50),
            parity=o.text("parity", "N", tuple(PARITIES)),
            bytesize=o.integer("bytesize", 8, min_value=5),
            stopbits=o.number("stopbits", 1.0, min_value=1.0),
            timeout_s=o.integer("timeout_ms", 200, min_value=1) / 1000.0,
            reconnect_min_s=o.number("reconnect_min_s", 0.2, min_value=0.01),
            reconnect_max_s=o.number("reconnect_max_s", 10.0, min_value=0.01),
        )
        if settings.reconnect_max_s < settings.reconnect_min_s:
            raise ShimConfigError(
                "reconnect_max_s",
                f"must be >= reconnect_min_s ({settings.reconnect_min_s}), got {settings.reconnect_max_s}",
            )
        return settings

    @property
    def t35_s(self) -> float:
        """Modbus RTU inter-frame silence: 3.5 characters of 11 bits, fixed at
        1.75 ms above 19,200 baud (Modbus over serial line, 2.5.1.1)."""
        if self.baudrate > 19200:
            return 0.00175
        return 3.5 * 11 / self.baudrate


class SampleCell:
    """Latest sample + short history of one sensor; written by one port thread."""

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self.value = math.nan
        self.t = -math.inf
        self.seq = 0
        self.hist: deque[tuple[int, float]] = deque(maxlen=HISTORY)
        self.online = False
        self.malformed = 0
        self._last_log = -math.inf

    def put(self, value: float) -> None:
        self.seq += 1
        self.hist.append((self.seq, value))
        self.value, self.t = value, time.monotonic()

    def reading(self) -> SensorReading:
        if not self.online:
            return SensorReading(Status.OFFLINE, self.value, self.t)
        if time.monotonic() - self.t > self.max_age_s:
            return SensorReading(Status.STALE, self.value, self.t)
        return SensorReading(Status.OK, self.value, self.t)

    def since(self, seq: int, max_n: int) -> tuple[list[float], int]:
        vals = [v for s, v in self.hist if s > seq][-max_n:] if max_n > 0 else []
        return vals, (self.seq if vals else seq)

    def bad(self, name: str, what: str) -> None:
        self.malformed += 1
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.warning("sensor %s: %s (%d malformed so far)", name, what, self.malformed)


class CellSensor:
    """A sensor whose samples live in a SampleCell filled by a driver's own thread
    (serial reader, Modbus poller, sysfs I/O worker): reads never touch hardware."""

    name: str
    unit: str
    cell: SampleCell

    def read(self) -> SensorReading:
        return self.cell.reading()

    def samples_since(self, seq: int, max_n: int) -> tuple[list[float], int]:
        return self.cell.since(seq, max_n)

    @property
    def malformed(self) -> int:
        return self.cell.malformed

    def close(self) -> None:
        pass


class Port:
    """Owns one serial port and the thread that talks to it."""

    def __init__(self, settings: PortSettings, kind: str) -> None:
        self.settings = settings
        self.kind = kind  # "line" or "modbus"
        self.cells: list[SampleCell] = []
        self.line_handlers: list[Callable[[str], None]] = []
        self.pollers: list[Callable[[Any], None]] = []
        self.poll_s = 1.0
        self.online = False
        self._cells_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = random.Random()
        self.reconnects = 0
        self.overlong = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"serial:{self.settings.url}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2 * self.settings.timeout_s + 1)

    def attach(self, cell: SampleCell) -> None:
        """Add a sensor's cell; it takes the port's current state (a port opened
        before this sensor joined must not leave it OFFLINE until a reconnect)."""
        with self._cells_lock:
            cell.online = self.online
            self.cells.append(cell)

    def _set_online(self, online: bool) -> None:
        with self._cells_lock:
            self.online = online
            for c in self.cells:
                c.online = online

    def _open(self) -> Any:
        import serial  # pyserial: a core dependency

        s = self.settings
        return serial.serial_for_url(
            s.url,
            baudrate=s.baudrate,
            parity=PARITIES[s.parity],
            bytesize=s.bytesize,
            stopbits=s.stopbits,
            timeout=s.timeout_s,
            write_timeout=s.timeout_s,
        )

    def _run(self) -> None:
        import serial

        attempt = 0
        while not self._stop.is_set():
            try:
                port = self._open()
            except (serial.SerialException, OSError, ValueError) as e:
                self._set_online(False)
                delay = self._rng.uniform(
                    0, min(self.settings.reconnect_max_s, self.settings.reconnect_min_s * 2**attempt)
                )
                log.info(
                    "serial %s: open failed (%s); retry %d in %.2f s",
                    self.settings.url,
                    e,
                    attempt + 1,
                    delay,
                )
                attempt += 1
                self._stop.wait(delay)
                continue
            if attempt:
                self.reconnects += 1
                log.info("serial %s: reconnected", self.settings.url)
            attempt = 0
            self._set_online(True)
            try:
                if self.kind == "line":
                    self._read_lines(port)
                else:
                    self._poll(port)
            except (serial.SerialException, OSError, termios.error) as e:
                # termios.error is not an OSError: a pty or USB adapter that goes away
                # mid-flush raises it, and it must not kill this thread.
                log.warning("serial %s: %s; marking its sensors offline", self.settings.url, e)
            finally:
                self._set_online(False)
                with contextlib.suppress(serial.SerialException, OSError, termios.error):
                    port.close()

    def _read_lines(self, port: Any) -> None:
        buf = bytearray()
        while not self._stop.is_set():
            chunk = port.read(port.in_waiting or 1)
            if not chunk:
                if _gone(port):
                    raise OSError("device went away")
                continue
            buf += chunk
            while (nl := buf.find(b"\n")) >= 0:
                line = bytes(buf[:nl]).strip(b"\r")
                del buf[: nl + 1]
                if len(line) > MAX_LINE:
                    self.overlong += 1
                    continue
                text = line.decode("ascii", "replace").strip()
                if text:
                    for h in self.line_handlers:
                        h(text)
            if len(buf) > MAX_LINE:  # no newline in sight: garbage, drop it
                self.overlong += 1
                buf.clear()

    def _poll(self, port: Any) -> None:
        t35 = self.settings.t35_s
        while not self._stop.is_set():
            t0 = time.monotonic()
            for poll in list(self.pollers):
                poll(port)
                time.sleep(t35)  # the bus must be silent before the next frame
            self._stop.wait(max(0.0, self.poll_s - (time.monotonic() - t0)))


def _gone(port: Any) -> bool:
    """A pty whose other end closed reads empty forever on some platforms; probe it."""
    fd = getattr(port, "fd", None)
    if fd is None:
        return False
    import os

    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


class PortRegistry:
    """One Port per URL per device; a URL is either a line port or a Modbus bus."""

    def __init__(self) -> None:
        self.ports: dict[str, Port] = {}

    def get(self, settings: PortSettings, kind: str) -> Port:
        p = self.ports.get(settings.url)
        if p is None:
            p = self.ports[settings.url] = Port(settings, kind)
        elif p.kind != kind:
            raise ShimConfigError("driver", f"port {settings.url} is already used by a {p.kind} sensor")
        elif p.settings != settings:
            raise ShimConfigError("port", f"{settings.url} is configured twice with different settings")
        return p
