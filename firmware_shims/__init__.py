"""The hardware edge: sensors and actuators behind two small protocols.

Drivers are chosen by name (``driver = "sim"`` in device.toml) and imported
lazily, so a missing optional dependency is reported with the package to
install instead of failing at import time.
"""

from firmware_shims.base import (
    Actuator,
    Clock,
    RealClock,
    Sensor,
    SensorReading,
    Status,
    VirtualClock,
)
from firmware_shims.drivers import DRIVERS, make_actuator, make_sensor

__all__ = [
    "DRIVERS",
    "Actuator",
    "Clock",
    "RealClock",
    "Sensor",
    "SensorReading",
    "Status",
    "VirtualClock",
    "make_actuator",
    "make_sensor",
]
