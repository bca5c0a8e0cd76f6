"""The device daemon: builds the device from its config and runs its apps.

Owns start-up order and shutdown: every sensor, actuator and app setting is
validated before anything runs; a clean stop (SIGTERM/SIGINT or ``stop()``)
stops the scheduler between ticks, flushes kv stores and closes drivers.
An app that fails to start is reported and the others run.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from devicerunner.apps import App, AppSpec, DeviceResources, Scheduler, start_instance
from devicerunner.config import AppConfig, DeviceConfig
from devicerunner.errors import ConfigError, DeviceRunnerError
from devicerunner.kvfile import KvFlusher, open_store
from devicerunner.sandbox import Limits, Sandbox, load_module_bytes
from firmware_shims import make_actuator, make_sensor
from firmware_shims.base import Actuator, Clock, RealClock, Sensor
from firmware_shims.errors import MissingDependencyError, ShimConfigError
from hostfuncs.context import LogSink
from hostfuncs.kv import KvStore
from hostfuncs.telemetry import Outbox

log = logging.getLogger(__name__)


def build_hardware(
    cfg_sensors: Mapping[str, Mapping[str, Any]],
    cfg_actuators: Mapping[str, Mapping[str, Any]],
    clock: Clock,
) -> tuple[dict[str, Sensor], dict[str, Actuator]]:
    """Every sensor and actuator, or ConfigError naming ``sensors.NAME.KEY``.
    On error, whatever was already opened is closed again."""
    sensors: dict[str, Sensor] = {}
    actuators: dict[str, Actuator] = {}
    try:
        for name, table in cfg_sensors.items():
            with _naming("sensors", name):
                sensors[name] = make_sensor(name, table, clock)
        for name, table in cfg_actuators.items():
            with _naming("actuators", name):
                actuators[name] = make_actuator(name, table, clock)
    except ConfigError:
        for s in sensors.values():
            s.close()
        for a in actuators.values():
            a.close()
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


def spec_from_config(app: AppConfig, wasm: bytes, grant: frozenset[str] | None = None) -> AppSpec:
    return AppSpec(
        name=app.name,
        wasm=wasm,
        grant=app.policy if grant is None else grant,
        limits=Limits(memory_bytes=app.memory_limit_bytes, tick_budget_ms=app.tick_budget_ms),
        tick_interval_ms=app.tick_interval_ms,
        health_interval_ms=app.health_interval_ms,
        sensors=app.sensors,
        actuators=app.actuators,
        telemetry_rate_per_s=app.telemetry_rate_per_s,
        telemetry_burst=app.telemetry_burst,
    )


class Daemon:
    def __init__(
        self, cfg: DeviceConfig, *, clock: Clock | None = None, log_sink: LogSink | None = None
    ) -> None:
        self.cfg = cfg
        self.clock = clock or RealClock()
        sensors, actuators = build_hardware(cfg.sensors, cfg.actuators, self.clock)
        self.resources = DeviceResources(
            clock=self.clock,
            sensors=sensors,
            actuators=actuators,
            outbox=Outbox(),
            log_sink=log_sink,
        )
        self.sandbox = Sandbox(cache_dir=cfg.state_dir / "cache")
        self.scheduler = Scheduler(self.clock)
        self.kv_flusher = KvFlusher()
        self.kv: dict[str, KvStore] = {}
        self.failed: dict[str, str] = {}
        self.stopped = threading.Event()

    def kv_for(self, app: AppConfig) -> KvStore:
        store = self.kv.get(app.name)
        if store is None:
            store = open_store(self.cfg.state_dir / "apps" / app.name / "kv", app.kv_quota_bytes)
            self.kv[app.name] = store
            self.kv_flusher.stores.append(store)
        return store

    def start_app(self, app: AppConfig, spec: AppSpec) -> App:
        inst = start_instance(self.sandbox, spec, self.resources, self.kv_for(app))
        a = App(spec, inst)
        self.scheduler.add(a)
        return a

    def start(self) -> None:
        for name, app in self.cfg.apps.items():
            if app.module is None:
                self.failed[name] = "no module configured and nothing installed"
                log.warning("app %s: %s", name, self.failed[name])
                continue
            try:
                spec = spec_from_config(app, load_module_bytes(app.module))
                self.start_app(app, spec)
                log.info("app %s started from %s", name, app.module)
            except DeviceRunnerError as e:
                self.failed[name] = str(e)
                log.error("app %s failed to start: %s", name, e)
        self.kv_flusher.start()
        self.scheduler.start()

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        self.scheduler.stop()
        self.kv_flusher.stop()
        for s in self.resources.sensors.values():
            s.close()
        for a in self.resources.actuators.values():
            a.close()
        self.sandbox.close()

    def status(self) -> dict[str, Any]:
        apps = {name: a.status() for name, a in self.scheduler.apps.items()}
        for name, why in self.failed.items():
            apps.setdefault(name, {"app": name, "running": False, "last_error": why})
        return {"device": self.cfg.id, "hardware": self.cfg.hardware, "apps": apps}
