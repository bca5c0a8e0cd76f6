"""The device's side of an update: run a candidate next to the live version
and watch its trial (implements update.host.AppHost for the Daemon).

Make-before-break: ``prepare`` compiles (in a child process bounded in
memory and time: sandbox.compile_bounded, so a compile bomb never costs the
daemon), links, instantiates and runs ``dr_init`` on the caller's (updater)
lane in a Store of its own while the old version keeps ticking; ``begin_trial`` switches on the scheduler lane
between two ticks, keeping the old instance warm; every tick of the trial
is judged by update.trial.Trial, and a failure switches back at once, on
the same lane, before the updater hears of it.

The same host runs a config trial (update.config_updates.ConfigHost): the
candidate is the module running now, started again with new settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from devicerunner.device.apps import App, AppSpec, DeviceResources, Scheduler, start_instance
from devicerunner.errors import AppInitError
from devicerunner.sandbox.engine import AppInstance, CallResult, CompileLimits, Sandbox
from devicerunner.trust.manifest import Health, Manifest
from devicerunner.update.host import Candidate, Verdict
from devicerunner.update.trial import PASSED, Snapshot, Trial
from firmware_shims.base import Clock
from hostfuncs.config import AppSettings
from hostfuncs.kv import KvStore

SWITCH_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Prepared:
    spec: AppSpec
    instance: AppInstance


class TrialHost:
    def __init__(
        self,
        *,
        sandbox: Sandbox,
        scheduler: Scheduler,
        resources: DeviceResources,
        clock: Clock,
        spec_for: Callable[[str, Manifest, bytes], AppSpec],
        kv_for: Callable[[str], KvStore],
        add_app: Callable[[AppSpec, AppInstance], App],
        broker_lost_s: Callable[[], float],
        compile_limits: CompileLimits,
    ) -> None:
        self._sandbox = sandbox
        self._scheduler = scheduler
        self._resources = resources
        self._clock = clock
        self._spec_for = spec_for
        self._kv_for = kv_for
        self._add_app = add_app
        self._broker_lost_s = broker_lost_s
        self._compile_limits = compile_limits

    # -- any lane -------------------------------------------------------------

    def prepare(self, app: str, m: Manifest, module: bytes) -> Candidate:
        spec = self._spec_for(app, m, module)
        compiled = self._sandbox.compile_bounded(module, self._compile_limits)
        return Prepared(
            spec, start_instance(self._sandbox, spec, self._resources, self._kv_for(app), compiled)
        )

    def begin_trial(self, app: str, m: Manifest, candidate: Candidate, on_verdict: Verdict) -> None:
        self.begin_config_trial(app, m.health, candidate, on_verdict)

    def prepare_config(self, app: str, settings: AppSettings) -> Candidate:
        live = self._scheduler.apps.get(app)
        if live is None:
            raise AppInitError(f"app {app} is not running: no module to try the config with")
        spec = replace(live.spec, config=settings)
        return Prepared(spec, start_instance(self._sandbox, spec, self._resources, self._kv_for(app)))

    def begin_config_trial(self, app: str, health: Health, candidate: Candidate, on_verdict: Verdict) -> None:
        assert isinstance(candidate, Prepared)
        self._scheduler.call(lambda: self._switch_in(app, health, candidate, on_verdict), SWITCH_TIMEOUT_S)

    def commit_config(self, app: str, settings: AppSettings) -> None:
        self._resources.configs[app] = settings  # read by start_instance: every later instance

    def running(self, app: str) -> bool:
        a = self._scheduler.apps.get(app)
        return a is not None and a.running

    def end_trial(self, app: str) -> None:
        old = self._scheduler.call(lambda: self._drop_previous(app), SWITCH_TIMEOUT_S)
        del old  # freed here (Store teardown, unmapping: ~0.2 ms), off the scheduler lane

    def on_trial(self, app: str) -> bool:
        a = self._scheduler.apps.get(app)
        return a is not None and a.trial is not None

    # -- on the scheduler lane --------------------------------------------------------

    def _switch_in(self, name: str, health: Health, c: Prepared, on_verdict: Verdict) -> None:
        """The new instance, already initialised, replaces the old one between
        two ticks; the old one stays warm (``app.previous``) until the verdict."""
        app = self._scheduler.apps.get(name)
        if app is None:  # nothing ran before (fresh device): the trial runs alone
            app = self._add_app(c.spec, c.instance)
            app.previous = None
        else:
            app.previous_spec = app.spec
            app.previous = app.switch_to(c.instance, c.spec)
        co = app.counters
        app.trial = Trial(
            health,
            self._clock.monotonic_s(),
            Snapshot(co.ticks, co.traps, co.overruns, co.health_failures),
            c.spec.limits.memory_bytes,
        )
        app.on_tick = lambda a, r: self._watch(a, r, on_verdict)

    def _watch(self, app: App, _r: CallResult, on_verdict: Verdict) -> None:
        trial = app.trial
        if trial is None:
            return
        c = app.counters
        now = Snapshot(c.ticks, c.traps, c.overruns, c.health_failures)
        verdict = trial.verdict(
            now, self._clock.monotonic_s(), app.instance.memory_bytes(), self._broker_lost_s(), c.last_error
        )
        if verdict == PASSED:
            h = app.health()  # one last health check before committing
            if h is not None and not h.ok:
                verdict = f"dr_health reported unhealthy at the end of the trial: {h.message}"
        if verdict is None:
            return
        app.trial = None
        app.on_tick = None
        if verdict != PASSED:
            if app.previous is not None and app.previous_spec is not None:
                app.switch_to(app.previous, app.previous_spec)  # instant: the old one is still warm
            else:
                app.running = False
            app.previous = None  # the failed instance is freed with the verdict's closure
        on_verdict(verdict)

    def _drop_previous(self, name: str) -> AppInstance | None:
        """Detach the old instance; returned so that freeing it happens off this lane."""
        app = self._scheduler.apps.get(name)
        if app is None:
            return None
        old, app.previous = app.previous, None
        return old
