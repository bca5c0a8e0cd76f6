"""Simulated sensors: waveforms, faults, and read_batch through a real app."""

from __future__ import annotations

import math
import struct

from devicerunner.device.apps import DeviceResources
from devicerunner.sandbox.engine import Sandbox
from firmware_shims.base import Status, VirtualClock
from firmware_shims.simulated import SimSensor
from hostfuncs import codes
from tests.conftest import make_app, wat


def test_same_seed_same_values() -> None:
    a, b = VirtualClock(), VirtualClock()
    sa = SimSensor("t", {"waveform": "random_walk", "noise": 0.5, "seed": 7}, a)
    sb = SimSensor("t", {"waveform": "random_walk", "noise": 0.5, "seed": 7}, b)
    va, vb = [], []
    for _ in range(50):
        a.advance(0.1)
        b.advance(0.1)
        va.append(sa.read().value)
        vb.append(sb.read().value)
    assert va == vb and len(set(va)) > 10


def test_step_waveform_steps() -> None:
    c = VirtualClock()
    s = SimSensor("t", {"waveform": "step", "base": 10, "amplitude": 5, "step_at_s": 1.0}, c)
    c.advance(0.5)
    assert s.read().value == 10
    c.advance(1.0)
    assert s.read().value == 15


def test_offline_fault_reports_offline_after_it_starts() -> None:
    c = VirtualClock()
    s = SimSensor("t", {"fault": "offline", "fault_after_s": 1.0}, c)
    c.advance(0.5)
    assert s.read().status is Status.OK
    c.advance(1.0)
    assert s.read().status is Status.OFFLINE


def test_stuck_fault_freezes_the_value() -> None:
    c = VirtualClock()
    s = SimSensor("t", {"waveform": "sine", "period_s": 2, "fault": "stuck", "fault_after_s": 1.0}, c)
    c.advance(1.2)
    v1 = s.read().value
    c.advance(0.3)
    assert s.read().value == v1


def test_dropout_fault_makes_reads_stale() -> None:
    c = VirtualClock()
    s = SimSensor("t", {"fault": "dropout", "fault_rate": 1.0, "max_age_ms": 300}, c)
    c.advance(1.0)
    assert s.read().status is Status.STALE


def test_spike_fault_adds_spikes() -> None:
    c = VirtualClock()
    s = SimSensor("t", {"waveform": "constant", "base": 1, "fault": "spike", "fault_rate": 0.5}, c)
    seen = set()
    for _ in range(40):
        c.advance(0.1)
        seen.add(s.read().value)
    assert seen == {1.0, 101.0}


def test_read_batch_moves_many_samples_in_one_call(sandbox: Sandbox) -> None:
    module = wat("""(module
      (import "sensors" "read_batch" (func $batch (param i32 i32 i32) (result i32)))
      (import "sensors" "read" (func $read (param i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "dr_init") (result i32) (i32.const 0))
      (func (export "dr_tick") (result i32)
        (i32.store (i32.const 0) (call $batch (i32.const 0) (i32.const 64) (i32.const 32)))
        (i32.store (i32.const 4) (call $read (i32.const 1) (i32.const 8)))
        (i32.const 0)))""")
    clock = VirtualClock()
    sensors = {
        "ramp": SimSensor("ramp", {"waveform": "constant", "base": 3.5, "sample_interval_ms": 10}, clock),
        "dead": SimSensor("dead", {"fault": "offline"}, clock),
    }
    app = make_app(sandbox, module, res=DeviceResources(clock, sensors=sensors))
    clock.advance(0.1)  # 10 new samples
    app.tick()
    mem = app.instance.ctx.memory
    n = struct.unpack("<i", mem.read(0, 4))[0]
    assert 10 <= n <= 11
    assert list(struct.unpack(f"<{n}d", mem.read(64, 8 * n))) == [3.5] * n
    assert struct.unpack("<i", mem.read(4, 4))[0] == codes.ERR_OFFLINE
    app.tick()  # nothing new since: zero samples, not the same ones again
    assert struct.unpack("<i", mem.read(0, 4))[0] == 0
    clock.advance(1.0)  # 100 new samples, the app asks for at most 32: the newest 32
    app.tick()
    assert struct.unpack("<i", mem.read(0, 4))[0] == 32
    assert not math.isnan(struct.unpack("<d", mem.read(64, 8))[0])
