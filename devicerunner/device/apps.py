"""App lifecycle and the scheduler.

What this module owns: turning module bytes + a grant into a running app
(instantiate, ``dr_init``), per-app counters, and the device's scheduler
lane that runs every app's ticks and health checks on time.

Invariants:
- Only the scheduler lane calls into a *running* instance (one task at a
  time, though not always on the same OS thread: a wasmtime Store may move
  between threads, never be used from two at once). The one exception is
  make-before-break: a new version is instantiated and its ``dr_init`` run
  on the updater lane, in its own Store, before it is handed to the
  scheduler. Others hand work over with ``Scheduler.call`` (no polling).
- A tick's failure (trap, overrun, non-zero) is counted on every tick and
  logged (at most once per outcome per FAILURE_LOG_EVERY_S, with a count of
  the lines suppressed) against that app only; it never stops the scheduler
  or another app.
- ``swap`` replaces an app's instance *between* two ticks: the new instance
  is created and initialised before the switch, so no tick is missed or run
  twice; the old one is returned to the caller, still warm.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from devicerunner.errors import AppInitError
from devicerunner.runtime.lanes import Executor, Lane, Timer
from devicerunner.sandbox.engine import AppInstance, CallResult, CompiledModule, Limits, Outcome, Sandbox
from devicerunner.update.trial import Trial
from firmware_shims.base import Actuator, Clock, Sensor
from hostfuncs.config import AppSettings
from hostfuncs.context import AppContext, LogSink
from hostfuncs.kv import KvStore
from hostfuncs.logsafe import LogLimiter
from hostfuncs.messages import Inbox
from hostfuncs.ratelimit import TokenBucket
from hostfuncs.telemetry import Outbox, TelemetryGrant

log = logging.getLogger(__name__)

LATENCY_WINDOW = 4096
FAILURE_LOG_EVERY_S = 10.0
"""A trap storm is counted on every tick but logged once per app and outcome per
10 s, with the number of lines suppressed (was: one WARNING per failed tick)."""


@dataclass
class Counters:
    ticks: int = 0
    traps: int = 0
    overruns: int = 0
    errors: int = 0
    missed: int = 0
    throttled: int = 0
    health_checks: int = 0
    health_failures: int = 0
    last_error: str | None = None
    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def record(self, r: CallResult, budget_s: float) -> None:
        self.ticks += 1
        self.latencies_s.append(r.duration_s)
        if r.outcome is Outcome.TRAP:
            self.traps += 1
        elif r.outcome is Outcome.OVERRUN:
            self.overruns += 1
        elif r.outcome is Outcome.ERROR:
            self.errors += 1
        elif r.duration_s > budget_s:
            self.overruns += 1
            r = CallResult(
                Outcome.OVERRUN,
                0,
                f"dr_tick took {r.duration_s * 1000:.1f} ms (budget {budget_s * 1000:.0f} ms)",
                r.duration_s,
            )
        if not r.ok:
            self.last_error = r.message

    def percentile_us(self, p: float) -> float:
        if not self.latencies_s:
            return 0.0
        data = sorted(self.latencies_s)
        k = min(len(data) - 1, max(0, round(p / 100 * (len(data) - 1))))
        return data[k] * 1e6

    def summary(self) -> dict[str, Any]:
        return {
            "ticks": self.ticks,
            "traps": self.traps,
            "overruns": self.overruns,
            "errors": self.errors,
            "missed": self.missed,
            "throttled": self.throttled,
            "health_checks": self.health_checks,
            "health_failures": self.health_failures,
            "last_error": self.last_error,
            "tick_p50_us": round(self.percentile_us(50), 1),
            "tick_p99_us": round(self.percentile_us(99), 1),
        }


@dataclass
class DeviceResources:
    """What the device offers apps; shared by every app and every instance."""

    clock: Clock
    sensors: Mapping[str, Sensor] = field(default_factory=dict)
    actuators: Mapping[str, Actuator] = field(default_factory=dict)
    outbox: Outbox = field(default_factory=Outbox)
    log_sink: LogSink | None = None
    inboxes: dict[str, Inbox] = field(default_factory=dict)
    """app -> its message queue (capability ``messages``); kept across its instances."""
    configs: dict[str, AppSettings] = field(default_factory=dict)
    """app -> its committed config (capability ``config``); a spec may carry a candidate."""


@dataclass
class AppSpec:
    """Everything needed to instantiate one version of one app."""

    name: str
    wasm: bytes
    grant: frozenset[str]
    limits: Limits
    tick_interval_ms: int = 100
    health_interval_ms: int = 1000
    sensors: tuple[str, ...] | None = None
    actuators: tuple[str, ...] | None = None
    telemetry_rate_per_s: float = 5.0
    telemetry_burst: int = 20
    version: str = "local"
    sequence: int = 0
    config: AppSettings | None = None
    """A config on trial; None: the app's committed config (DeviceResources.configs)."""


