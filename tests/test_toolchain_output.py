"""What ordinary toolchains produce is run or refused with a reason (issue #18).

Each module here is the smallest WAT reproducing what one toolchain emits:
a WASI command's `_start`, a component's header, Go's runtime polling with
a clock subscription, Zig's 16 MiB stack, AssemblyScript's `env.abort`.
"""

from __future__ import annotations

import logging
import math
import struct

import pytest

from devicerunner.device.apps import DeviceResources
from devicerunner.errors import AbiError, AppInitError, LinkError, ModuleInvalidError
from devicerunner.sandbox.engine import Limits, Outcome, Sandbox
from firmware_shims.base import VirtualClock
from firmware_shims.simulated import SimSensor
from hostfuncs import codes
from hostfuncs.registry import REGISTRY, hostfunc
from tests.conftest import LogCapture, make_app, run_cli, wat

ABI = """
  (memory (export "memory") 1)
  (func (export "dr_init") (result i32) (i32.const 0))
"""
TICK_OK = '(func (export "dr_tick") (result i32) (i32.const 0))'


def test_wasi_command_module_is_refused_before_it_runs_saying_how_to_build_a_reactor(
    sandbox: Sandbox, logs: LogCapture
) -> None:
    # A command's libc would run constructors/destructors around every export
    # call: state silently reset each tick. Refuse it at link time instead.
    module = wat(f"""(module {ABI} {TICK_OK}
      (func (export "_start")))""")
    with pytest.raises(AbiError) as e:
        make_app(sandbox, module, logs=logs)
    msg = str(e.value)
    assert "WASI command" in msg and "_initialize" in msg
    for how in ("-mexec-model=reactor", "-buildmode=c-shared", "cdylib", "zig", "AssemblyScript"):
        assert how in msg


def test_reactor_that_also_exports_start_is_accepted(sandbox: Sandbox) -> None:
    module = wat(f"""(module {ABI} {TICK_OK}
      (func (export "_start")) (func (export "_initialize")))""")
    assert make_app(sandbox, module).tick().ok


def test_component_binary_is_recognised_and_refused_as_a_component(sandbox: Sandbox) -> None:
    # magic, version 0x0d, layer 1: what cargo component / wasm32-wasip2 emit
    component = b"\0asm\x0d\x00\x01\x00" + b"\x00" * 16
    with pytest.raises(ModuleInvalidError, match="WebAssembly component") as e:
        sandbox.compile(component)
    assert "core module" in str(e.value)


def test_initial_memory_over_the_limit_names_the_limit_and_the_config_key(sandbox: Sandbox) -> None:
    # zig's wasm32-wasi default stack makes 257 initial pages: over 16 MiB
    module = wat(f"""(module (memory (export "memory") 257)
      (func (export "dr_init") (result i32) (i32.const 0)) {TICK_OK})""")
    with pytest.raises(AppInitError) as e:
        make_app(sandbox, module, limits=Limits(memory_bytes=16 * 1024 * 1024))
    msg = str(e.value)
    assert "257 pages" in msg and "16777216 bytes" in msg
    assert "memory_limit_bytes" in msg and "--memory-limit" in msg and "--stack" in msg


def test_trap_after_memory_grow_hit_the_limit_names_the_limit_and_the_config_key(sandbox: Sandbox) -> None:
    # An allocator whose memory.grow failed traps with "unreachable": say why.
    module = wat(f"""(module {ABI}
      (func (export "dr_tick") (result i32)
        (loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
        unreachable))""")
    app = make_app(sandbox, module, limits=Limits(memory_bytes=4 * 65536))
    r = app.tick()
    assert r.outcome is Outcome.TRAP
    assert "unreachable" in r.message
    assert "memory is at the app's limit: 262144 of 262144 bytes" in r.message
    assert "memory_limit_bytes" in r.message


def test_trap_well_below_the_memory_limit_does_not_blame_memory(sandbox: Sandbox) -> None:
    module = wat(f"""(module {ABI} (func (export "dr_tick") (result i32) unreachable))""")
    r = make_app(sandbox, module).tick()
    assert r.outcome is Outcome.TRAP and "limit" not in r.message


def test_assemblyscript_env_abort_link_error_says_how_to_replace_it(sandbox: Sandbox) -> None:
    module = wat(f"""(module (import "env" "abort" (func (param i32 i32 i32 i32))) {ABI} {TICK_OK})""")
    with pytest.raises(LinkError, match=r"env\.abort: .*--use abort="):
        make_app(sandbox, module)


