"""The device's hardware from its config: every sensor and actuator driver,
opened before anything runs, or a ConfigError naming ``sensors.NAME.KEY``.

Kept apart from the daemon so that tools that only look at hardware
(``devicerunner sensors``) do not load the sandbox.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from devicerunner.errors import ConfigError
from firmware_shims import make_actuator, make_sensor
from firmware_shims.base import Actuator, Clock, Sensor
from firmware_shims.env import ShimEnv
from firmware_shims.errors import MissingDependencyError, ShimConfigError


def build_hardware(
    cfg_sensors: Mapping[str, Mapping[str, Any]],
    cfg_actuators: Mapping[str, Mapping[str, Any]],
    clock: Clock,
    env: ShimEnv | None = None,
) -> tuple[dict[str, Sensor], dict[str, Actuator]]:
    """Every sensor and actuator, or ConfigError naming ``sensors.NAME.KEY``.
    On error, whatever was already opened is closed again."""
    env = env or ShimEnv()
    sensors: dict[str, Sensor] = {}
    actuators: dict[str, Actuator] = {}
    try:
        for name, table in cfg_sensors.items():
            with _naming("sensors", name):
                sensors[name] = make_sensor(name, table, clock, env)
        for name, table in cfg_actuators.items():
            with _naming("actuators", name):
                actuators[name] = make_actuator(name, table, clock, env)
    except ConfigError:
        for s in sensors.values():
            s.close()
        for a in actuators.values():
            a.close()
        env.close()
        raise
    return sensors, actuators


@contextlib.contextmanager
def _naming(kind: str, name: str) -> Iterator[None]:
    try:
        yield
    except ShimConfigError as e:
        raise ConfigError(f"{kind}.{name}.{e.key}: {e.message}") from e
    except MissingDependencyError as e:
        raise ConfigError(f"{kind}.{name}.driver: {e}") from e