def _pick(all_: Mapping[str, Any], names: tuple[str, ...] | None) -> dict[str, Any]:
    return dict(all_) if names is None else {n: all_[n] for n in names if n in all_}


def start_instance(
    sandbox: Sandbox,
    spec: AppSpec,
    res: DeviceResources,
    kv: KvStore | None,
    compiled: CompiledModule | None = None,
) -> AppInstance:
    """Compile (unless ``compiled`` is given), link, instantiate and run
    ``dr_init``. Raises SandboxError subclasses."""
    compiled = compiled or sandbox.compile(spec.wasm)
    telemetry = None
    if "telemetry" in spec.grant:
        bucket = TokenBucket(spec.telemetry_rate_per_s, spec.telemetry_burst, res.clock.monotonic_s())
        telemetry = TelemetryGrant(res.outbox, bucket)
    ctx = AppContext(
        app=spec.name,
        clock=res.clock,
        sensors=_pick(res.sensors, spec.sensors) if "sensors" in spec.grant else {},
        actuators=_pick(res.actuators, spec.actuators) if "actuators" in spec.grant else {},
        kv=kv if "kv" in spec.grant else None,
        telemetry=telemetry,
        log_sink=res.log_sink,
        inbox=_inbox(res, spec.name) if "messages" in spec.grant else None,
        config=(spec.config or res.configs.get(spec.name)) if "config" in spec.grant else None,
    )
    inst = sandbox.instantiate(compiled, ctx, spec.grant, spec.limits)
    r = inst.call("dr_init")
    if not r.ok:
        raise AppInitError(f"dr_init failed: {r.message}")
    return inst


def _inbox(res: DeviceResources, app: str) -> Inbox:
    inbox = res.inboxes.get(app)
    if inbox is None:  # setdefault: atomic, so two lanes never make two inboxes
        inbox = res.inboxes.setdefault(app, Inbox(res.clock.monotonic_s()))
    return inbox


class App:
    """A named app slot on the scheduler: one live instance at a time."""

    def __init__(self, spec: AppSpec, instance: AppInstance) -> None:
        self.spec = spec
        self.instance = instance
        self.name = spec.name
        self.counters = Counters()
        self.interval_s = spec.tick_interval_ms / 1000.0
        self.budget_s = spec.limits.tick_budget_ms / 1000.0
        self.health_every = max(1, round(spec.health_interval_ms / spec.tick_interval_ms))
        self.next_due = 0.0
        self.penalty = 0
        """Intervals to skip after a tick was cut for CPU: doubles per cut, so a
        runaway app cannot keep taking 50 ms slices from the others."""
        self.running = True
        self.failure_log = LogLimiter(log, FAILURE_LOG_EVERY_S, max_keys=8)
        self.on_tick: Callable[[App, CallResult], None] | None = None
        # Set by device.trials while a new version is on trial:
        self.trial: Trial | None = None
        self.previous: AppInstance | None = None
        self.previous_spec: AppSpec | None = None

    def switch_to(self, instance: AppInstance, spec: AppSpec) -> AppInstance:
        """Make ``instance`` the one that ticks from the next tick on; returns the
        old one. Tick timing (next_due) is untouched: no tick missed or doubled."""
        old = self.instance
        self.instance, self.spec = instance, spec
        self.interval_s = spec.tick_interval_ms / 1000.0
        self.budget_s = spec.limits.tick_budget_ms / 1000.0
        self.health_every = max(1, round(spec.health_interval_ms / spec.tick_interval_ms))
        self.penalty = 0
        return old

    def tick(self) -> CallResult:
        r = self.instance.call("dr_tick")
        self.counters.record(r, self.budget_s)
        if r.outcome is Outcome.OVERRUN:
            self.penalty = min(64, max(1, self.penalty * 2))
        elif r.ok:
            self.penalty = 0
        if not r.ok:
            self.failure_log.log(logging.WARNING, r.outcome, "app %s: %s", self.name, r.message)
        if self.counters.ticks % self.health_every == 0:
            self.health()
        if self.on_tick is not None:
            self.on_tick(self, r)
        return r

    def health(self) -> CallResult | None:
        if not self.instance.has("dr_health"):
            return None
        r = self.instance.call("dr_health")
        self.counters.health_checks += 1
        if not r.ok:
            self.counters.health_failures += 1
            self.counters.last_error = f"unhealthy: {r.message}"
        return r

    def trial_status(self, now_s: float) -> dict[str, Any] | None:
        """How far the trial has come (None when none runs)."""
        if self.trial is None:
            return None
        h = self.trial.health
        return {
            "ticks": self.counters.ticks - self.trial.base.ticks,
            "of_ticks": h.trial_ticks,
            "seconds": round(self.trial.elapsed(now_s), 1),
            "of_seconds": h.trial_seconds,
        }

    def status(self, now_s: float) -> dict[str, Any]:
        return {
            "app": self.name,
            "version": self.spec.version,
            "sequence": self.spec.sequence,
            "running": self.running,
            "trial": self.trial_status(now_s),
            "memory_bytes": self.instance.memory_bytes(),
            **self.counters.summary(),
        }


