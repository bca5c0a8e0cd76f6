"""The fast call path is active where it should be, and agrees with the stock path."""

from __future__ import annotations

import struct

from devicerunner.device.apps import DeviceResources
from devicerunner.sandbox import fastpath
from devicerunner.sandbox.engine import Limits, Outcome, Sandbox
from firmware_shims.base import VirtualClock
from firmware_shims.simulated import SimActuator, SimSensor
from hostfuncs.kv import KvStore
from tests.conftest import make_app, wat

PROBE = wat("""(module
  (import "sensors" "find" (func $find (param i32 i32) (result i32)))
  (import "sensors" "read" (func $read (param i32 i32) (result i32)))
  (import "sensors" "read_batch" (func $batch (param i32 i32 i32) (result i32)))
  (import "actuators" "set" (func $set (param i32 f64) (result i32)))
  (import "clock" "now_ms" (func $now (result i64)))
  (import "kv" "set" (func $kvset (param i32 i32 i32 i32) (result i32)))
  (import "kv" "get" (func $kvget (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "temp")
  (data (i32.const 8) "k")
  (global $n (mut i32) (i32.const 0))
  (func (export "dr_init") (result i32) (i32.const 0))
  (func (export "dr_tick") (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (i32.store (i32.const 100) (call $find (i32.const 0) (i32.const 4)))
    (i32.store (i32.const 104) (call $read (i32.const 0) (i32.const 200)))
    (i32.store (i32.const 108) (call $read (i32.const 9) (i32.const 200)))
    (i32.store (i32.const 112) (call $batch (i32.const 0) (i32.const 300) (i32.const 8)))
    (i32.store (i32.const 116) (call $set (i32.const 0) (f64.const 0.75)))
    (i64.store (i32.const 120) (call $now))
    (i32.store (i32.const 128) (call $kvset (i32.const 8) (i32.const 1) (i32.const 100) (i32.const 8)))
    (i32.store (i32.const 132) (call $kvget (i32.const 8) (i32.const 1) (i32.const 0xFFFFFFF8) (i32.const 64)))
    (i32.store (i32.const 136) (memory.grow (i32.const 1)))
    (i32.store (i32.const 140) (call $read (i32.const 0) (i32.const 70000)))  ;; valid only after the grow
    (if (i32.eq (global.get $n) (i32.const 3)) (then unreachable))
    (i32.const 0)))""")


def _run(path: str) -> tuple[list[tuple[Outcome, str]], bytes, float | None]:
    clock = VirtualClock()
    sb = Sandbox(path=path)
    res = DeviceResources(
        clock,
        sensors={"temp": SimSensor("temp", {"waveform": "constant", "base": 4.5}, clock)},
        actuators={"fan": SimActuator("fan", {}, clock)},
    )
    app = make_app(sb, PROBE, res=res, kv=KvStore(100), limits=Limits(memory_bytes=1 << 20))
    outcomes = []
    mem = b""
    for _ in range(4):
        clock.advance(0.5)
        r = app.tick()
        outcomes.append((r.outcome, r.message))
        if r.ok:
            mem = app.instance.ctx.memory.read(100, 48)
    sb.close()
    return outcomes, mem, res.actuators["fan"].value


def test_fast_path_is_active_with_the_pinned_wasmtime() -> None:
    ok, why = fastpath.available()
    assert ok, why
    sb = Sandbox()
    assert sb.path == "fast"
    sb.close()


def test_both_paths_give_identical_results_traps_and_error_codes() -> None:
    stock, fast = _run("stock"), _run("fast")
    assert stock == fast
    outcomes, mem, fan = fast
    assert [o for o, _ in outcomes] == [Outcome.OK, Outcome.OK, Outcome.TRAP, Outcome.OK]
    assert "unreachable" in outcomes[2][1]
    codes = struct.unpack("<iiiii", mem[:20])
    assert codes == (0, 0, -1, 5, 0)  # find, read, read(unknown id), batch (5 new samples), set
    assert struct.unpack("<ii", mem[28:36]) == (0, -2)  # kv.set ok, kv.get to a bad pointer
    assert struct.unpack("<i", mem[40:44])[0] == 0  # read into freshly grown memory works
    assert fan == 0.75
