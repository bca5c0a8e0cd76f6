"""kv quota and persistence, the daemon's start/stop, config errors naming keys."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devicerunner.device import config
from devicerunner.device.kvfile import KvFlusher, open_store
from devicerunner.errors import ConfigError
from devicerunner.runtime.lanes import Executor
from devicerunner.sandbox.engine import Sandbox
from hostfuncs import codes
from hostfuncs.kv import FRAMING_BYTES, KvStore, entry_bytes
from hostfuncs.kv import decode as kv_decode
from tests.conftest import ROOT, make_app, run_cli, until, wat

# On init: boots = kv["boots"] + 1; store it; log "boots=N"; then try to
# store 2000 bytes (over a 100-byte quota) and keep the result at 512.
BOOT_COUNTER = """(module
  (import "kv" "get" (func $get (param i32 i32 i32 i32) (result i32)))
  (import "kv" "set" (func $set (param i32 i32 i32 i32) (result i32)))
  (import "log" "write" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "boots")
  (data (i32.const 8) "big")
  (data (i32.const 100) "boots=1 boots=2 boots=3 ")
  (func (export "dr_init") (result i32) (local $n i32)
    (if (i32.ne (call $get (i32.const 0) (i32.const 5) (i32.const 64) (i32.const 4)) (i32.const 4))
      (then (i32.store (i32.const 64) (i32.const 0))))
    (local.set $n (i32.add (i32.load (i32.const 64)) (i32.const 1)))
    (i32.store (i32.const 64) (local.get $n))
    (drop (call $set (i32.const 0) (i32.const 5) (i32.const 64) (i32.const 4)))
    (drop (call $log (i32.const 1)
      (i32.add (i32.const 92) (i32.mul (local.get $n) (i32.const 8))) (i32.const 7)))
    (i32.store (i32.const 512) (call $set (i32.const 8) (i32.const 3) (i32.const 1024) (i32.const 2000)))
    (i32.const 0))
  (func (export "dr_tick") (result i32) (i32.const 0)))"""


def test_kv_quota_is_enforced_and_data_survives_restart(tmp_path: Path) -> None:
    module = wat(BOOT_COUNTER)
    for boot in (1, 2, 3):
        sb = Sandbox(cache_dir=tmp_path / "cache")
        store = open_store(tmp_path / "kv", quota_bytes=100)
        app = make_app(sb, module, kv=store)
        mem = app.instance.ctx.memory
        assert int.from_bytes(mem.read(64, 4), "little") == boot
        quota_rc = int.from_bytes(mem.read(512, 4), "little", signed=True)
        assert quota_rc == codes.ERR_QUOTA
        assert store.get(b"big") is None and store.used_bytes == entry_bytes(b"boots", b"1234")
        store.flush()  # what the daemon's flusher and a clean stop do
        sb.close()


def _write_config(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "boot.wat").write_text(BOOT_COUNTER)
    cfg = tmp_path / "device.toml"
    cfg.write_text(f"""
[device]
id = "dev-1"
hardware = "test-hw"
state_dir = "state"