def test_monotonic_clock_is_never_zero_at_the_first_call_on_a_virtual_clock(sandbox: Sandbox) -> None:
    # Go's runtime aborts in _initialize when nanotime reads 0; the virtual
    # clock of `app run` starts at 0.
    module = wat("""(module
      (import "clock" "monotonic_us" (func $us (result i64)))
      (import "wasi_snapshot_preview1" "clock_time_get" (func $ct (param i32 i64 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "dr_init") (result i32)
        (drop (call $ct (i32.const 1) (i64.const 1) (i32.const 0)))
        (if (i64.eqz (i64.load (i32.const 0))) (then (return (i32.const 7))))
        (if (i64.eqz (call $us)) (then (return (i32.const 8))))
        (i32.const 0))
      (func (export "dr_tick") (result i32) (i32.const 0)))""")
    clock = VirtualClock()
    assert clock.monotonic_s() == 0.0
    app = make_app(sandbox, module, clock=clock)  # dr_init returning 7 or 8 would raise
    assert app.tick().ok


def test_poll_oneoff_clock_subscription_fires_at_once_and_never_blocks_a_tick(sandbox: Sandbox) -> None:
    # One subscription: a 10 s relative clock timeout (Go's scheduler sleeping).
    sub = struct.pack("<QB7xIxxxxQQH6x", 0xABCDEF, 0, 1, 10_000_000_000, 0, 0)
    data = "".join(f"\\{b:02x}" for b in sub)
    module = wat(f"""(module
      (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 0) "{data}")
      (func (export "dr_init") (result i32) (i32.const 0))
      (func (export "dr_tick") (result i32)
        (local $rc i32)
        (local.set $rc (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))
        (if (local.get $rc) (then (return (i32.add (i32.const 100) (local.get $rc)))))
        (if (i32.ne (i32.load (i32.const 128)) (i32.const 1)) (then (return (i32.const 2))))
        (if (i64.ne (i64.load (i32.const 64)) (i64.const 0xABCDEF)) (then (return (i32.const 3))))
        (if (i32.load16_u (i32.const 72)) (then (return (i32.const 4))))
        (i32.const 0)))""")
    app = make_app(sandbox, module, limits=Limits(tick_budget_ms=50))
    r = app.tick()
    assert r.outcome is Outcome.OK, r.message
    assert r.duration_s < 1.0


def test_poll_oneoff_with_no_subscriptions_is_einval(sandbox: Sandbox) -> None:
    module = wat("""(module
      (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "dr_init") (result i32) (i32.const 0))
      (func (export "dr_tick") (result i32)
        (call $poll (i32.const 0) (i32.const 64) (i32.const 0) (i32.const 128))))""")
    assert make_app(sandbox, module).tick().code == 28


def test_poll_oneoff_fd_subscriptions_stdio_is_ready_other_fds_are_ebadf(sandbox: Sandbox) -> None:
    subs = struct.pack("<QB7xI28x", 1, 1, 0) + struct.pack("<QB7xI28x", 2, 1, 9)  # fd_read on 0, on 9
    data = "".join(f"\\{b:02x}" for b in subs)
    module = wat(f"""(module
      (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 0) "{data}")
      (func (export "dr_init") (result i32) (i32.const 0))
      (func (export "dr_tick") (result i32)
        (if (call $poll (i32.const 0) (i32.const 128) (i32.const 2) (i32.const 256)) (then (return (i32.const 1))))
        (if (i32.ne (i32.load (i32.const 256)) (i32.const 2)) (then (return (i32.const 2))))
        (if (i32.load16_u (i32.const 136)) (then (return (i32.const 3))))
        (if (i32.ne (i32.load16_u (i32.const 168)) (i32.const 8)) (then (return (i32.const 4))))
        (i32.const 0)))""")
    r = make_app(sandbox, module).tick()
    assert r.outcome is Outcome.OK, r.message


def test_poll_oneoff_huge_subscription_count_is_refused_before_reading_memory(sandbox: Sandbox) -> None:
    # 0xFFFFFFFF subscriptions would be a 200 GB read: EINVAL, nothing read or written.
    module = wat("""(module
      (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "dr_init") (result i32) (i32.const 0))
      (func (export "dr_tick") (result i32)
        (i32.store (i32.const 256) (i32.const 77))
        (if (i32.ne (call $poll (i32.const 0) (i32.const 128) (i32.const -1) (i32.const 256)) (i32.const 28))
          (then (return (i32.const 1))))
        (i32.ne (i32.load (i32.const 256)) (i32.const 77))))""")
    assert make_app(sandbox, module).tick().ok


def test_poll_oneoff_out_of_bounds_events_pointer_is_efault_and_writes_nothing(sandbox: Sandbox) -> None:
    sub = struct.pack("<QB7xIxxxxQQH6x", 5, 0, 1, 1000, 0, 0)
    data = "".join(f"\\{b:02x}" for b in sub)
    module = wat(f"""(module
      (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 0) "{data}")
      (func (export "dr_init") (result i32) (i32.const 0))
      (func (export "dr_tick") (result i32)
        (i32.store (i32.const 256) (i32.const 77))
        (if (i32.ne (call $poll (i32.const 0) (i32.const 65530) (i32.const 1) (i32.const 256)) (i32.const 21))
          (then (return (i32.const 1))))
        (i32.ne (i32.load (i32.const 256)) (i32.const 77))))""")
    assert make_app(sandbox, module).tick().ok


