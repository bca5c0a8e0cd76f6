"""The sandbox's promises, each test named after what it defends against."""

from __future__ import annotations

import time

import pytest

from devicerunner.device.apps import DeviceResources, Scheduler
from devicerunner.errors import AbiError, AppInitError, CompileLimitError, LinkError, ModuleInvalidError
from devicerunner.sandbox.engine import CompileLimits, Limits, Outcome, Sandbox
from firmware_shims.base import RealClock, SensorReading
from hostfuncs import codes
from tests.conftest import EXAMPLES, LogCapture, make_app, wat

ABI = """
  (memory (export "memory") 1)
  (func (export "dr_init") (result i32) (i32.const 0))
"""


def test_ungranted_import_is_rejected_naming_the_import_and_capability(
    sandbox: Sandbox, logs: LogCapture
) -> None:
    module = wat(f"""(module
      (import "log" "write" (func $log (param i32 i32 i32) (result i32)))
      (import "sensors" "read" (func $read (param i32 i32) (result i32)))
      {ABI}
      (data (i32.const 0) "ran")
      (func $start (drop (call $log (i32.const 1) (i32.const 0) (i32.const 3))))
      (start $start)
      (func (export "dr_tick") (result i32) (i32.const 0)))""")
    with pytest.raises(LinkError) as e:
        make_app(sandbox, module, grant=frozenset({"log"}), logs=logs)
    assert "sensors.read" in str(e.value)
    assert "'sensors'" in str(e.value)
    assert e.value.imports == ["sensors.read"]
    assert logs.lines == []  # not one instruction of it ran (its start function logs)


def test_import_from_unknown_namespace_is_rejected(sandbox: Sandbox) -> None:
    module = wat(f"""(module (import "env" "system" (func (param i32) (result i32)))
      {ABI} (func (export "dr_tick") (result i32) (i32.const 0)))""")
    with pytest.raises(LinkError, match=r"env\.system: no capability provides"):
        make_app(sandbox, module)


def test_import_with_wrong_signature_is_rejected(sandbox: Sandbox) -> None:
    module = wat(f"""(module (import "sensors" "read" (func (param i32) (result f64)))
      {ABI} (func (export "dr_tick") (result i32) (i32.const 0)))""")
    with pytest.raises(LinkError, match=r"sensors\.read: imported as \(i32\) -> \(f64\)"):
        make_app(sandbox, module)


def test_module_without_abi_exports_is_refused(sandbox: Sandbox) -> None:
    with pytest.raises(AbiError, match="dr_tick"):
        make_app(sandbox, wat(f"(module {ABI})"))


def test_garbage_bytes_are_not_a_module(sandbox: Sandbox) -> None:
    with pytest.raises(ModuleInvalidError):
        sandbox.compile(b"\0asm\x01\0\0\0garbage")


RUNAWAY = wat(f"""(module {ABI}
  (func (export "dr_tick") (result i32) (loop $l (br $l)) (i32.const 0)))""")
COUNTER = wat(f"""(module {ABI}
  (global $n (mut i32) (i32.const 0))
  (func (export "dr_tick") (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1))) (i32.const 0)))""")


def test_runaway_loop_is_cut_while_a_second_app_keeps_ticking(sandbox: Sandbox) -> None:
    clock = RealClock()
    res = DeviceResources(clock)
    bad = make_app(sandbox, RUNAWAY, name="bad", res=res, limits=Limits(tick_budget_ms=10), interval_ms=100)
    good = make_app(sandbox, COUNTER, name="good", res=res, interval_ms=20)
    sched = Scheduler(clock)
    sched.add(bad)
    sched.add(good)
    sched.start()
    time.sleep(1.0)
    sched.stop()
    assert bad.counters.overruns >= 3
    assert bad.counters.last_error is not None and "CPU limit" in bad.counters.last_error
    # Cut within max(2 x budget, 50 ms); slack for a loaded shared machine.
    assert max(bad.counters.latencies_s) < 0.050 + 0.030
    # ~50 ticks were due; the runaway costs it at most a few.
    assert good.counters.ticks >= 35
    assert good.counters.traps == good.counters.overruns == 0


