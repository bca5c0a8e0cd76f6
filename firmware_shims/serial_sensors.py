"""Serial sensors: line-oriented ASCII (key=value, CSV, regex, NMEA 0183) and Modbus RTU.

Parser specs (``parser = ...``):

- ``kv:KEY``            ``t=21.5 h=40`` / ``t=21.5,h=40`` / ``t:21.5`` -> the value of KEY
- ``csv:N``             the N-th (0-based) comma-separated column
- ``regex:PATTERN``     PATTERN must have a named group ``value``
- ``nmea:TYPE:FIELD``   ``$--TYPE,...*hh`` sentences, checksum verified, FIELD 1-based

Every value goes through ``value * scale + offset``.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable, Mapping
from typing import Any

from firmware_shims.base import Clock
from firmware_shims.env import ShimEnv
from firmware_shims.errors import ShimConfigError
from firmware_shims.serial_port import CellSensor, Port, PortSettings, SampleCell
from firmware_shims.spec import Options

Parser = Callable[[str], float | None]
"""Returns the value, None if the line is not for this sensor; raises ValueError if malformed."""


class Malformed(ValueError):
    pass


def nmea_checksum_ok(line: str) -> bool:
    if not line.startswith("$") or "*" not in line:
        return False
    body, _, cs = line[1:].rpartition("*")
    if not _NMEA_CHECKSUM.fullmatch(cs):  # exactly two hex digits: "*A" or "*A5x" is not a checksum
        return False
    x = 0
    for ch in body.encode("ascii", "replace"):
        x ^= ch
    return int(cs, 16) == x


_NMEA_CHECKSUM = re.compile(r"[0-9A-Fa-f]{2}")


def make_parser(spec: str) -> Parser:
    kind, _, arg = spec.partition(":")
    if kind == "kv" and arg:
        pat = re.compile(rf"(?:^|[\s,;]){re.escape(arg)}\s*[=:]\s*([^\s,;]+)")

        def kv(line: str) -> float | None:
            m = pat.search(line)
            if m is None:
                return None
            return _num(m.group(1))

        return kv
    if kind == "csv":
        try:
            col = int(arg)
        except ValueError:
            raise ShimConfigError("parser", f"csv needs a column number, e.g. csv:2; got {spec!r}") from None

        def csv(line: str) -> float | None:
            parts = line.split(",")
            if len(parts) <= col:
                raise Malformed(f"line has {len(parts)} columns, need {col + 1}")
            return _num(parts[col].strip())

        return csv
    if kind == "regex":
        try:
            rx = re.compile(arg)
        except re.error as e:
            raise ShimConfigError("parser", f"bad regex: {e}") from None
        if "value" not in rx.groupindex:
            raise ShimConfigError("parser", "regex needs a named group (?P<value>...)")

        def regex(line: str) -> float | None:
            m = rx.search(line)
            return None if m is None else _num(m.group("value"))

        return regex
    if kind == "nmea":
        stype, _, field = arg.partition(":")
        if not re.fullmatch(r"[A-Z]{3}", stype) or not field.isdigit() or int(field) < 1:
            raise ShimConfigError("parser", f"nmea needs TYPE:FIELD, e.g. nmea:MTW:1; got {spec!r}")
        idx = int(field)

        def nmea(line: str) -> float | None:
            if not line.startswith("$"):
                return None
            parts = line.split("*", 1)[0].split(",")
            if parts[0][-3:] != stype:
                return None
            if not nmea_checksum_ok(line):
                raise Malformed("NMEA checksum mismatch")
            if len(parts) <= idx or parts[idx] == "":
                raise Malformed(f"NMEA {stype} has no field {idx}")
            return _num(parts[idx])

        return nmea
    raise ShimConfigError(
        "parser", f"unknown parser {spec!r} (kv:KEY, csv:N, regex:PATTERN, nmea:TYPE:FIELD)"
    )


def _num(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise Malformed(f"not a number: {text[:20]!r}") from None
    if not math.isfinite(v):
        raise Malformed("not a finite number")
    return v


class _SerialSensorBase(CellSensor):
    def __init__(self, name: str, o: Options) -> None:
        self.name = name
        self.unit = o.text("unit", "")
        self.scale = o.number("scale", 1.0)
        self.offset = o.number("offset", 0.0)
        self.cell = SampleCell(o.integer("max_age_ms", 5000, min_value=1) / 1000.0)


class LineSensor(_SerialSensorBase):
    """ASCII lines from a serial device; the port's reader thread fills the cell."""

    driver = "serial"

    def __init__(self, name: str, table: Mapping[str, Any], clock: Clock, env: ShimEnv) -> None:
        o = Options(table)
        super().__init__(name, o)
        spec = o.opt_text("parser")
        if not spec:
            raise ShimConfigError("parser", "is required (kv:KEY, csv:N, regex:PATTERN or nmea:TYPE:FIELD)")
        self.parser = make_parser(spec)
        self.port: Port = env.ports.get(PortSettings.from_options(o), "line")
        o.finish()
        self.port.attach(self.cell)
        self.port.line_handlers.append(self._line)
        self.port.start()

    @property
    def dropped(self) -> int:
        """Lines the port threw away as over-long (no newline within 512 bytes)."""
        return self.port.overlong

    @property
    def reconnects(self) -> int:
        return self.port.reconnects

    def _line(self, line: str) -> None:
        try:
            v = self.parser(line)
        except Malformed as e:
            self.cell.bad(self.name, f"malformed line {line[:40]!r}: {e}")
            return
        if v is not None:
            self.cell.put(v * self.scale + self.offset)

    def describe(self) -> str:
        return f"serial {self.port.settings.url}"

    def close(self) -> None:
        self.port.stop()