class Scheduler:
    """Runs every app's ticks on one lane, on time, and work handed to it.

    The lane (on the runtime's ``ticks`` executor) is this device's
    "scheduler thread": ticks, swaps and anything handed over with ``call`` run there one
    at a time. Without a lane the scheduler brings a one-thread executor of
    its own."""

    def __init__(self, clock: Clock, lane: Lane | None = None) -> None:
        self.clock = clock
        self.apps: dict[str, App] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._own: Executor | None = None
        if lane is None:
            self._own = Executor(1, "scheduler")
            lane = self._own.lane("scheduler")
        self._lane = lane
        self._started = False
        self._stopped = False
        self._timer: Timer | None = None
        self._timer_due = 0.0

    # -- called from any thread ------------------------------------------

    def call(self, fn: Callable[[], Any], timeout_s: float) -> Any:
        """Run ``fn`` on the scheduler lane between ticks and return its result
        (lanes.Lane.call: from a lane of the same executor it runs in the caller)."""
        if not self._started or self._lane.current:
            return fn()

        def job() -> Any:
            try:
                return fn()
            finally:
                self._arm()  # fn may have added or resumed an app

        return self._lane.call(job, timeout_s)

    def start(self) -> None:
        self._started = True
        self._lane.post(self._arm)

    def alive(self) -> bool:
        return self._started and not self._stopped and self._lane.executor.alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopped = True
        self._lane.close(timeout_s)  # a tick in progress finishes
        if self._own is not None:
            self._own.shutdown(timeout_s)

    # -- called on the scheduler lane (or before start) ----------------

    def add(self, app: App) -> None:
        app.next_due = self.clock.monotonic_s()
        self.apps[app.name] = app
        heapq.heappush(self._heap, (app.next_due, next(self._seq), app.name))

    def _arm(self) -> None:
        """Make sure a timer is set for the earliest due tick."""
        if self._stopped:
            return
        while self._heap:
            due, _, name = self._heap[0]
            if name in self.apps and self.apps[name].running:
                break
            heapq.heappop(self._heap)
        else:
            return
        if self._timer is not None and not self._timer.cancelled and self._timer_due <= due:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due
        self._timer = self._lane.call_later(due - self.clock.monotonic_s(), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._run_due()
        self._arm()

    def _run_due(self) -> None:
        now = self.clock.monotonic_s()
        while self._heap and self._heap[0][0] <= now:
            _, _, name = heapq.heappop(self._heap)
            app = self.apps.get(name)
            if app is None or not app.running:
                continue
            app.tick()
            app.next_due += app.interval_s
            if app.penalty:
                app.counters.throttled += app.penalty
                app.next_due += app.penalty * app.interval_s
            after = self.clock.monotonic_s()
            if app.next_due < after:
                # Late by more than a whole interval: skip, don't burst to catch up.
                skipped = int((after - app.next_due) / app.interval_s) + 1
                app.counters.missed += skipped
                app.next_due += skipped * app.interval_s
            heapq.heappush(self._heap, (app.next_due, next(self._seq), name))
