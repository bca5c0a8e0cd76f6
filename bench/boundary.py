"""The Wasm boundary, fast path against the stock path, in the same run.

- wasm -> host: a dr_tick that calls ``sensors.count`` (the cheapest host
  function) LOOP times; per call = tick time / LOOP.
- host -> wasm: calling a no-op ``dr_tick`` through ``AppInstance.call``
  (what the scheduler pays: deadline, classification, result object).
- thermostat tick (2-3 host calls).
- cold start from the compile cache: cache read + HMAC check + deserialize
  + instantiate + dr_init (the in-memory module cache cleared each time).
- swap pause: the make-before-break swap job on the scheduler thread
  (instantiate + dr_init + switch) while the old version ticks every 10 ms;
  missed ticks counted.
- a daemon with three apps at 10 Hz: CPU over 10 s and RSS.
- thermostat tick latency over 100,000 ticks; memory per app.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import wasmtime

from bench.common import Stat, from_samples, measure, proc_kib
from devicerunner.cli.main import DEFAULT_ACTUATORS, DEFAULT_SENSORS
from devicerunner.device.apps import App, AppSpec, DeviceResources, Scheduler, start_instance
from devicerunner.device.hardware import build_hardware
from devicerunner.sandbox.engine import Limits, Sandbox
from firmware_shims.base import RealClock, VirtualClock
from hostfuncs.kv import KvStore

ALL = frozenset(["log", "clock", "sensors", "actuators", "kv", "telemetry", "wasi", "messages", "config"])
LOOP = 2000
HOSTCALLS = f"""(module
  (import "sensors" "count" (func $count (result i32)))
  (memory (export "memory") 1)
  (func (export "dr_init") (result i32) (i32.const 0))
  (func (export "dr_tick") (result i32) (local $i i32)
    (loop $l
      (drop (call $count))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const {LOOP}))))
    (i32.const 0)))"""
EMPTY = """(module (memory (export "memory") 1)
  (func (export "dr_init") (result i32) (i32.const 0))
  (func (export "dr_tick") (result i32) (i32.const 0)))"""
THERMO = Path("examples/apps/thermostat.wasm")


def _res(clock: object) -> DeviceResources:
    sensors, actuators = build_hardware(DEFAULT_SENSORS, DEFAULT_ACTUATORS, clock)  # type: ignore[arg-type]
    return DeviceResources(clock, sensors, actuators, log_sink=lambda *a: None)  # type: ignore[arg-type]


def crossings(path: str, n: int) -> list[Stat]:
    clock = VirtualClock()
    res = _res(clock)
    sb = Sandbox(path=path)
    hc_spec = AppSpec("hc", bytes(wasmtime.wat2wasm(HOSTCALLS)), ALL, Limits(tick_budget_ms=1000))
    hc = App(hc_spec, start_instance(sb, hc_spec, res, None))
    per_call = []
    for _ in range(max(20, n // 200)):
        t = time.perf_counter()
        hc.tick()
        per_call.append((time.perf_counter() - t) / LOOP * 1e6)
    empty_spec = AppSpec("empty", bytes(wasmtime.wat2wasm(EMPTY)), frozenset(), Limits())
    empty = App(empty_spec, start_instance(sb, empty_spec, res, None))
    th_spec = AppSpec("thermostat", THERMO.read_bytes(), ALL, Limits())
    th = App(th_spec, start_instance(sb, th_spec, res, KvStore(4096)))

    def tick_th() -> None:
        clock.advance(0.1)
        th.tick()
        res.outbox.drain()

    out = [
        from_samples(f"wasm->host call ({path})", per_call),
        measure(f"host->wasm export call ({path})", lambda: empty.instance.call("dr_tick"), n),
        measure(f"thermostat tick ({path})", tick_th, n),
    ]
    sb.close()
    return out


def cold_start(n: int = 50) -> Stat:
    clock = RealClock()
    res = _res(clock)
    with TemporaryDirectory() as tmp:
        sb = Sandbox(cache_dir=Path(tmp))
        spec = AppSpec("thermostat", THERMO.read_bytes(), ALL, Limits())
        start_instance(sb, spec, res, KvStore(4096))  # compiles and fills the cache
        xs = []
        for _ in range(n):
            sb._modules.clear()  # bench only: force the cache-file path every time
            t = time.perf_counter()
            inst = start_instance(sb, spec, res, KvStore(4096))
            xs.append((time.perf_counter() - t) * 1e6)
            assert inst is not None
        sb.close()
    return from_samples("cold start from cache (thermostat)", xs)


def swap_pause(swaps: int = 200) -> tuple[Stat, int]:
    clock = RealClock()
    res = _res(clock)
    sb = Sandbox()
    specs = [AppSpec("t", THERMO.read_bytes(), ALL, Limits(), tick_interval_ms=10) for _ in range(2)]
    sb.compile(specs[0].wasm)  # compiled off the scheduler thread, as the updater does
    kv = KvStore(4096)
    app = App(specs[0], start_instance(sb, specs[0], res, kv))
    sched = Scheduler(clock)
    sched.add(app)
    sched.start()
    pauses: list[float] = []
    handoff: list[float] = []

    olds: list[object] = []

    def switch(inst: object, spec: AppSpec) -> None:
        t = time.perf_counter()
        olds.append(app.switch_to(inst, spec))  # type: ignore[arg-type]
        pauses.append((time.perf_counter() - t) * 1e6)

    for i in range(swaps):
        # make (off the scheduler thread, old version ticking), then break
        inst = start_instance(sb, specs[i % 2], res, kv)
        t0 = time.perf_counter()
        sched.call(lambda inst=inst, i=i: switch(inst, specs[i % 2]), 5)  # type: ignore[misc]
        handoff.append((time.perf_counter() - t0) * 1e6)
        olds.clear()  # the old instance is freed here, as the updater does
        time.sleep(0.015)
    sched.stop()
    sb.close()
    swap_stat = from_samples("swap pause on the scheduler thread", pauses)
    print(from_samples("swap hand-off incl. waiting for a tick gap", handoff).row())
    return swap_stat, app.counters.missed


def daemon_idle(seconds: float = 10.0) -> tuple[float, int]:
    """CPU % of one core and RSS (KiB) of three thermostat apps at 10 Hz."""
    clock = RealClock()
    res = _res(clock)
    sb = Sandbox()
    sched = Scheduler(clock)
    for i in range(3):
        spec = AppSpec(f"t{i}", THERMO.read_bytes(), ALL, Limits(), tick_interval_ms=100)
        sched.add(App(spec, start_instance(sb, spec, res, KvStore(4096))))
    sched.start()
    time.sleep(1.0)
    c0, t0 = time.process_time(), time.monotonic()
    time.sleep(seconds)
    cpu = (time.process_time() - c0) / (time.monotonic() - t0) * 100
    sched.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sb.close()
    return cpu, rss


def long_tail(ticks: int = 100_000) -> Stat:
    clock = VirtualClock()
    res = _res(clock)
    sb = Sandbox()
    spec = AppSpec("thermostat", THERMO.read_bytes(), ALL, Limits())
    app = App(spec, start_instance(sb, spec, res, KvStore(4096)))
    xs = []
    for _ in range(ticks):
        clock.advance(0.1)
        t = time.perf_counter()
        app.tick()
        xs.append((time.perf_counter() - t) * 1e6)
        res.outbox.drain()
    sb.close()
    return from_samples(f"thermostat tick, {ticks:,} ticks (fast)", xs)


def memory_per_app(n: int = 50) -> float:
    """KiB of RSS per additional thermostat instance."""

    res = _res(RealClock())
    sb = Sandbox()
    spec = AppSpec("thermostat", THERMO.read_bytes(), ALL, Limits())
    keep = [start_instance(sb, spec, res, KvStore(4096))]
    before = proc_kib("self")
    keep += [start_instance(sb, spec, res, KvStore(4096)) for _ in range(n)]
    after = proc_kib("self")
    sb.close()
    return (after - before) / n


if __name__ == "__main__":
    for path in ("stock", "fast"):
        for s in crossings(path, 20_000):
            print(s.row())
