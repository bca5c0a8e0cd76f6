"""Per-tick cost of the thermostat (stock wasmtime-py path) against an empty tick.

Baseline in the same run: a module whose dr_tick does nothing, called the
same way, so the ratio shows what the thermostat's host calls cost.
"""

from __future__ import annotations

from pathlib import Path

import wasmtime

from bench.common import Stat, measure
from devicerunner.cli.main import DEFAULT_ACTUATORS, DEFAULT_SENSORS
from devicerunner.device.apps import App, AppSpec, DeviceResources, start_instance
from devicerunner.device.hardware import build_hardware
from devicerunner.sandbox.engine import Limits, Sandbox
from firmware_shims.base import VirtualClock
from hostfuncs.kv import KvStore

ALL = frozenset(["log", "clock", "sensors", "actuators", "kv", "telemetry", "wasi", "messages", "config"])
EMPTY = """(module (memory (export "memory") 1)
  (func (export "dr_init") (result i32) (i32.const 0))
  (func (export "dr_tick") (result i32) (i32.const 0)))"""


def run(n: int = 20_000) -> list[Stat]:
    clock = VirtualClock()
    sensors, actuators = build_hardware(DEFAULT_SENSORS, DEFAULT_ACTUATORS, clock)
    res = DeviceResources(clock, sensors, actuators, log_sink=lambda *a: None)
    sb = Sandbox()
    thermo_spec = AppSpec("thermostat", Path("examples/apps/thermostat.wasm").read_bytes(), ALL, Limits())
    thermo = App(thermo_spec, start_instance(sb, thermo_spec, res, KvStore(4096)))
    empty_spec = AppSpec("empty", bytes(wasmtime.wat2wasm(EMPTY)), frozenset(), Limits())
    empty = App(empty_spec, start_instance(sb, empty_spec, res, None))

    def tick_thermo() -> None:
        clock.advance(0.1)
        thermo.tick()
        res.outbox.drain()

    out = [
        measure("tick: empty dr_tick (baseline)", empty.tick, n),
        measure("tick: thermostat (2-3 host calls)", tick_thermo, n),
    ]
    sb.close()
    return out


if __name__ == "__main__":
    for s in run():
        print(s.row())
