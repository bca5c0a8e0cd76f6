"""Build real devices for update tests: keys, a root, a device.toml, signed
bundles, and a bounded wait on the daemon's own update events."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devicerunner.device import config
from devicerunner.device.daemon import Daemon
from devicerunner.trust import appconfig, bundle, manifest
from tests.conftest import wat

ALL = ["log", "clock", "sensors", "actuators", "kv", "telemetry", "wasi", "messages", "config"]

COUNTER_WAT = """(module
  (import "kv" "get" (func $get (param i32 i32 i32 i32) (result i32)))
  (import "kv" "set" (func $set (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "count")
  (global $n (mut i32) (i32.const 0))
  (func (export "dr_init") (result i32)
    (drop (call $get (i32.const 0) (i32.const 5) (i32.const 16) (i32.const 4)))
    (global.set $n (i32.load (i32.const 16)))
    (i32.const 0))
  (func (export "dr_tick") (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const %d)))
    (i32.store (i32.const 16) (global.get $n))
    (drop (call $set (i32.const 0) (i32.const 5) (i32.const 16) (i32.const 4)))
    (i32.const 0)))"""


def counter_module(step: int = 1, pad_bytes: int = 0) -> bytes:
    """A distinct, valid app per step: counts ticks into kv key 'count'.
    ``pad_bytes`` adds a custom section to make the module that much larger."""
    text = COUNTER_WAT % step
    if pad_bytes:
        text = text.replace("(memory", f'(@custom "pad" "{"x" * pad_bytes}") (memory', 1)
    return wat(text)


@dataclass
class Kit:
    dir: Path
    release_keys: list[Ed25519PrivateKey] = field(
        default_factory=lambda: [Ed25519PrivateKey.generate() for _ in range(2)]
    )
    root_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    config_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    hardware: str = "rpi4"
    device_id: str = "dev-1"
    bootstrap: str | None = None
    tick_interval_ms: int = 10
    extra_config: str = ""
    device_extra: str = ""
    """Lines added to the [device] table."""

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        now = int(time.time())
        signed = manifest.root_signed(
            version=1,
            issued=now - 60,
            expires=now + 86400 * 30,
            role_keys={
                "root": [self.root_key.public_key()],
                "release": [k.public_key() for k in self.release_keys],
                "config": [self.config_key.public_key()],
            },
            thresholds={"root": 1, "release": 2, "config": 1},
        )
        (self.dir / "root.json").write_bytes(manifest.sign_envelope(signed, [self.root_key]))
        boot = self.bootstrap or str(self.dir / "boot.wasm")
        if self.bootstrap is None:
            (self.dir / "boot.wasm").write_bytes(counter_module(1))
        self.config_path = self.dir / "device.toml"
        self.config_path.write_text(
            f"""
[device]
id = "{self.device_id}"
hardware = "{self.hardware}"
state_dir = "state"
trust_root = "root.json"
{self.device_extra}

[apps.app]
module = "{boot}"
policy = {ALL!r}
tick_interval_ms = {self.tick_interval_ms}
health_interval_ms = 50

[sensors.temp]
driver = "sim"

[actuators.fan]
driver = "sim"
""".replace("'", '"')
            + self.extra_config
        )
        self.cfg = config.load(self.config_path)

    @property
    def state_dir(self) -> Path:
        return self.cfg.state_dir

    def bundle(
        self,
        module: bytes,
        sequence: int,
        *,
        version: str | None = None,
        caps: list[str] | None = None,
        trial_ticks: int = 20,
        trial_seconds: int = 0,
        **kw: Any,
    ) -> bytes:
        now = int(time.time())
        signed = manifest.manifest_signed(
            app="app",
            version=version or f"1.0.{sequence}",
            sequence=sequence,
            module=module,
            capabilities=caps or ["kv", "log"],
            hardware=[self.hardware],
            issued=now - 10,
            expires=now + 86400,
            trial_ticks=trial_ticks,
            trial_seconds=trial_seconds,
            tick_interval_ms=self.tick_interval_ms,
            **kw,
        )
        return bundle.pack(manifest.sign_envelope(signed, self.release_keys), module)

    def config(
        self,
        version: int,
        settings: dict[str, Any],
        *,
        app: str = "app",
        hardware: str | None = None,
        signers: list[Ed25519PrivateKey] | None = None,
        **kw: Any,
    ) -> bytes:
        """A config document for this device's app, signed by the config key."""
        now = int(time.time())
        signed = appconfig.config_signed(
            app=app,
            version=version,
            settings=settings,
            hardware=[hardware or self.hardware],
            issued=now - 10,
            expires=now + 86400,
            **kw,
        )
        return manifest.sign_envelope(signed, [self.config_key] if signers is None else signers)


class Events:
    """Collects a daemon's update events; waits for one, bounded."""

    def __init__(self, daemon: Daemon) -> None:
        self.items: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        daemon.add_event_listener(self._add)

    def _add(self, ev: dict[str, Any]) -> None:
        with self._cond:
            self.items.append(ev)
            self._cond.notify_all()

    def wait(
        self, phase: str, sequence: int | None = None, timeout_s: float = 20.0, key: str = "sequence"
    ) -> dict[str, Any]:
        def match() -> dict[str, Any] | None:
            for ev in self.items:
                if ev["phase"] == phase and (sequence is None or ev.get(key) == sequence):
                    return ev
            return None

        with self._cond:
            ok = self._cond.wait_for(lambda: match() is not None, timeout_s)
        if not ok:
            raise AssertionError(
                f"no {phase} event for sequence {sequence} in {timeout_s}s; got {self.items}"
            )
        ev = match()
        assert ev is not None
        return ev