def test_fd_fdstat_set_flags_on_stdio_succeeds_and_other_fds_are_ebadf(sandbox: Sandbox) -> None:
    module = wat("""(module
      (import "wasi_snapshot_preview1" "fd_fdstat_set_flags" (func $set (param i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "dr_init") (result i32) (i32.const 0))
      (func (export "dr_tick") (result i32)
        (if (call $set (i32.const 1) (i32.const 4)) (then (return (i32.const 1))))
        (i32.ne (call $set (i32.const 9) (i32.const 4)) (i32.const 8))))""")
    assert make_app(sandbox, module).tick().ok


def test_proc_exit_is_one_log_line_without_a_traceback(
    sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    module = wat(f"""(module
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      {ABI}
      (func (export "dr_tick") (result i32) (call $exit (i32.const 3)) (i32.const 0)))""")
    app = make_app(sandbox, module)
    with caplog.at_level(logging.DEBUG):
        r = app.tick()
    assert r.outcome is Outcome.TRAP
    assert r.message == "dr_tick: app called proc_exit(3)"
    assert not [rec for rec in caplog.records if rec.exc_info]
    assert app.instance.ctx.stats.host_errors == 0


def test_never_sampled_sensor_is_offline_and_writes_no_nan(sandbox: Sandbox) -> None:
    # Every sample dropped from the start: the shim has nothing but NaN.
    clock = VirtualClock()
    sensor = SimSensor("temp", {"fault": "dropout", "fault_rate": 1.0}, clock)
    clock.advance(0.5)
    assert math.isnan(sensor.read().value)
    module = wat("""(module
      (import "sensors" "read" (func $read (param i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 0) "\\2a\\2a\\2a\\2a\\2a\\2a\\2a\\2a")
      (func (export "dr_init") (result i32) (i32.const 0))
      (func (export "dr_tick") (result i32)
        (local $rc i32)
        (local.set $rc (call $read (i32.const 0) (i32.const 0)))
        (if (f64.ne (f64.load (i32.const 0)) (f64.load (i32.const 0))) (then (return (i32.const 99))))
        (local.get $rc)))""")
    res = DeviceResources(clock, sensors={"temp": sensor})
    r = make_app(sandbox, module, res=res).tick()
    assert r.code == codes.ERR_OFFLINE  # not ERR_STALE with NaN (99 if NaN was written)


def test_every_host_function_names_and_explains_each_parameter_and_its_result() -> None:
    for f in REGISTRY.values():
        assert len(f.param_names) == len(f.params) == len(f.param_docs), f.qualname
        assert all(d.strip() for d in f.param_docs), f.qualname
        assert f.returns.strip(), f.qualname
    log_write = REGISTRY[("log", "write")]
    assert log_write.param_names[0] == "level" and "3 error" in log_write.param_docs[0]
    batch = REGISTRY[("sensors", "read_batch")]
    assert "samples, not bytes" in batch.param_docs[2]


def test_app_run_help_shows_every_default() -> None:
    r = run_cli("app", "run", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for default in (
        "default: 10)",
        "default: 100)",
        "default: 10.0)",
        "default: 16777216)",
        "default: 65536)",
    ):
        assert default in text, default
    assert "period_s" in text and "sample_interval_ms" in text


def test_documented_simulated_sensor_defaults_are_the_code_defaults() -> None:
    s = SimSensor("x", {}, VirtualClock())
    assert (s.waveform, s.base, s.amplitude, s.period_s) == ("sine", 20.0, 1.0, 60.0)
    assert (s.walk_step, s.noise, s.dt_s, s.max_age_s) == (0.1, 0.0, 0.1, 0.5)
    assert (s.fault, s.fault_after_s, s.fault_rate, s.spike_magnitude) == ("none", 0.0, 0.1, 100.0)
    text = " ".join(run_cli("app", "run", "--help").stdout.split())
    for documented in (
        "waveform sine",
        "base 20.0, amplitude 1.0, period_s 60,",
        "walk_step 0.1, noise 0.0, sample_interval_ms 100, max_age_ms 5 x sample_interval_ms",
        "fault_after_s 0, fault_rate 0.1, spike_magnitude 100",
    ):
        assert documented in text, documented


def test_host_function_registered_without_naming_its_parameters_is_refused() -> None:
    def impl(ctx: object, level: int, ptr: int) -> int:
        return 0

    with pytest.raises(ValueError, match="must name the parameters"):
        hostfunc("log", "t1", ("i32", "i32"), ("i32",), args={"ptr": "x", "level": "y"}, returns="0")(impl)
    with pytest.raises(ValueError, match="must name the parameters"):
        hostfunc("log", "t2", ("i32", "i32"), ("i32",), args={"level": "x"}, returns="0")(impl)
    with pytest.raises(ValueError, match="say what it returns"):
        hostfunc("log", "t3", ("i32", "i32"), ("i32",), args={"level": "x", "ptr": "y"}, returns="")(impl)
    assert not {("log", "t1"), ("log", "t2"), ("log", "t3")} & REGISTRY.keys()
