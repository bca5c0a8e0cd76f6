"""The device daemon: builds the device from its config and runs its apps.

Owns start-up order and shutdown: every sensor, actuator and app setting is
validated before anything runs; a clean stop (SIGTERM/SIGINT or ``stop()``)
stops the scheduler between ticks, flushes kv stores and closes drivers.
An app that fails to start is reported and the others run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from devicerunner.device.apps import App, AppSpec, DeviceResources, Scheduler, start_instance
from devicerunner.device.config import AppConfig, DeviceConfig
from devicerunner.device.kvfile import KvFlusher, open_store
from devicerunner.errors import ConfigError, DeviceRunnerError
from devicerunner.runtime.fsutil import atomic_write, clean_temp_files, makedirs
from devicerunner.runtime.process import Runtime
from devicerunner.sandbox.engine import AppInstance, Limits, Sandbox
from firmware_shims import make_actuator, make_sensor
from firmware_shims.base import Actuator, Clock, RealClock, Sensor
from firmware_shims.env import ShimEnv
from firmware_shims.errors import MissingDependencyError, ShimConfigError
from hostfuncs.context import LogSink
from hostfuncs.kv import KvStore
from hostfuncs.telemetry import Outbox

log = logging.getLogger(__name__)


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
    """One device: hardware, sandbox, scheduler, kv flusher, updater."""

    STATUS_EVERY_S = 1.0

    def __init__(
        self,
        cfg: DeviceConfig,
        *,
        clock: Clock | None = None,
        log_sink: LogSink | None = None,
        sandbox: Sandbox | None = None,
        runtime: Runtime | None = None,
        status_file: bool = True,
    ) -> None:
        """``sandbox`` and ``runtime``: share one engine (and its compile
        cache) and one set of threads between the daemons of one process, as
        the fleet simulator does. A daemon alone owns both."""
        from devicerunner.trust.store import TrustStore
        from devicerunner.update.updater import Updater

        self.cfg = cfg
        self.clock = clock or RealClock()
        self.shim_env = ShimEnv(sysfs_root=cfg.sysfs_root)
        sensors, actuators = build_hardware(cfg.sensors, cfg.actuators, self.clock, self.shim_env)
        self.resources = DeviceResources(
            clock=self.clock, sensors=sensors, actuators=actuators, outbox=Outbox(), log_sink=log_sink
        )
        self.trust = TrustStore(cfg.state_dir, cfg.trust_root)
        self._own_sandbox = sandbox is None
        self.sandbox = sandbox or Sandbox(cache_dir=cfg.state_dir / "cache")
        self._status_file = status_file
        self._own_runtime = runtime is None
        self.runtime = runtime or Runtime(name=cfg.id)
        self.scheduler = Scheduler(self.clock, self.runtime.ticks.lane(f"{cfg.id}/scheduler"))
        self.kv_flusher = KvFlusher(self.runtime.work.lane(f"{cfg.id}/kv"))
        self.kv: dict[str, KvStore] = {}
        self.failed: dict[str, str] = {}
        self.deferred: dict[str, Any] = {}
        self.stopped = threading.Event()
        self.started_at = time.time()
        self.updater = Updater(self)
        self.recent_events: list[dict[str, Any]] = []
        self.updater.listeners.append(self._remember)
        self.waiting: dict[str, Any] = {}
        """app -> a verified release this device is not (yet) in the rollout of."""
        self.rollouts: dict[str, Any] = {}
        self.transport: Any = None
        if cfg.broker is not None:
            from devicerunner.transport.channel import DeviceTransport

            self.transport = DeviceTransport(self)
        self._status_lane = self.runtime.work.lane(f"{cfg.id}/status")

    def _remember(self, ev: dict[str, Any]) -> None:
        self.recent_events = [*self.recent_events[-19:], ev]

    def broker_lost_s(self) -> float:
        """Seconds the broker has been unreachable (0 without a broker)."""
        return 0.0 if self.transport is None else float(self.transport.lost_s())

    def eligible(self, m: Any) -> bool:
        """Is this device in the release's rollout (stable hash of id and salt)?"""
        from devicerunner.trust import verify as trust

        return trust.eligible(self.cfg.id, m, self.rollouts.get(m.app))

    def on_rollout_document(self, topic: str, payload: bytes) -> None:
        """A rollout document (signed by the rollout role) arrived: accept it if it
        verifies and is newer, then start a waiting release if we are now in it."""
        from devicerunner.errors import RollbackError, VerificationError

        if not payload or self.trust.root is None:
            return
        app = topic.rsplit("/", 2)[-2]
        current = self.rollouts.get(app)
        try:
            doc = self._verify_rollout(payload, current.version if current else 0)
        except RollbackError:
            return  # the same (or an older) document again: nothing new
        except VerificationError as e:
            log.warning("rollout document for %s refused: %s", app, e)
            self.updater.emit(app, "REJECTED", reason=e.reason, reason_text=f"rollout document: {e}")
            return
        if doc.app != app or app not in self.cfg.apps:
            return
        self.rollouts[app] = doc
        try:  # kept across reboots: a replayed older document stays refused
            makedirs(self._rollout_path(app).parent)
            atomic_write(self._rollout_path(app), payload)
        except OSError as e:
            log.warning("rollout document for %s not persisted: %s", app, e)
        waiting = self.waiting.get(app)
        if waiting is not None and self.eligible(waiting) and self.transport is not None:
            del self.waiting[app]
            log.info("rollout of %s sequence %d reached this device (%d%%)", app, doc.sequence, doc.percent)
            self.transport.start_download(waiting)

    def _verify_rollout(self, payload: bytes, last_version: int) -> Any:
        from devicerunner.trust import verify as trust

        assert self.trust.root is not None
        return trust.verify_rollout(
            payload,
            root=self.trust.root,
            time_floor=self.trust.time_floor,
            now=self.clock.wall_ms() // 1000,  # the device's clock: it may be off
            last_version=last_version,
        )

    def _rollout_path(self, app: str) -> Path:
        return self.cfg.state_dir / "apps" / app / ROLLOUT_FILE

    def _restore_rollouts(self) -> None:
        """The last rollout document accepted per app, verified again (a stored
        file is not trusted more than a message)."""
        from devicerunner.errors import VerificationError

        for app in self.cfg.apps:
            try:
                payload = self._rollout_path(app).read_bytes()
            except FileNotFoundError:
                continue
            except OSError as e:
                log.warning("rollout document for %s unreadable: %s", app, e)
                continue
            if self.trust.root is None:
                continue
            try:
                doc = self._verify_rollout(payload, last_version=0)
            except VerificationError as e:
                log.info("stored rollout document for %s no longer applies: %s", app, e)
                continue
            if doc.app == app:
                self.rollouts[app] = doc

    def kv_for(self, app: AppConfig) -> KvStore:
        store = self.kv.get(app.name)
        if store is None:
            store = open_store(self.cfg.state_dir / "apps" / app.name / "kv", app.kv_quota_bytes)
            self.kv[app.name] = store
            self.kv_flusher.add(store)
        return store

    def add_app(self, spec: AppSpec, inst: AppInstance) -> App:
        a = App(spec, inst)
        self.scheduler.add(a)
        self.failed.pop(spec.name, None)
        return a

    def start(self) -> None:
        """Recover every app from its state, start them, then the threads."""
        makedirs(self.cfg.state_dir)
        cleaned = clean_temp_files(self.cfg.state_dir, recursive=True)
        if cleaned:
            log.info("removed %d temp file(s) left by an interrupted write", cleaned)
        self._restore_rollouts()
        for name, app in self.cfg.apps.items():
            try:
                spec, why = self.updater.boot_app(app)
                if spec is None:
                    self.failed[name] = why or "cannot start"
                    log.warning("app %s: %s", name, self.failed[name])
                    continue
                inst = start_instance(self.sandbox, spec, self.resources, self.kv_for(app))
                self.add_app(spec, inst)
                log.info("app %s %s (sequence %d) started", name, spec.version, spec.sequence)
            except DeviceRunnerError as e:
                self.failed[name] = str(e)
                log.error("app %s failed to start: %s", name, e)
        self.kv_flusher.start()
        self.scheduler.start()
        self.updater.start()
        if self.transport is not None:
            self.transport.start()
        if self._status_file:
            self._status_lane.every(self.STATUS_EVERY_S, self.write_status)

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        if self.transport is not None:
            self.transport.stop()
        self.updater.stop()
        self.scheduler.stop()
        self.kv_flusher.stop()
        self._status_lane.close(5)
        if self._status_file:
            self.write_status()
        for s in self.resources.sensors.values():
            s.close()
        for a in self.resources.actuators.values():
            a.close()
        self.shim_env.close()
        if self._own_sandbox:
            self.sandbox.close()
        if self._own_runtime:
            self.runtime.close()

    def status(self) -> dict[str, Any]:
        apps: dict[str, Any] = {}
        for name in self.cfg.apps:
            st, _ = self.updater.slots[name].load()
            entry: dict[str, Any] = {"app": name, "state": dataclasses.asdict(st)}
            live = self.scheduler.apps.get(name)
            if live is not None:
                entry.update(live.status())
            else:
                entry.update(running=False, last_error=self.failed.get(name))
            apps[name] = entry
        return {
            "device": self.cfg.id,
            "hardware": self.cfg.hardware,
            "pid": os.getpid(),
            "updated": round(time.time(), 3),
            "started": round(self.started_at, 3),
            "root_version": self.trust.root.version if self.trust.root else None,
            "apps": apps,
            "events": self.recent_events,
        }

    def write_status(self) -> None:
        try:
            atomic_write(
                self.cfg.state_dir / STATUS_FILE,
                json.dumps(self.status(), indent=2, sort_keys=True, default=str).encode(),
                durable=False,
            )
        except OSError as e:
            log.debug("status not written: %s", e)


ROLLOUT_FILE = "rollout.json"
"""The last accepted rollout document of an app (its version is the replay floor)."""
STATUS_FILE = "status.json"
"""Runtime status the daemon rewrites every second (informational, not a commit point)."""