def test_memory_bomb_is_stopped_at_the_limit(sandbox: Sandbox) -> None:
    bomb = wat(f"""(module {ABI}
      (func (export "dr_tick") (result i32)
        (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
        (i32.const 7)))""")
    limit = 2 * 1024 * 1024
    app = make_app(sandbox, bomb, limits=Limits(memory_bytes=limit))
    r = app.tick()
    assert r.outcome is Outcome.ERROR and r.code == 7  # grow failed, the app saw -1
    assert app.instance.memory_bytes() <= limit
    # A module whose *initial* memory exceeds the limit never starts.
    big = wat("""(module (memory (export "memory") 64)
      (func (export "dr_init") (result i32) (i32.const 0))
      (func (export "dr_tick") (result i32) (i32.const 0)))""")
    with pytest.raises(AppInitError):
        make_app(sandbox, big, limits=Limits(memory_bytes=limit))


def test_out_of_bounds_and_high_pointers_harm_nothing(sandbox: Sandbox, logs: LogCapture) -> None:
    # Each probe stores its return code at 1024 + 4*i; memory is one 64 KiB page.
    probe = wat("""(module
      (import "log" "write" (func $log (param i32 i32 i32) (result i32)))
      (import "sensors" "read" (func $read (param i32 i32) (result i32)))
      (import "kv" "set" (func $kvset (param i32 i32 i32 i32) (result i32)))
      (import "kv" "get" (func $kvget (param i32 i32 i32 i32) (result i32)))
      (import "sensors" "read_batch" (func $batch (param i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 0) "key")
      (func (export "dr_init") (result i32) (i32.const 0))
      (func (export "dr_tick") (result i32)
        (i32.store (i32.const 1024) (call $log (i32.const 1) (i32.const 0xFFFFFFF0) (i32.const 100)))
        (i32.store (i32.const 1028) (call $log (i32.const 1) (i32.const 0x80000000) (i32.const 4)))
        (i32.store (i32.const 1032) (call $log (i32.const 1) (i32.const 0) (i32.const -1)))
        (i32.store (i32.const 1036) (call $read (i32.const 0) (i32.const 65532)))
        (i32.store (i32.const 1040) (call $kvset (i32.const 0) (i32.const 3) (i32.const 65000) (i32.const 1000)))
        (i32.store (i32.const 1044) (call $kvget (i32.const 0xFFFFFFFF) (i32.const 3) (i32.const 0) (i32.const 8)))
        (i32.store (i32.const 1048) (call $batch (i32.const 0) (i32.const 65500) (i32.const 100)))
        (i32.const 0)))""")
    from firmware_shims.simulated import SimSensor
    from hostfuncs.kv import KvStore

    clock = RealClock()
    res = DeviceResources(clock, sensors={"temp": SimSensor("temp", {}, clock)}, log_sink=logs)
    kv = KvStore(1000)
    app = make_app(sandbox, probe, res=res, kv=kv)
    before = app.instance.ctx.memory.read(0, 1024)
    assert app.tick().ok
    mem = app.instance.ctx.memory
    results = [int.from_bytes(mem.read(1024 + 4 * i, 4), "little", signed=True) for i in range(7)]
    # log.write caps a line at 1 KiB before reading, so (0, -1) reads 1 KiB in bounds.
    assert results == [
        codes.ERR_BOUNDS,
        codes.ERR_BOUNDS,
        codes.OK,
        codes.ERR_BOUNDS,
        codes.ERR_BOUNDS,
        codes.ERR_BOUNDS,
        codes.ERR_BOUNDS,
    ]
    assert mem.read(0, 1024) == before
    assert kv.used_bytes == 0
    assert app.counters.traps == 0


