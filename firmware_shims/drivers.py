"""Driver selection by name, with lazy imports.

A driver module is imported only when a device.toml names it, so a device
without pyserial or libgpiod still starts; asking for such a driver gives
a message naming the package to install.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from firmware_shims.base import Actuator, Clock, Sensor
from firmware_shims.env import ShimEnv
from firmware_shims.errors import MissingDependencyError, ShimConfigError

# name -> (module, sensor class, actuator class, pip/apt hint)
DRIVERS: dict[str, tuple[str, str | None, str | None, str]] = {
    "sim": ("firmware_shims.simulated", "SimSensor", "SimActuator", ""),
    "serial": ("firmware_shims.serial_sensors", "LineSensor", None, "pyserial"),
    "modbus": ("firmware_shims.serial_sensors", "ModbusSensor", None, "pyserial"),
    "thermal": ("firmware_shims.sysfs", "SysfsSensor", None, ""),
    "hwmon": ("firmware_shims.sysfs", "SysfsSensor", None, ""),
    "iio": ("firmware_shims.sysfs", "SysfsSensor", None, ""),
    "led": ("firmware_shims.sysfs", None, "SysfsActuator", ""),
    "backlight": ("firmware_shims.sysfs", None, "SysfsActuator", ""),
    "gpio": ("firmware_shims.sysfs", None, "GpioActuator", "python3-libgpiod (apt) or gpiod (pip)"),
}


def _load(kind: str, name: str, table: Mapping[str, Any]) -> type:
    driver = table.get("driver", "sim")
    if not isinstance(driver, str) or driver not in DRIVERS:
        known = ", ".join(sorted(DRIVERS))
        raise ShimConfigError("driver", f"unknown driver {driver!r} (known: {known})")
    module_name, sensor_cls, actuator_cls, hint = DRIVERS[driver]
    cls_name = sensor_cls if kind == "sensor" else actuator_cls
    if cls_name is None:
        raise ShimConfigError("driver", f"driver {driver!r} provides no {kind}s")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise MissingDependencyError(f"{kind} {name!r}: driver {driver!r} needs {hint or e.name}: {e}") from e
    cls: type = getattr(module, cls_name)
    return cls


def make_sensor(name: str, table: Mapping[str, Any], clock: Clock, env: ShimEnv | None = None) -> Sensor:
    cls = _load("sensor", name, table)
    sensor: Sensor = (
        cls(name, table, clock) if cls.__name__ == "SimSensor" else cls(name, table, clock, env or ShimEnv())
    )
    return sensor


def make_actuator(name: str, table: Mapping[str, Any], clock: Clock, env: ShimEnv | None = None) -> Actuator:
    cls = _load("actuator", name, table)
    actuator: Actuator = (
        cls(name, table, clock)
        if cls.__name__ == "SimActuator"
        else cls(name, table, clock, env or ShimEnv())
    )
    return actuator