# -- Modbus RTU -------------------------------------------------------------------------


def crc16(data: bytes) -> int:
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def rtu_request(unit: int, function: int, register: int, count: int) -> bytes:
    pdu = struct.pack(">BBHH", unit, function, register, count)
    return pdu + struct.pack("<H", crc16(pdu))


def rtu_response_registers(frame: bytes, unit: int, function: int, count: int) -> list[int]:
    """Registers from a response frame; raises Malformed on CRC, address, exception or length."""
    if len(frame) < 5:
        raise Malformed(f"short frame ({len(frame)} bytes)")
    if crc16(frame[:-2]) != struct.unpack("<H", frame[-2:])[0]:
        raise Malformed("CRC mismatch")
    if frame[0] != unit:
        raise Malformed(f"answer from unit {frame[0]}, asked {unit}")
    if frame[1] == function | 0x80:
        raise Malformed(f"Modbus exception code {frame[2]}")
    if frame[1] != function or frame[2] != 2 * count or len(frame) != 5 + 2 * count:
        raise Malformed("unexpected function or byte count")
    return list(struct.unpack(f">{count}H", frame[3 : 3 + 2 * count]))


DATA_TYPES = {"u16": (1, ">H"), "s16": (1, ">h"), "u32": (2, ">I"), "s32": (2, ">i"), "f32": (2, ">f")}
WORD_ORDERS = ("big", "little")
"""For 32-bit values: ``big`` = high word in the first register (the Modbus
convention), ``little`` = low word first (many meters and PLCs)."""


class ModbusSensor(_SerialSensorBase):
    """One value from Modbus RTU registers (function 3 or 4), polled by the bus thread."""

    driver = "modbus"

    def __init__(self, name: str, table: Mapping[str, Any], clock: Clock, env: ShimEnv) -> None:
        o = Options(table)
        super().__init__(name, o)
        self.unit_id = o.integer("unit_id", 1, min_value=1)
        if self.unit_id > 247:
            raise ShimConfigError("unit_id", "must be 1..247")
        self.function = o.integer("function", 3)
        if self.function not in (3, 4):
            raise ShimConfigError("function", "must be 3 (holding registers) or 4 (input registers)")
        self.register = o.integer("register", 0, min_value=0)
        self.data_type = o.text("data_type", "u16", tuple(DATA_TYPES))
        self.count, self.fmt = DATA_TYPES[self.data_type]
        self.word_order = o.text("word_order", "big", WORD_ORDERS)
        poll_s = o.integer("poll_ms", 1000, min_value=10) / 1000.0
        self.port: Port = env.ports.get(PortSettings.from_options(o), "modbus")
        o.finish()
        self.port.poll_s = min(self.port.poll_s, poll_s)
        self.port.attach(self.cell)
        self.port.pollers.append(self._poll)
        self.port.start()

    def _poll(self, port: Any) -> None:
        req = rtu_request(self.unit_id, self.function, self.register, self.count)
        port.reset_input_buffer()
        port.write(req)
        # Read the header first: an exception reply is 5 bytes, and asking for
        # the full length would wait out the whole read timeout for it.
        frame = bytes(port.read(2))
        if len(frame) == 2:
            rest = 3 if frame[1] & 0x80 else 3 + 2 * self.count
            frame += bytes(port.read(rest))
        if not frame:
            self.cell.bad(self.name, f"no answer from unit {self.unit_id}")
            return
        try:
            regs = rtu_response_registers(bytes(frame), self.unit_id, self.function, self.count)
        except Malformed as e:
            self.cell.bad(self.name, str(e))
            return
        if self.word_order == "little":
            regs.reverse()
        raw = struct.pack(f">{self.count}H", *regs)
        (v,) = struct.unpack(self.fmt, raw)
        self.cell.put(float(v) * self.scale + self.offset)

    def describe(self) -> str:
        return f"modbus {self.port.settings.url} unit {self.unit_id} reg {self.register}"

    def close(self) -> None:
        self.port.stop()