class _FaultySensor:
    """A driver with a bug: reading it raises (stands in for a broken shim)."""

    name = "broken"
    unit = ""

    def read(self) -> SensorReading:
        raise RuntimeError("driver bug")

    def samples_since(self, seq: int, max_n: int) -> tuple[list[float], int]:
        raise RuntimeError("driver bug")

    def close(self) -> None:
        pass


def test_host_function_exception_traps_only_that_app(sandbox: Sandbox) -> None:
    reader = wat("""(module
      (import "sensors" "read" (func $read (param i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "dr_init") (result i32) (i32.const 0))
      (func (export "dr_tick") (result i32) (call $read (i32.const 0) (i32.const 8))))""")
    clock = RealClock()
    res = DeviceResources(clock, sensors={"broken": _FaultySensor()})
    victim = make_app(sandbox, reader, name="victim", res=res)
    bystander = make_app(sandbox, COUNTER, name="bystander", res=res)
    r = victim.tick()
    assert r.outcome is Outcome.TRAP
    assert "RuntimeError: driver bug" in r.message
    assert victim.counters.traps == 1
    assert bystander.tick().ok and bystander.counters.traps == 0
    assert victim.tick().outcome is Outcome.TRAP  # still alive, still trapping


def test_trap_in_tick_is_counted_with_its_message(sandbox: Sandbox) -> None:
    app = make_app(
        sandbox,
        wat(f"""(module {ABI}
      (func (export "dr_tick") (result i32) unreachable))"""),
    )
    for _ in range(3):
        app.tick()
    assert app.counters.traps == 3
    assert "unreachable" in (app.counters.last_error or "")


def test_wasi_printf_from_c_reaches_the_log(sandbox: Sandbox, logs: LogCapture) -> None:
    from firmware_shims.simulated import SimActuator, SimSensor

    clock = RealClock()
    res = DeviceResources(
        clock,
        sensors={"temp": SimSensor("temp", {}, clock)},
        actuators={"fan": SimActuator("fan", {}, clock)},
        log_sink=logs,
    )
    from hostfuncs.kv import KvStore

    make_app(
        sandbox, (EXAMPLES / "thermostat.wasm").read_bytes(), name="thermostat", res=res, kv=KvStore(1024)
    )
    assert any(m.startswith("thermostat: setpoint 22.0 C") for m in logs.messages())


def test_compile_bomb_over_the_time_limit_is_cut_and_names_the_limit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A module that takes too long to compile is cut at compile_timeout_s (the
    child is killed), not waited for: the updater lane is never held for long."""
    from tests.wasmgen import many_functions

    sb = Sandbox(cache_dir=tmp_path / "cache")
    try:  # ~4 s of compiling, cut at 0.3 s
        with pytest.raises(CompileLimitError, match=r"longer than 0\.3 s \(compile_timeout_s\)"):
            sb.compile_bounded(many_functions(200_000), CompileLimits(1024**3, 0.3))
        assert not list((tmp_path / "cache").glob("*.cwasm"))  # nothing half-made is kept
    finally:
        sb.close()


def test_bounded_compile_output_is_kept_under_the_cache_hmac_and_reused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The child's serialized output is what the daemon deserializes and caches;
    a later boot reuses it without another child, and a forged entry is not
    loaded (the HMAC covers the child's output like any other entry)."""
    cache = tmp_path / "cache"
    sb = Sandbox(cache_dir=cache)
    first = sb.compile_bounded(COUNTER, CompileLimits(512 * 1024**2, 30))
    assert not first.from_cache and first.exports["dr_tick"] == ("func", (), ("i32",))
    sb.close()
    sb2 = Sandbox(cache_dir=cache)
    assert sb2.compile_bounded(COUNTER, CompileLimits(512 * 1024**2, 30)).from_cache
    sb2.close()
    for entry in cache.glob("*.cwasm"):
        blob = bytearray(entry.read_bytes())
        blob[-1] ^= 0xFF
        entry.write_bytes(bytes(blob))
    sb3 = Sandbox(cache_dir=cache)
    assert not sb3.compile_bounded(COUNTER, CompileLimits(512 * 1024**2, 30)).from_cache
    sb3.close()


