"""Signed app configuration on a real daemon: verification, trial, rollback, restarts.

Each device here is a real Daemon (wasmtime, files with fsync, its lanes);
documents are signed with real keys. A config reaches the device through
``ConfigUpdates.offer``, the call the MQTT transport makes for a retained
``{p}/configs/{app}/{channel}`` message (tests/test_messages.py goes over a
real broker).
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devicerunner.device.daemon import Daemon
from devicerunner.errors import MalformedError, TooLargeError
from devicerunner.trust import appconfig, manifest
from devicerunner.trust.manifest import Health
from devicerunner.update.config_state import ConfigState, plan_boot, plan_rollback, plan_stage
from tests.conftest import until, wat
from tests.devicekit import Events, Kit

# Reads setting "limit" in dr_init; traps on every tick when it is above 100
# (a config that breaks the app). Every tick it writes the config version it
# runs with to kv "cver".
CONFIGURED_WAT = """(module
  (import "config" "get_f64" (func $cf (param i32 i32 i32) (result i32)))
  (import "config" "version" (func $cv (result i64)))
  (import "kv" "set" (func $set (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "limit")
  (data (i32.const 8) "cver")
  (global $limit (mut f64) (f64.const 0))
  (func (export "dr_init") (result i32)
    (if (i32.eqz (call $cf (i32.const 0) (i32.const 5) (i32.const 16)))
      (then (global.set $limit (f64.load (i32.const 16)))))
    (i32.const 0))
  (func (export "dr_tick") (result i32)
    (i64.store (i32.const 32) (call $cv))
    (drop (call $set (i32.const 8) (i32.const 4) (i32.const 32) (i32.const 8)))
    (if (f64.gt (global.get $limit) (f64.const 100)) (then unreachable))
    (i32.const 0)))"""

QUICK = Health(trial_ticks=10, trial_seconds=0, max_traps=0, max_overruns=5, max_broker_loss_s=60)


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    boot = tmp_path / "configured.wasm"
    boot.write_bytes(wat(CONFIGURED_WAT))
    return Kit(tmp_path / "dev", bootstrap=str(boot))


def start(kit: Kit) -> tuple[Daemon, Events]:
    d = Daemon(kit.cfg, status_file=False)
    ev = Events(d)
    d.start()
    return d, ev


def config_status(d: Daemon) -> dict[str, Any]:
    return dict(d.status()["apps"]["app"]["config"])


def running_version(d: Daemon) -> int:
    """The config version the ticking instance runs with (it says so every tick)."""
    raw = d.kv["app"].get(b"cver")
    return struct.unpack("<q", raw)[0] if raw else -1


def test_config_is_verified_trialled_committed_and_seen_by_the_app(kit: Kit) -> None:
    d, ev = start(kit)
    try:
        d.config_updates.offer(kit.config(1, {"limit": "42.5"}, health=QUICK), "test")
        ev.wait("CONFIG_COMMITTED", 1, key="config_version")
        assert config_status(d)["version"] == 1
        assert running_version(d) == 1
        phases = [e["phase"] for e in ev.items if e.get("config_version") == 1]
        assert phases == ["CONFIG_STAGED", "CONFIG_TRIAL", "CONFIG_COMMITTED"]
    finally:
        d.stop()


@pytest.mark.parametrize("who", ["unsigned", "release_keys", "unknown_key"])
def test_unsigned_or_wrong_role_config_is_refused(kit: Kit, who: str) -> None:
    signers = {
        "unsigned": [],
        "release_keys": kit.release_keys,  # a real key of the root, but of the release role
        "unknown_key": [Ed25519PrivateKey.generate()],
    }[who]
    d, ev = start(kit)
    try:
        d.config_updates.offer(kit.config(1, {"limit": "1"}, signers=signers, health=QUICK), "test")
        rej = ev.wait("CONFIG_REJECTED", 1, key="config_version")
        assert rej["reason"] == "bad_signature"
        assert config_status(d)["version"] == 0 and until(lambda: running_version(d) == 0)
        # a refusal of forged material burns nothing: the genuine v1 is taken
        d.config_updates.offer(kit.config(1, {"limit": "1"}, health=QUICK), "test")
        ev.wait("CONFIG_COMMITTED", 1, key="config_version")
    finally:
        d.stop()


def test_config_on_a_root_without_a_config_role_is_refused(tmp_path: Path, kit: Kit) -> None:
    now = 1_900_000_000
    signed = manifest.root_signed(
        version=1,
        issued=now,
        expires=now + 86400,
        role_keys={"root": [kit.root_key.public_key()], "release": [kit.release_keys[0].public_key()]},
        thresholds={"root": 1, "release": 1},
    )
    assert "config" not in signed["roles"]  # a root as made before configs existed reads as before
    root = manifest.parse_root(manifest.sign_envelope(signed, [kit.root_key]))
    from devicerunner.errors import BadSignatureError
    from devicerunner.trust.verify import DeviceIdentity

    with pytest.raises(BadSignatureError):
        appconfig.verify_config(
            kit.config(1, {}),
            root=root,
            device=DeviceIdentity("dev-1", kit.hardware, {"app": frozenset()}),
            channel="stable",
            history=appconfig.ConfigHistory(),
            time_floor=0,
            now=now,
        )


@pytest.mark.parametrize("target", ["other_app", "other_hardware", "other_device", "other_channel"])
def test_config_for_another_app_or_hardware_is_refused(kit: Kit, target: str) -> None:
    kw: dict[str, Any] = {
        "other_app": {"app": "thermostat"},
        "other_hardware": {"hardware": "stb-b"},
        "other_device": {"devices": ["dev-2"]},
        "other_channel": {"channel": "beta"},
    }[target]
    d, ev = start(kit)
    try:
        d.config_updates.offer(kit.config(1, {"limit": "1"}, health=QUICK, **kw), "test")
        rej = ev.wait("CONFIG_REJECTED", 1, key="config_version")
        assert rej["reason"] == "wrong_target"
        assert until(lambda: running_version(d) == 0)
        # remembered by digest: the same document again (every reconnect) is not news
        d.config_updates.offer(kit.config(1, {"limit": "1"}, health=QUICK, **kw), "test")
        d.config_updates.offer(kit.config(2, {"limit": "1"}, health=QUICK), "test")
        ev.wait("CONFIG_COMMITTED", 2, key="config_version")
        assert sum(1 for e in ev.items if e["phase"] == "CONFIG_REJECTED") == 1
    finally:
        d.stop()


def test_config_failing_its_trial_is_rolled_back_and_never_retried(kit: Kit) -> None:
    d, ev = start(kit)
    try:
        d.config_updates.offer(kit.config(1, {"limit": "50"}, health=QUICK), "test")
        ev.wait("CONFIG_COMMITTED", 1, key="config_version")
        bad = kit.config(2, {"limit": "500"}, health=QUICK)  # the app traps under it
        d.config_updates.offer(bad, "test")
        rb = ev.wait("CONFIG_ROLLED_BACK", 2, key="config_version")
        assert "trapped" in rb["reason_text"]
        st = config_status(d)
        assert st["version"] == 1 and st["refused_versions"] == [2]
        assert until(lambda: running_version(d) == 1)  # the old instance is back, with v1
        ticks = d.scheduler.apps["app"].counters.ticks
        assert until(lambda: d.scheduler.apps["app"].counters.ticks > ticks + 5)
        d.config_updates.offer(bad, "test")  # redelivered (a retained message on reconnect)
        d.config_updates.offer(kit.config(3, {"limit": "60"}, health=QUICK), "test")
        ev.wait("CONFIG_COMMITTED", 3, key="config_version")
        assert [e["phase"] for e in ev.items if e.get("config_version") == 2].count("CONFIG_TRIAL") == 1
    finally:
        d.stop()
    # ... and never again after a restart
    d, ev = start(kit)
    try:
        assert config_status(d)["version"] == 3 and until(lambda: running_version(d) == 3)
        d.config_updates.offer(kit.config(2, {"limit": "500"}, health=QUICK), "test")
        d.config_updates.offer(kit.config(4, {"limit": "70"}, health=QUICK), "test")
        ev.wait("CONFIG_COMMITTED", 4, key="config_version")
        assert not [e for e in ev.items if e.get("config_version") == 2]
    finally:
        d.stop()


def test_a_config_refused_before_the_root_named_its_key_is_taken_after_the_rotation(kit: Kit) -> None:
    new_key = Ed25519PrivateKey.generate()
    doc = kit.config(1, {"limit": "8"}, signers=[new_key], health=QUICK)
    now = int(time.time())
    root2 = manifest.sign_envelope(
        manifest.root_signed(
            version=2,
            issued=now - 30,
            expires=now + 86400,
            role_keys={
                "root": [kit.root_key.public_key()],
                "release": [k.public_key() for k in kit.release_keys],
                "config": [new_key.public_key()],
            },
            thresholds={"root": 1, "release": 2, "config": 1},
        ),
        [kit.root_key],
    )
    d, ev = start(kit)
    try:
        d.config_updates.offer(doc, "test")
        assert ev.wait("CONFIG_REJECTED", 1, key="config_version")["reason"] == "bad_signature"
        d.trust.rotate(root2)  # what the transport does with a verified root v2
        d.config_updates.offer(doc, "test")  # the retained document, redelivered
        ev.wait("CONFIG_COMMITTED", 1, key="config_version")
    finally:
        d.stop()


def test_a_release_arriving_during_a_config_trial_waits_for_it(kit: Kit) -> None:
    slow = Health(trial_ticks=150, trial_seconds=0, max_traps=0, max_overruns=5, max_broker_loss_s=60)
    d, ev = start(kit)
    try:
        d.config_updates.offer(kit.config(1, {"limit": "4"}, health=slow), "test")
        ev.wait("CONFIG_TRIAL", 1, key="config_version")
        module = wat(CONFIGURED_WAT.replace("(i32.const 0)))", '(i32.const 0))\n  (func (export "v2")))'))
        from devicerunner.update.updater import install_bundle

        install_bundle(kit.state_dir, kit.bundle(module, 1, caps=["kv", "config"], trial_ticks=10))
        ev.wait("COMMITTED", 1)
        order = [e["phase"] for e in ev.items if e["phase"] in ("CONFIG_COMMITTED", "STAGED", "COMMITTED")]
        assert order == ["CONFIG_COMMITTED", "STAGED", "COMMITTED"]  # ordered, never mixed
        assert until(lambda: running_version(d) == 1)  # the new module runs with the config
    finally:
        d.stop()


def test_config_survives_a_restart_and_a_module_update(kit: Kit) -> None:
    d, ev = start(kit)
    try:
        d.config_updates.offer(kit.config(5, {"limit": "7"}, health=QUICK), "test")
        ev.wait("CONFIG_COMMITTED", 5, key="config_version")
        # a new module: its first instance starts with the committed config
        module = wat(CONFIGURED_WAT.replace("(i32.const 0)))", '(i32.const 0))\n  (func (export "v2")))'))
        data = kit.bundle(module, 1, caps=["kv", "config"], trial_ticks=10)
        from devicerunner.update.updater import install_bundle

        install_bundle(kit.state_dir, data)
        ev.wait("COMMITTED", 1)
        assert d.scheduler.apps["app"].spec.sequence == 1
        assert until(lambda: running_version(d) == 5)
    finally:
        d.stop()
    d, _ = start(kit)
    try:
        assert config_status(d)["version"] == 5
        assert until(lambda: running_version(d) == 5)
    finally:
        d.stop()


def test_a_config_arriving_during_a_module_trial_waits_for_it(kit: Kit) -> None:
    d, ev = start(kit)
    try:
        module = wat(CONFIGURED_WAT.replace("(i32.const 0)))", '(i32.const 0))\n  (func (export "v2")))'))
        from devicerunner.update.updater import install_bundle

        install_bundle(kit.state_dir, kit.bundle(module, 1, caps=["kv", "config"], trial_ticks=60))
        ev.wait("TRIAL", 1)
        d.config_updates.offer(kit.config(1, {"limit": "3"}, health=QUICK), "test")
        ev.wait("CONFIG_COMMITTED", 1, key="config_version")
        order = [e["phase"] for e in ev.items if e["phase"] in ("COMMITTED", "CONFIG_STAGED")]
        assert order == ["COMMITTED", "CONFIG_STAGED"]  # ordered, never mixed
    finally:
        d.stop()


def test_a_crash_during_a_config_trial_rolls_it_back_at_boot(kit: Kit) -> None:
    d, ev = start(kit)
    try:
        d.config_updates.offer(kit.config(1, {"limit": "5"}, health=QUICK), "test")
        ev.wait("CONFIG_COMMITTED", 1, key="config_version")
    finally:
        d.stop()
    files = Path(kit.state_dir) / "apps" / "app" / "config"
    # what a second power cut right after step 2 leaves: v2 on disk, state TRIAL,
    # both attempts (device.trial_attempts, default 2) used
    doc = appconfig.parse_config(kit.config(2, {"limit": "6"}, health=QUICK))
    (files / "v2.json").write_bytes(doc.raw)
    st = ConfigState.from_json((files / "state.json").read_bytes())
    st = plan_stage(st, doc)
    (files / "state.json").write_bytes(
        ConfigState(**{**json.loads(st.to_json()), "phase": "TRIAL", "trial_attempts": 2}).to_json()
    )
    d, ev = start(kit)
    try:
        assert config_status(d)["version"] == 1 and config_status(d)["refused_versions"] == [2]
        assert until(lambda: running_version(d) == 1)
        ev.wait("CONFIG_ROLLED_BACK", 2, key="config_version", timeout_s=1)
    finally:
        d.stop()


def test_a_corrupt_config_state_file_starts_the_app_without_config(kit: Kit) -> None:
    files = Path(kit.state_dir) / "apps" / "app" / "config"
    files.mkdir(parents=True)
    (files / "state.json").write_bytes(b'{"schema": 1, "phase": 7}')
    d, _ = start(kit)
    try:
        assert until(lambda: running_version(d) == 0)
        assert config_status(d)["last_reason"] == "state_corrupt"
    finally:
        d.stop()


# -- the document and the pure decisions ---------------------------------------------


def test_an_oversized_config_is_refused_before_it_is_parsed(kit: Kit) -> None:
    with pytest.raises(TooLargeError):
        appconfig.parse_config(b" " * (appconfig.MAX_CONFIG_BYTES + 1))
    with pytest.raises(MalformedError, match="settings"):
        appconfig.parse_config(kit.config(1, {f"k{i}": "x" * 64 for i in range(128)}))


def test_floats_in_settings_are_refused_decimals_travel_as_strings(kit: Kit) -> None:
    with pytest.raises(MalformedError):
        kit.config(1, {"setpoint": 21.5})
    doc = appconfig.parse_config(kit.config(1, {"setpoint": "21.5", "on": True}))
    assert doc.settings_bytes == b'{"on":true,"setpoint":"21.5"}'


def test_a_config_trial_tried_again_after_a_crash_keeps_counting_its_attempts(kit: Kit) -> None:
    doc = appconfig.parse_config(kit.config(2, {"limit": "6"}))
    st = plan_stage(ConfigState(active_version=1, highest_version=1), doc)
    st = ConfigState(**{**json.loads(st.to_json()), "phase": "TRIAL", "trial_attempts": 1})
    again = plan_stage(st, doc)  # boot: the same candidate is staged again before its trial
    assert again.trial_attempts == 1
    other = appconfig.parse_config(kit.config(3, {"limit": "6"}))
    assert plan_stage(st, other).trial_attempts == 0


def test_plan_boot_counts_a_crash_as_a_failed_attempt() -> None:
    st = ConfigState(phase="TRIAL", candidate_version=4, trial_attempts=1, active_version=3)
    new, retry, _ = plan_boot(st, attempts=1)
    assert not retry and new.phase == "ROLLED_BACK" and new.bad == {4} and new.active_version == 3
    new, retry, _ = plan_boot(st, attempts=2)
    assert retry and new == st
    assert plan_rollback(st, "x").bad == {4}


def test_thermostat_takes_its_setpoint_from_config_and_refuses_a_broken_one(tmp_path: Path) -> None:
    from tests.conftest import EXAMPLES

    kit = Kit(tmp_path / "dev", bootstrap=str(EXAMPLES / "thermostat.wasm"))
    d = Daemon(kit.cfg, status_file=False)
    logs: list[str] = []
    d.resources.log_sink = lambda _app, _lvl, msg: logs.append(msg)
    ev = Events(d)
    d.start()
    try:
        d.config_updates.offer(kit.config(1, {"setpoint": "19.5", "hysteresis": "0.8"}, health=QUICK), "t")
        ev.wait("CONFIG_COMMITTED", 1, key="config_version")
        assert "thermostat: setpoint 19.5 C, hysteresis 0.8 C (config v1)" in logs
        d.config_updates.offer(kit.config(2, {"setpoint": "19.5", "hysteresis": "-1"}, health=QUICK), "t")
        rb = ev.wait("CONFIG_ROLLED_BACK", 2, key="config_version")
        assert "dr_init" in rb["reason_text"] and config_status(d)["version"] == 1
        assert d.scheduler.apps["app"].running
    finally:
        d.stop()


def test_a_config_rollout_document_never_moves_a_release() -> None:
    """A rollout key staging config v5 must not widen release sequence 5."""
    from devicerunner.trust import verify

    key = Ed25519PrivateKey.generate()
    now = 1_900_000_000
    release = manifest.manifest_from_envelope(
        manifest.parse_envelope(
            manifest.sign_envelope(
                manifest.manifest_signed(
                    app="app", version="1.0.5", sequence=5, module=b"\0asm\1\0\0\0", capabilities=[],
                    hardware=["rpi4"], issued=now, expires=now + 60, rollout_percent=0,
                ),
                [key],
            ),
            manifest.MAX_MANIFEST_BYTES,
            "m",
        )
    )  # fmt: skip
    doc = manifest.parse_rollout(
        manifest.sign_envelope(
            manifest.rollout_signed(
                app="app", channel="stable", sequence=5, percent=100, salt="s", paused=False,
                version=1, issued=now, expires=now + 60, kind="config",
            ),
            [key],
        )
    )  # fmt: skip
    assert doc.kind == "config"
    assert not verify.eligible("dev-1", release, doc)
    assert verify.eligible("dev-1", release, manifest.parse_rollout(
        manifest.sign_envelope(
            manifest.rollout_signed(
                app="app", channel="stable", sequence=5, percent=100, salt="s", paused=False,
                version=1, issued=now, expires=now + 60,
            ),
            [key],
        )
    ))  # fmt: skip


# -- the config host functions, on both call paths ----------------------------------

PROBE_WAT = """(module
  (import "config" "get" (func $get (param i32 i32 i32 i32) (result i32)))
  (import "config" "get_f64" (func $f64 (param i32 i32 i32) (result i32)))
  (import "config" "read" (func $read (param i32 i32) (result i32)))
  (import "kv" "set" (func $set (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "mode")
  (data (i32.const 8) "gain")
  (data (i32.const 16) "none")
  (data (i32.const 24) "r")
  (func $put (param $k i32) (param $v i32)  ;; kv["r" + k] = v (i32)
    (i32.store8 (i32.const 25) (local.get $k))
    (i32.store (i32.const 32) (local.get $v))
    (drop (call $set (i32.const 24) (i32.const 2) (i32.const 32) (i32.const 4))))
  (func (export "dr_init") (result i32)
    (call $put (i32.const 97) (call $get (i32.const 0) (i32.const 4) (i32.const 100) (i32.const 16)))
    (call $put (i32.const 98) (call $get (i32.const 0) (i32.const 4) (i32.const 100) (i32.const 2)))
    (call $put (i32.const 99) (call $f64 (i32.const 0) (i32.const 4) (i32.const 200)))
    (call $put (i32.const 100) (call $f64 (i32.const 8) (i32.const 4) (i32.const 200)))
    (call $put (i32.const 101) (call $get (i32.const 16) (i32.const 4) (i32.const 100) (i32.const 16)))
    (call $put (i32.const 102) (call $read (i32.const 300) (i32.const 256)))
    (call $put (i32.const 103) (call $f64 (i32.const 8) (i32.const 4) (i32.const -4)))
    (i32.const 0))
  (func (export "dr_tick") (result i32) (i32.const 0)))"""


def test_config_host_functions_answer_with_codes_never_traps(sandbox: Any) -> None:
    from devicerunner.device.apps import DeviceResources
    from firmware_shims.base import VirtualClock
    from hostfuncs import codes
    from hostfuncs.config import AppSettings
    from hostfuncs.kv import KvStore
    from tests.conftest import make_app

    settings = {"mode": "eco", "gain": "2.5"}
    res = DeviceResources(VirtualClock())
    res.configs["app"] = AppSettings(4, settings, b'{"gain":"2.5","mode":"eco"}')
    kv = KvStore(4096)
    make_app(sandbox, wat(PROBE_WAT), grant=frozenset({"config", "kv"}), res=res, kv=kv)

    def r(c: str) -> int:
        raw = kv.get(b"r" + c.encode())
        assert raw is not None
        return int(struct.unpack("<i", raw)[0])

    assert r("a") == 3  # "eco", without quotes
    assert r("b") == codes.ERR_BUF_TOO_SMALL
    assert r("c") == codes.ERR_INVALID  # "eco" is not a number
    assert r("d") == codes.OK  # "2.5" is
    assert r("e") == codes.ERR_NOT_FOUND
    assert r("f") == len(b'{"gain":"2.5","mode":"eco"}')
    assert r("g") == codes.ERR_BOUNDS
