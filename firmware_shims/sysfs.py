"""Linux sysfs sensors and actuators, read and written on the device's I/O thread.

Sensors (values in SI-ish units):

- ``thermal``: ``class/thermal/thermal_zone*/temp`` (millidegree C -> C);
  ``zone = 0`` or the zone's ``type`` (e.g. ``"x86_pkg_temp"``).
- ``hwmon``: ``class/hwmon/hwmon*/<input>``; ``chip`` is the chip's ``name``
  or ``hwmonN``; ``input`` like ``temp1_input`` (m C -> C), ``fan1_input``
  (RPM), ``in0_input`` (mV -> V), ``curr1_input`` (mA -> A), ``power1_input``
  (uW -> W).
- ``iio``: ``bus/iio/devices/iio:deviceN/<channel>_raw`` with ``_scale`` and
  ``_offset`` (or the shared ``in_voltage_scale`` form): (raw + offset) * scale.

Actuators: ``led`` (``class/leds/<name>/brightness``, 0..max_brightness,
values clamped), ``backlight`` (``class/backlight/<name>/brightness``).

``sysfs_root`` (default ``/sys``, set per device in ``[device]``) lets tests
and the simulator point drivers at a prepared tree.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from firmware_shims.base import Clock, Status
from firmware_shims.env import ShimEnv
from firmware_shims.errors import ShimConfigError
from firmware_shims.serial_port import CellSensor, SampleCell
from firmware_shims.spec import Options

HWMON_UNITS = {
    "temp": (0.001, "C"),
    "fan": (1.0, "RPM"),
    "in": (0.001, "V"),
    "curr": (0.001, "A"),
    "power": (1e-6, "W"),
    "energy": (1e-6, "J"),
    "humidity": (0.001, "%"),
}


def _find_by_name(base: Path, prefix: str, wanted: str, name_file: str) -> Path:
    if (base / wanted).is_dir():
        return base / wanted
    for d in sorted(base.glob(f"{prefix}*")):
        try:
            if (d / name_file).read_text().strip() == wanted:
                return d
        except OSError:
            continue
    raise ShimConfigError(
        "chip" if prefix == "hwmon" else "device", f"no {prefix} named {wanted!r} under {base}"
    )


def _read_num(path: Path) -> float:
    return float(path.read_text().strip())


class SysfsSensor(CellSensor):
    driver = "sysfs"

    def __init__(self, name: str, table: Mapping[str, Any], clock: Clock, env: ShimEnv) -> None:
        o = Options(table)
        self.name = name
        kind = o.text("driver", "thermal")
        poll_s = o.integer("poll_ms", 1000, min_value=10) / 1000.0
        self.cell = SampleCell(o.integer("max_age_ms", int(poll_s * 5000), min_value=1) / 1000.0)
        root = env.sysfs_root
        self.scale_extra = o.number("scale", 1.0)
        self.offset_extra = o.number("offset", 0.0)
        self.offset_path: Path | None = None
        self.scale_path: Path | None = None
        if kind == "thermal":
            zone = table.get("zone", 0)
            o.text("zone", "") if isinstance(zone, str) else o.integer("zone", 0, min_value=0)
            base = root / "class" / "thermal"
            d = (
                base / f"thermal_zone{zone}"
                if isinstance(zone, int)
                else _find_by_name(base, "thermal_zone", zone, "type")
            )
            self.path, self.factor, unit = d / "temp", 0.001, "C"
        elif kind == "hwmon":
            chip = o.opt_text("chip")
            inp = o.opt_text("input")
            if not chip or not inp:
                raise ShimConfigError("chip" if not chip else "input", "is required for hwmon")
            d = _find_by_name(root / "class" / "hwmon", "hwmon", chip, "name")
            kindname = next((k for k in HWMON_UNITS if inp.startswith(k)), None)
            if kindname is None or not inp.endswith("_input"):
                raise ShimConfigError("input", f"{inp!r}: expected temp*_input, fan*_input, in*_input, ...")
            self.factor, unit = HWMON_UNITS[kindname]
            self.path = d / inp
        elif kind == "iio":
            dev = o.opt_text("device")
            ch = o.opt_text("channel")
            if not dev or not ch:
                raise ShimConfigError("device" if not dev else "channel", "is required for iio")
            d = _find_by_name(root / "bus" / "iio" / "devices", "iio:device", dev, "name")
            self.path, self.factor, unit = d / f"{ch}_raw", 1.0, ""
            typ = ch.rstrip("0123456789")  # in_voltage0 -> in_voltage (the shared attribute)
            self.scale_path = next((p for p in (d / f"{ch}_scale", d / f"{typ}_scale") if p.exists()), None)
            self.offset_path = next(
                (p for p in (d / f"{ch}_offset", d / f"{typ}_offset") if p.exists()), None
            )
        else:
            raise ShimConfigError("driver", f"unknown sysfs sensor driver {kind!r}")
        self.unit = o.text("unit", unit)
        o.finish()
        if not self.path.exists():
            raise ShimConfigError("driver", f"{self.path} does not exist")
        self.kind = kind
        env.io.every(poll_s, self._poll)

    def _poll(self) -> None:
        try:
            raw = _read_num(self.path)
            v = raw * self.factor
            if self.scale_path is not None or self.offset_path is not None:
                off = _read_num(self.offset_path) if self.offset_path else 0.0
                sc = _read_num(self.scale_path) if self.scale_path else 1.0
                v = (raw + off) * sc
        except (OSError, ValueError) as e:
            self.cell.online = False
            self.cell.bad(self.name, f"cannot read {self.path}: {e}")
            return
        self.cell.online = True
        self.cell.put(v * self.scale_extra + self.offset_extra)

    def describe(self) -> str:
        return f"{self.kind} {self.path}"


class SysfsActuator:
    """LED or backlight brightness; writes are queued to the I/O thread."""

    driver = "sysfs"

    def __init__(self, name: str, table: Mapping[str, Any], clock: Clock, env: ShimEnv) -> None:
        o = Options(table)
        self.name = name
        kind = o.text("driver", "led")
        dev = o.text("device", name)
        cls = {"led": "leds", "backlight": "backlight"}.get(kind)
        if cls is None:
            raise ShimConfigError("driver", f"unknown sysfs actuator driver {kind!r}")
        d = env.sysfs_root / "class" / cls / dev
        self.path = d / "brightness"
        if not self.path.exists():
            raise ShimConfigError("device", f"{self.path} does not exist")
        try:
            self.max = int((d / "max_brightness").read_text().strip())
        except (OSError, ValueError):
            self.max = 255
        self.unit = o.text("unit", "")
        o.finish()
        self._value: float | None = None
        self._env = env
        self.errors = 0
        self.online = True

    def set(self, value: float) -> Status:
        if not self.online:
            return Status.OFFLINE
        level = max(0, min(self.max, round(value if value > 1 or value == 0 else value * self.max)))
        self._value = value
        self._env.io.submit(lambda: self._write(level))
        return Status.OK

    def _write(self, level: int) -> None:
        try:
            self.path.write_text(f"{level}\n")
            self.online = True
        except OSError:
            self.errors += 1
            self.online = False

    @property
    def value(self) -> float | None:
        return self._value

    def describe(self) -> str:
        return f"sysfs {self.path}"

    def close(self) -> None:
        pass


class GpioActuator:
    """A GPIO output line through libgpiod's Python binding (v2 API), imported lazily."""

    driver = "gpio"

    def __init__(self, name: str, table: Mapping[str, Any], clock: Clock, env: ShimEnv) -> None:
        o = Options(table)
        self.name = name
        chip = o.text("chip", "/dev/gpiochip0")
        line = o.integer("line", None, min_value=0)
        if line is None:
            raise ShimConfigError("line", "is required (the line offset on the chip)")
        active_low = o.get("active_low", False)
        if not isinstance(active_low, bool):
            raise ShimConfigError("active_low", f"must be true or false, got {active_low!r}")
        self.unit = o.text("unit", "")
        o.finish()
        try:
            import gpiod
        except ImportError as e:
            from firmware_shims.errors import MissingDependencyError

            raise MissingDependencyError(
                "the gpio driver needs libgpiod's Python binding: apt-get install python3-libgpiod, "
                "or pip install gpiod"
            ) from e
        path = chip if chip.startswith("/") else f"/dev/{chip}"
        settings = gpiod.LineSettings(direction=gpiod.line.Direction.OUTPUT, active_low=active_low)
        self._req = gpiod.request_lines(path, consumer="devicerunner", config={line: settings})
        self._line = line
        self._gpiod = gpiod
        self._env = env
        self._value: float | None = None

    def set(self, value: float) -> Status:
        v = self._gpiod.line.Value.ACTIVE if value else self._gpiod.line.Value.INACTIVE
        self._value = 1.0 if value else 0.0
        self._env.io.submit(lambda: self._req.set_value(self._line, v))
        return Status.OK

    @property
    def value(self) -> float | None:
        return self._value

    def describe(self) -> str:
        return f"gpio line {self._line}"

    def close(self) -> None:
        self._req.release()