def test_compile_cache_never_loads_an_entry_it_did_not_write(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "cache"
    sb = Sandbox(cache_dir=cache)
    assert not sb.compile(COUNTER).from_cache
    sb.close()
    sb2 = Sandbox(cache_dir=cache)
    assert sb2.compile(COUNTER).from_cache  # written by this device: reused
    sb2.close()
    for entry in cache.glob("*.cwasm"):
        blob = bytearray(entry.read_bytes())
        blob[100] ^= 0xFF  # a planted/corrupted artifact
        entry.write_bytes(bytes(blob))
    sb3 = Sandbox(cache_dir=cache)
    assert not sb3.compile(COUNTER).from_cache
    sb3.close()


def test_compile_cache_refuses_a_well_formed_entry_from_another_device(tmp_path, logs: LogCapture) -> None:  # type: ignore[no-untyped-def]
    """Cache poisoning with a *valid* entry: the right format, a module that
    deserializes on this engine, an HMAC that is correct -- under another device's
    key. Planted under the name of this device's entry, it must never be loaded.
    (Flipping a byte of the JSON header, as above, is refused by the header parse
    even without an HMAC check; this one only by the HMAC.)"""
    cache = tmp_path / "cache"
    sb = Sandbox(cache_dir=cache)
    assert not sb.compile(COUNTER).from_cache
    sb.close()
    (entry,) = cache.glob("*.cwasm")
    planted = wat(f"""(module
      (import "log" "write" (func $log (param i32 i32 i32) (result i32)))
      {ABI}
      (data (i32.const 0) "planted code ran")
      (func (export "dr_tick") (result i32)
        (drop (call $log (i32.const 2) (i32.const 0) (i32.const 16))) (i32.const 0)))""")
    other = Sandbox(cache_dir=tmp_path / "other-device")
    assert not other.compile(planted).from_cache
    other.close()
    (foreign,) = (tmp_path / "other-device").glob("*.cwasm")
    entry.write_bytes(foreign.read_bytes())
    sb2 = Sandbox(cache_dir=cache)
    try:
        compiled = sb2.compile(COUNTER)
        assert not compiled.from_cache
        app = make_app(sb2, COUNTER, logs=logs)
        assert app.tick().ok
        assert logs.lines == []  # the counter ran, not the planted module
    finally:
        sb2.close()


def test_compiled_modules_in_memory_are_bounded_least_recently_used_first(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # One compiled module per release ever seen stayed in memory for the life of the
    # daemon (or of a simulator running many releases).
    sb = Sandbox(cache_dir=tmp_path / "cache")
    try:
        tick = '(func (export "dr_tick") (result i32) (i32.const %d))'
        modules = [wat(f"(module {ABI} {tick % i})") for i in range(60)]
        first = sb.compile(modules[0])
        for m in modules[1:]:
            sb.compile(m)
            sb.compile(modules[0])  # used all along: kept
        assert sb.modules_in_memory == sb.max_modules < len(modules)
        assert sb.compile(modules[0]) is first
        again = sb.compile(modules[1])  # dropped long ago: back from the disk cache
        assert again.from_cache
    finally:
        sb.close()


def test_huge_planted_compile_cache_entry_is_not_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "cache"
    sb = Sandbox(cache_dir=cache)
    sb.compile(COUNTER)
    sb.close()
    (entry,) = cache.glob("*.cwasm")
    with open(entry, "r+b") as f:
        f.truncate(1536 * 1024 * 1024)  # sparse 1.5 GB where a few KB belong
    import resource

    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sb2 = Sandbox(cache_dir=cache)
    try:
        assert not sb2.compile(COUNTER).from_cache
    finally:
        sb2.close()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib < 200 * 1024  # not read
