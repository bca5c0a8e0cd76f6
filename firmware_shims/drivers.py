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
from firmware_shims.errors import MissingDependencyError, ShimConfigError

# name -> (module, sensor class, actuator class, pip/apt hint)
DRIVERS: dict[str, tuple[str, str | None, str | None, str]] = {
    "sim": ("firmware_shims.simulated", "SimSensor", "SimActuator", ""),
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


def make_sensor(name: str, table: Mapping[str, Any], clock: Clock) -> Sensor:
    sensor: Sensor = _load("sensor", name, table)(name, table, clock)
    return sensor


def make_actuator(name: str, table: Mapping[str, Any], clock: Clock) -> Actuator:
    actuator: Actuator = _load("actuator", name, table)(name, table, clock)
    return actuator
