"""Fake hardware speaking real bytes: a line device and a Modbus RTU responder on
ptys, reachable through a stable symlink so they can be unplugged and replugged."""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
import tty
from pathlib import Path

from firmware_shims.serial_sensors import crc16


class PtyDevice:
    def __init__(self, link: Path) -> None:
        self.link = link
        self.master = -1
        self.slave = -1
        self.plug()

    def plug(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        with contextlib.suppress(FileNotFoundError):
            self.link.unlink()
        self.link.symlink_to(os.ttyname(self.slave))

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def unplug(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.link.unlink()
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.master = self.slave = -1

    def close(self) -> None:
        self.unplug()


class ModbusResponder(PtyDevice):
    """Answers function 3/4 requests from a register map; can corrupt CRCs on purpose,
    answer with a Modbus exception for chosen registers, and records when each
    request arrived and each reply left (to check the bus's silent intervals)."""

    def __init__(self, link: Path, unit: int, registers: dict[int, int]) -> None:
        super().__init__(link)
        self.unit = unit
        self.registers = registers
        self.corrupt_next = 0
        self.requests = 0
        self.exceptions: dict[int, int] = {}
        """register -> Modbus exception code to answer with"""
        self.timeline: list[tuple[str, float]] = []
        """("request" | "reply", time.monotonic()) in order"""
        self._stop = threading.Event()
        self.restart()

    def restart(self) -> None:
        """Serve again (after ``plug()``: the old server stopped with its pty)."""
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        buf = b""
        while not self._stop.is_set():
            try:
                import select

                r, _, _ = select.select([self.master], [], [], 0.1)
                if not r:
                    continue
                buf += os.read(self.master, 64)
            except (OSError, ValueError):  # unplugged: the pty is gone (fd -1)
                return
            while len(buf) >= 8:
                req, buf = buf[:8], buf[8:]
                unit, fn, reg, count = struct.unpack(">BBHH", req[:6])
                if crc16(req[:6]) != struct.unpack("<H", req[6:])[0] or unit != self.unit:
                    continue
                self.requests += 1
                self.timeline.append(("request", time.monotonic()))
                if reg in self.exceptions:
                    pdu = bytes([unit, fn | 0x80, self.exceptions[reg]])
                else:
                    data = b"".join(struct.pack(">H", self.registers.get(reg + i, 0)) for i in range(count))
                    pdu = bytes([unit, fn, 2 * count]) + data
                crc = crc16(pdu)
                if self.corrupt_next:
                    self.corrupt_next -= 1
                    crc ^= 0xFFFF
                self.timeline.append(("reply", time.monotonic()))  # before: the poller may answer at once
                os.write(self.master, pdu + struct.pack("<H", crc))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        super().close()
