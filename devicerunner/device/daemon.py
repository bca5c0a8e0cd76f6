"""The device daemon: builds the device from its config and runs its apps.

Owns start-up order and shutdown: one daemon per state dir (an exclusive
lock from construction to ``stop()``; a second gets StateDirLockedError);
every sensor, actuator and app setting is validated before anything runs;
a clean stop (SIGTERM/SIGINT or ``stop()``) stops the scheduler between
ticks, flushes kv stores and closes drivers.
An app that fails to start is reported and the others run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from devicerunner.device.apps import App, AppSpec, DeviceResources, Scheduler, start_instance
from devicerunner.device.config import AppConfig, BrokerConfig, DeviceConfig
from devicerunner.device.hardware import build_hardware
from devicerunner.device.kvfile import KvFlusher, open_store
from devicerunner.device.paths import STATUS_FILE
from devicerunner.device.trials import TrialHost
from devicerunner.errors import DeviceRunnerError
from devicerunner.runtime.fsutil import DirLock, atomic_write, clean_temp_files, makedirs
from devicerunner.runtime.process import Runtime
from devicerunner.sandbox.engine import AppInstance, CompileLimits, Limits, Sandbox, load_module_bytes
from devicerunner.transport.channel import DeviceChannel, Subscription
from devicerunner.transport.settings import parse_url
from devicerunner.transport.sources.base import ArtifactSource
from devicerunner.trust.manifest import Manifest
from devicerunner.trust.store import TrustStore
from devicerunner.trust.verify import DeviceIdentity
from devicerunner.update.config_updates import ConfigUpdates
from devicerunner.update.delivery import Delivery
from devicerunner.update.events import Event
from devicerunner.update.host import UpdateSettings
from devicerunner.update.rollouts import RolloutGate
from devicerunner.update.state import releases
from devicerunner.update.updater import Updater
from firmware_shims.base import Clock, RealClock
from firmware_shims.env import ShimEnv
from hostfuncs.context import LogSink
from hostfuncs.kv import KvStore
from hostfuncs.messages import Inbox
from hostfuncs.telemetry import Outbox

log = logging.getLogger(__name__)

RECENT_EVENTS = 20
INBOX_SCAN_S = 0.25
"""How often the local inbox is looked at by default (seconds)."""


def spec_from_config(app: AppConfig, wasm: bytes, m: Manifest | None = None) -> AppSpec:
    """The one place an app spec is built: the device's settings for the app,
    and the manifest's grant and limits when a signed release runs (the
    bootstrap module runs under the device policy itself)."""
    grant, limits, interval = app.policy, app.memory_limit_bytes, app.tick_interval_ms
    budget, rate = app.tick_budget_ms, app.telemetry_rate_per_s
    if m is not None:  # within the device policy: update.verification refuses more
        grant, limits, interval = m.capabilities, m.limits.memory_bytes, m.limits.tick_interval_ms
        budget = m.limits.tick_budget_ms
        if m.limits.telemetry_rate_per_s is not None:
            rate = m.limits.telemetry_rate_per_s
    return AppSpec(
        name=app.name,
        wasm=wasm,
        grant=grant,
        limits=Limits(memory_bytes=limits, tick_budget_ms=budget),
        tick_interval_ms=interval,
        health_interval_ms=app.health_interval_ms,
        sensors=app.sensors,
        actuators=app.actuators,
        telemetry_rate_per_s=rate,
        telemetry_burst=app.telemetry_burst,
        version=m.version if m is not None else "local",
        sequence=m.sequence if m is not None else 0,
    )


class Daemon:
    """One device: hardware, sandbox, scheduler, kv flusher, updater and,
    with a broker, its channel. Builds the parts and wires them through
    their seams (update.host.AppHost, transport.channel.Inbound)."""

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
        inbox_scan_s: float = INBOX_SCAN_S,
    ) -> None:
        """``sandbox`` and ``runtime``: share one engine (and its compile
        cache) and one set of threads between the daemons of one process, as
        the fleet simulator does. A daemon alone owns both. ``inbox_scan_s``:
        how often the local inbox is looked at (devices that take releases
        over MQTT only can look rarely)."""
        self.cfg = cfg
        self.clock = clock or RealClock()
        self.shim_env = ShimEnv(sysfs_root=cfg.sysfs_root)
        sensors, actuators = build_hardware(cfg.sensors, cfg.actuators, self.clock, self.shim_env)
        self.resources = DeviceResources(
            clock=self.clock, sensors=sensors, actuators=actuators, outbox=Outbox(), log_sink=log_sink
        )
        # One daemon per state dir, for this object's lifetime: taken before
        # anything below reads or writes the state dir (StateDirLockedError).
        makedirs(cfg.state_dir)
        self._dir_lock = DirLock(cfg.state_dir)
        self._dir_lock.acquire()
        self.trust = TrustStore(cfg.state_dir, cfg.trust_root)
        self._own_sandbox = sandbox is None
        self.sandbox = sandbox or Sandbox(cache_dir=cfg.state_dir / "cache")
        self._status_file = status_file
        self._compile_limits = CompileLimits(cfg.compile_memory_bytes, cfg.compile_timeout_s)
        self._own_runtime = runtime is None
        self.runtime = runtime or Runtime(name=cfg.id)
        self.scheduler = Scheduler(self.clock, self.runtime.ticks.lane(f"{cfg.id}/scheduler"))
        self.kv_flusher = KvFlusher(self.runtime.work.lane(f"{cfg.id}/kv"), cfg.kv_flush_interval_s)
        self.kv: dict[str, KvStore] = {}
        self.failed: dict[str, str] = {}
        self.stopped = threading.Event()
        self.started_at = time.time()
        self.channel: DeviceChannel | None = None
        settings = UpdateSettings(
            state_dir=cfg.state_dir,
            identity=DeviceIdentity(
                cfg.id,
                cfg.hardware,
                {n: a.policy for n, a in cfg.apps.items()},
                {n: a.ceilings() for n, a in cfg.apps.items()},
            ),
            channels={n: a.channel for n, a in cfg.apps.items()},
            trial_attempts=cfg.trial_attempts,
            inbox_scan_s=inbox_scan_s,
        )
        host = TrialHost(
            sandbox=self.sandbox,
            scheduler=self.scheduler,
            resources=self.resources,
            clock=self.clock,
            spec_for=lambda app, m, module: spec_from_config(cfg.apps[app], module, m),
            kv_for=lambda app: self.kv_for(cfg.apps[app]),
            add_app=self.add_app,
            broker_lost_s=self.broker_lost_s,
            compile_limits=self._compile_limits,
        )
        self.updater = Updater(
            settings, host, self.trust, self.clock, self.runtime.work.lane(f"{cfg.id}/updater", paused=True)
        )
        self.rollouts = RolloutGate(
            cfg.state_dir, cfg.id, cfg.apps, self.updater.verifier, self.updater.reject_document
        )
        self.config_updates = ConfigUpdates(settings, host, self.trust, self.updater)
        for name, a in cfg.apps.items():  # the app's, kept across its instances
            if "messages" in a.policy:
                self.resources.inboxes[name] = Inbox(
                    self.clock.monotonic_s(), a.messages_queue, a.messages_rate_per_s, a.messages_burst
                )
        self.recent_events: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self.updater.listeners.append(self._on_event)
        self.delivery: Delivery | None = None
        if cfg.broker is not None:
            self._build_channel(cfg.broker)
        self._status_lane = self.runtime.work.lane(f"{cfg.id}/status")

    def _build_channel(self, b: BrokerConfig) -> None:
        lane = self.runtime.work.lane(f"{self.cfg.id}/transport", paused=True)
        art = self.cfg.artifacts
        settings = parse_url(
            b.url,
            ca_file=b.ca_file,
            cert_file=b.cert_file,
            key_file=b.key_file,
            username=b.username,
            password=b.password,
            keepalive_s=b.keepalive_s,
            protocol=b.protocol,
            max_packet_bytes=b.max_packet_bytes,
        )
        self.channel = DeviceChannel(
            settings,
            prefix=b.prefix,
            device_id=self.cfg.id,
            hardware=self.cfg.hardware,
            apps=[Subscription(n, a.channel, "messages" in a.policy) for n, a in self.cfg.apps.items()],
            lane=lane,
            runtime=self.runtime,
            status=self.broker_status,
            outbox=self.resources.outbox,
            backoff_min_s=b.reconnect_min_s,
            backoff_max_s=b.reconnect_max_s,
            messages=self.deliver_message,
            retain=b.retain,
            request_chunks="mqtt" in art.sources,
            request_window=art.window,
            request_documents=art.request_documents,
            status_requests=art.status_requests,
        )
        self.delivery = Delivery(
            state_dir=self.cfg.state_dir,
            updater=self.updater,
            trust_store=self.trust,
            rollouts=self.rollouts,
            sources=self._artifact_sources(self.channel),
            fetcher=self.channel,
            lane=lane,
            stall_s=b.download_stall_s,
        )

    def _artifact_sources(self, channel: DeviceChannel) -> list[ArtifactSource]:
        """``[artifacts] sources`` in order: the channel's MQTT sources, or HTTP."""
        art = self.cfg.artifacts
        out: list[ArtifactSource] = []
        for name in art.sources:
            if name == "retained":
                out.append(channel.retained)
            elif name == "mqtt":
                out.append(channel.requests)
            elif name == "http" and art.http_url is not None:
                from devicerunner.transport.sources.http import HttpSource  # urllib3 only when used

                out.append(
                    HttpSource(
                        art.http_url,
                        ca_file=art.ca_file,
                        max_redirects=art.max_redirects,
                        min_bytes_per_s=art.min_bytes_per_s,
                    )
                )
        return out

    # -- events ------------------------------------------------------------------

    def add_event_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """``listener(event)`` for every update event, in its JSON form (any thread)."""
        self._listeners.append(listener)

    def _on_event(self, ev: Event) -> None:
        doc = ev.to_dict()
        self.recent_events.append(doc)
        if self.channel is not None and self.delivery is not None:
            delivery, channel = self.delivery, self.channel

            def forward() -> None:
                delivery.on_update_event(ev)
                channel.publish_event(doc)

            channel.post(forward)
        for listener in self._listeners:
            listener(doc)

    def broker_lost_s(self) -> float:
        """Seconds the broker has been unreachable (0 without a broker)."""
        return 0.0 if self.channel is None else float(self.channel.lost_s())

    # -- apps -------------------------------------------------------------------

    def deliver_message(self, app: str, topic: str, payload: bytes, broadcast: bool) -> str | None:
        """Queue an operator's message for ``app`` (any thread; never waits).
        None, or why it was dropped: ``no_app``, ``not_granted``, ``invalid``, ``rate``."""
        if app not in self.cfg.apps:
            return "no_app"
        running = self.scheduler.apps.get(app)
        if "messages" not in self.cfg.apps[app].policy or (
            running is not None and "messages" not in running.spec.grant
        ):
            return "not_granted"  # the policy, or the release running now, does not grant it
        inbox = self.resources.inboxes.get(app)
        if inbox is None:
            return "not_granted"
        return inbox.put(topic, payload, broadcast, self.clock.monotonic_s())

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

    def _boot_spec(self, app: AppConfig) -> AppSpec | None:
        installed = self.updater.boot_app(app.name)
        if installed is not None:
            return spec_from_config(app, installed.module, installed.manifest)
        if app.module is not None:
            return spec_from_config(app, load_module_bytes(app.module))
        return None

    def start(self) -> None:
        """Recover every app from its state, start them, then the lanes."""
        makedirs(self.cfg.state_dir)
        cleaned = clean_temp_files(self.cfg.state_dir, recursive=True)
        if cleaned:
            log.info("removed %d temp file(s) left by an interrupted write", cleaned)
        self.rollouts.restore()
        self.config_updates.boot()  # each app's first instance starts with its committed config
        for name, app in self.cfg.apps.items():
            try:
                spec = self._boot_spec(app)
                if spec is None:
                    self.failed[name] = "nothing installed and no bootstrap module configured"
                    log.warning("app %s: %s", name, self.failed[name])
                    continue
                # bounded like a candidate's: after a wasmtime upgrade (or a lost
                # cache) a large module must not take the device down at every boot
                compiled = self.sandbox.compile_bounded(spec.wasm, self._compile_limits)
                inst = start_instance(self.sandbox, spec, self.resources, self.kv_for(app), compiled)
                self.add_app(spec, inst)
                log.info("app %s %s (sequence %d) started", name, spec.version, spec.sequence)
            except DeviceRunnerError as e:
                self.failed[name] = str(e)
                log.error("app %s failed to start: %s", name, e)
        self.kv_flusher.start()
        self.scheduler.start()
        self.updater.start()
        self.config_updates.start()
        if self.channel is not None and self.delivery is not None:
            self.channel.post(self.delivery.start)
            self.channel.start(self.delivery, self.config_updates)
        if self._status_file:
            self._status_lane.every(self.STATUS_EVERY_S, self.write_status)

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        if self.channel is not None:
            self.channel.stop()
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
        self._dir_lock.release()

    # -- status ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        apps: dict[str, Any] = {}
        now_s = self.clock.monotonic_s()
        for name in self.cfg.apps:
            st, _ = self.updater.slots[name].load()
            entry: dict[str, Any] = {
                "app": name,
                "state": dataclasses.asdict(st),
                "config": self.config_updates.status(name),
            }
            messages = self._messages_status(name)
            if messages is not None:
                entry["messages"] = messages
            live = self.scheduler.apps.get(name)
            if live is not None:
                entry.update(live.status(now_s))
            else:
                entry.update(running=False, last_error=self.failed.get(name))
            downloading = self.delivery.downloads.active.get(name) if self.delivery is not None else None
            entry.update(releases(st, entry.get("version"), getattr(downloading, "m", None)))
            apps[name] = entry
        return {
            "device": self.cfg.id,
            "hardware": self.cfg.hardware,
            "pid": os.getpid(),
            "updated": round(time.time(), 3),
            "started": round(self.started_at, 3),
            "root_version": self.trust.root.version if self.trust.root else None,
            "apps": apps,
            "events": list(self.recent_events),
            "rejections": self.updater.rejections.recent(10),
            "input": self.input_stats(),
        }

    def _messages_status(self, app: str) -> dict[str, Any] | None:
        inbox = self.resources.inboxes.get(app)
        return None if inbox is None else {"queued": len(inbox), **inbox.stats.as_dict()}

    def input_stats(self) -> dict[str, Any]:
        """Counters of what was refused, dropped or replaced (every bound has one)."""
        out: dict[str, Any] = {"rejections": self.updater.rejections.stats()}
        if self.channel is not None and self.delivery is not None:
            out["transport"] = {**self.channel.stats, **self.delivery.stats}
            out["mailbox"] = self.channel.mailbox.stats()
        return out

    def broker_status(self, online: bool) -> dict[str, Any]:
        """The status document the device publishes (docs/mqtt.md). Built from
        the parts it shows, not from ``status()``: the tick percentiles, the
        input counters and the recent events it never sent were most of the
        cost of a heartbeat, and a fleet of 10,000 sends 333 a second."""
        apps: dict[str, Any] = {}
        now_s = self.clock.monotonic_s()
        for name in self.cfg.apps:
            st, _ = self.updater.slots[name].load()
            live = self.scheduler.apps.get(name)
            downloading = self.delivery.downloads.active.get(name) if self.delivery is not None else None
            running = live.spec.version if live is not None else None
            rel = releases(st, running, getattr(downloading, "m", None))
            cand = rel["candidate"] or {}
            cfg = self.config_updates.status(name)
            entry: dict[str, Any] = {  # version/sequence: the active release; pending_*: the candidate
                "version": rel["active"]["version"],
                "sequence": st.active_sequence,
                "phase": st.phase,
                "pending_sequence": cand.get("sequence"),
                "pending_version": cand.get("version"),
                "last_error": st.last_error
                or (live.counters.last_error if live is not None else self.failed.get(name)),
                "last_reason": st.last_reason,
                "last_error_sequence": st.last_error_sequence,
                "running": live.running if live is not None else False,
                "trial": live.trial_status(now_s) if live is not None else None,
                "config_version": cfg["version"],
                "config_phase": cfg["phase"],
                "config_on_trial": cfg["on_trial"],
                "config_last_error": cfg["last_error"],
            }
            messages = self._messages_status(name)
            if messages is not None:
                entry["messages"] = messages
            apps[name] = entry
        return {
            "device": self.cfg.id,
            "hardware": self.cfg.hardware,
            "online": online,
            "ts": round(time.time(), 3),
            "root_version": self.trust.root.version if self.trust.root else None,
            "apps": apps,
            "rejections": self.updater.rejections.recent(5),
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