[apps.counter]
module = "boot.wat"
policy = ["kv", "log"]
kv_quota_bytes = 100
tick_interval_ms = 50
{extra}
""")
    return cfg


class CountingBackend:
    def __init__(self) -> None:
        self.saves: list[bytes] = []

    def load(self) -> bytes | None:
        return None

    def save(self, data: bytes) -> None:
        self.saves.append(data)


def test_kv_flusher_saves_after_each_change_and_never_while_idle() -> None:
    ex = Executor(1, "kv")
    try:
        backend = CountingBackend()
        store = KvStore(1000, backend)
        flusher = KvFlusher(ex.lane("kv"), interval_s=0.05)
        flusher.add(store)
        flusher.start()
        time.sleep(0.2)
        assert backend.saves == []  # idle: nothing written, no wake-ups needed
        store.set(b"a", b"1")
        assert until(lambda: len(backend.saves) == 1, 5)
        store.set(b"a", b"2")  # dirty again after a save: a new flush is armed
        store.set(b"b", b"3")
        assert until(lambda: len(backend.saves) == 2, 5)
        assert kv_decode(backend.saves[-1]) == {b"a": b"2", b"b": b"3"}
        time.sleep(0.2)
        assert len(backend.saves) == 2
        store.delete(b"b")
        flusher.stop()  # stop saves what is still dirty
        assert kv_decode(backend.saves[-1]) == {b"a": b"2"}
    finally:
        ex.shutdown()


def test_kv_quota_counts_the_bytes_actually_stored() -> None:
    # 4-byte keys and values: 8 bytes handed in, 22 stored (base64, quotes, colon,
    # comma). The quota used to count the 8, so a "64 KiB" store wrote 196 KiB files.
    import random

    rng = random.Random(7)
    backend = CountingBackend()
    store = KvStore(4096, backend)
    for i in range(2000):
        key = rng.randbytes(rng.randint(1, 9))
        if rng.random() < 0.2:
            store.delete(key)
        else:
            store.set(key, rng.randbytes(rng.randint(0, 40)))
        if i % 50 == 0:
            store.set(b"flush-marker", i.to_bytes(4, "little"))
            store.flush()
            n = len(kv_decode(backend.saves[-1]))
            assert len(backend.saves[-1]) == FRAMING_BYTES + store.used_bytes - (1 if n else 0)
            assert len(backend.saves[-1]) <= FRAMING_BYTES + store.quota_bytes
    assert store.set(b"k", b"x" * 4096) == codes.ERR_QUOTA


def test_unchanged_kv_store_is_never_rewritten() -> None:
    backend = CountingBackend()
    store = KvStore(1000, backend)
    store.set(b"setpoint", b"22.0")
    store.flush()
    assert len(backend.saves) == 1
    for _ in range(100):  # an app writing the same value every tick
        assert store.set(b"setpoint", b"22.0") == codes.OK
    assert not store.dirty
    store.set(b"setpoint", b"23.0")
    store.set(b"setpoint", b"22.0")  # changed and changed back before the flush
    store.flush()
    assert len(backend.saves) == 1 and store.writes == 1 and not store.dirty


def test_kv_writes_are_coalesced_to_one_flush_per_interval_by_default(tmp_path: Path) -> None:
    # The flusher wrote 0.5 s after every change: twice a second for an app that
    # writes every tick. Default now: at most one snapshot per 5 s, and on stop.
    ex = Executor(1, "kv")
    try:
        backend = CountingBackend()
        store = KvStore(1000, backend)
        flusher = KvFlusher(ex.lane("kv"))
        flusher.add(store)
        flusher.start()
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 1.5:  # an app rewriting kv every 10 ms tick
            n += 1
            store.set(b"count", n.to_bytes(4, "little"))
            time.sleep(0.01)
        assert backend.saves == []
        flusher.stop()
        assert len(backend.saves) == 1 and kv_decode(backend.saves[0]) == {b"count": n.to_bytes(4, "little")}
    finally:
        ex.shutdown()


@pytest.mark.parametrize(
    "content",
    [
        b"[" * 200_000,  # RecursionError through the daemon, before
        b'{"kv": 1, "entries": {"YQ==": {"x": {}}}}',
        b'{"kv": 1, "entries": {"YQ==": 5}}',
        b'{"kv": 1, "entries": {"!!": "YQ=="}}',
        b'{"kv": 1, "entries": []}',
        b"\xff\xfe",
    ],
)
def test_corrupt_or_nested_kv_snapshot_is_set_aside_not_a_crash(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "kv").mkdir()
    (tmp_path / "kv" / "data.json").write_bytes(content)
    store = open_store(tmp_path / "kv", quota_bytes=1000)
    assert store.used_bytes == 0 and store.get(b"a") is None
    assert (tmp_path / "kv" / "data.corrupt").read_bytes() == content


def test_oversized_kv_snapshot_is_set_aside_unread(tmp_path: Path) -> None:
    (tmp_path / "kv").mkdir()
    with open(tmp_path / "kv" / "data.json", "wb") as f:
        f.truncate(1 << 30)  # 1 GiB, sparse: reading it would take 1 GiB of RAM
    store = open_store(tmp_path / "kv", quota_bytes=1000)
    assert store.used_bytes == 0
    assert (tmp_path / "kv" / "data.corrupt").stat().st_size == 1 << 30


def test_failing_kv_flush_retries_with_backoff_and_logs_a_bounded_number_of_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A real OSError from the file system: the store's directory is under a regular file.
    from devicerunner.device.kvfile import FileKvBackend

    ex = Executor(1, "kv")
    flusher = KvFlusher(ex.lane("kv"), interval_s=0.05)
    try:
        store = KvStore(1000, FileKvBackend(tmp_path / "kv"))
        (tmp_path / "kv").write_bytes(b"")  # now every save fails: ENOTDIR / EEXIST
        flusher.add(store)
        flusher.start()
        with caplog.at_level(logging.INFO, "devicerunner.device.kvfile"):
            t0 = time.monotonic()
            n = 0
            while time.monotonic() - t0 < 2.0:  # every 10 ms for 2 s: 40 flush intervals
                n += 1
                store.set(b"count", n.to_bytes(4, "little"))
                time.sleep(0.01)
        lines = [r for r in caplog.records if r.name == "devicerunner.device.kvfile"]
        assert 2 <= flusher.failures <= 6  # 0.1, 0.2, 0.4, 0.8 s ...: backing off, still trying
        assert len(lines) == 1, [r.getMessage() for r in lines]
        assert store.dirty  # nothing lost: written once the disk works again
    finally:
        flusher.stop()
        ex.shutdown()


def test_daemon_keeps_kv_across_clean_restarts(tmp_path: Path) -> None:
    cfg = _write_config(tmp_path)
    for boot in (1, 2):
        r = run_cli("run", "--config", str(cfg), "--for", "0.3", "--json")
        assert r.returncode == 0, r.stderr
        assert f"boots={boot}" in r.stderr
        status = json.loads(r.stdout)
        assert status["apps"]["counter"]["ticks"] >= 1


def test_daemon_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    cfg = _write_config(tmp_path)
    p = subprocess.Popen(
        [sys.executable, "-m", "devicerunner.cli.main", "run", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        # Wait (bounded) until the app has logged, i.e. the daemon is running.
        assert p.stderr is not None
        for _ in range(200):
            line = p.stderr.readline()
            if "boots=1" in line or not line:
                break
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0
    assert "counter: local" in out and "ticks=" in out
    # the kv snapshot was flushed on the way out
    assert (tmp_path / "state" / "apps" / "counter" / "kv" / "data.json").exists()


def test_second_daemon_on_the_same_state_dir_exits_2_naming_the_dir_and_the_holder(tmp_path: Path) -> None:
    """Two daemons on one state dir would both run every app and both trial every
    update; the second one must refuse to start, while install and status work."""
    from tests.devicekit import Kit, counter_module

    kit = Kit(tmp_path / "dev")
    first = subprocess.Popen(
        [sys.executable, "-m", "devicerunner.cli.main", "run", "--config", str(kit.config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    lock = kit.state_dir / "lock"
    try:
        assert until(lambda: lock.exists() and lock.read_text().strip() == str(first.pid), timeout_s=30)
        second = run_cli("run", "--config", str(kit.config_path), "--for", "5", timeout=60)
        assert second.returncode == 2, second.stderr
        assert str(kit.state_dir) in second.stderr and f"process {first.pid}" in second.stderr
        bundle = tmp_path / "v1.bundle"
        bundle.write_bytes(kit.bundle(counter_module(3), 1))
        assert run_cli("install", str(bundle), "--config", str(kit.config_path)).returncode == 0
        inbox = kit.state_dir / "inbox"
        assert until(lambda: not list(inbox.glob("*.bundle")), timeout_s=30)  # the running daemon took it

        def status() -> str:
            r = run_cli("status", "--config", str(kit.config_path), "--json")
            assert r.returncode == 0, r.stderr
            return str(json.loads(r.stdout)["daemon"])

        assert until(lambda: status() == "running", timeout_s=30)
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=20)
    assert first.returncode == 0


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('[sensors.temp]\ndriver = "nope"', "sensors.temp.driver: unknown driver 'nope'"),
        ('[sensors.temp]\nwaveform = "square"', "sensors.temp.waveform: must be one of"),
        ('[sensors.temp]\nbase = "warm"', "sensors.temp.base: must be a number"),
        ("[sensors.temp]\nbsae = 3", "sensors.temp.bsae: unknown option"),
    ],
)
def test_config_error_names_the_sensor_and_key(tmp_path: Path, extra: str, key: str) -> None:
    cfg = _write_config(tmp_path, extra)
    r = run_cli("run", "--config", str(cfg), "--for", "0.1")
    assert r.returncode == 2
    assert key in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"device": {}}, "device.id: is required"),
        ({"device": {"id": "d"}, "apps": {"a": {}}}, "apps.a.policy: is required"),
        (
            {"device": {"id": "d"}, "apps": {"a": {"policy": ["root"]}}},
            "apps.a.policy: unknown capability 'root'",
        ),
        (
            {"device": {"id": "d"}, "apps": {"a": {"policy": [], "tick_interval_ms": 0}}},
            "apps.a.tick_interval_ms: must be between",
        ),
        ({"device": {"id": "d", "colour": 1}}, "device.colour: unknown key"),
        (
            {"device": {"id": "d"}, "apps": {"a": {"policy": [], "sensors": ["x"]}}},
            "apps.a.sensors: no [sensors.x]",
        ),
        # reconnect_min_s = 0 made a hot reconnect loop; min > max was not checked
        ({"device": {"id": "d"}, "broker": {"reconnect_min_s": 0}}, "broker.reconnect_min_s: must be >="),
        (
            {"device": {"id": "d"}, "broker": {"reconnect_min_s": 5, "reconnect_max_s": 1}},
            "broker.reconnect_max_s: must be >= reconnect_min_s",
        ),
        (
            {"device": {"id": "d"}, "broker": {"reconnect_max_s": float("nan")}},
            "broker.reconnect_max_s: must be a finite",
        ),
        ({"device": {"id": "d", "kv_flush_interval_s": 0}}, "device.kv_flush_interval_s: must be >="),
        ({"device": {"id": "d\n"}}, "device.id: invalid value 'd\\n'"),
        ({"device": {"id": "d"}, "apps": {"a\n": {"policy": []}}}, "apps.a\n: app names are"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, doc: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as e:
        config.parse(doc, tmp_path)
    assert str(e.value).startswith(message)
