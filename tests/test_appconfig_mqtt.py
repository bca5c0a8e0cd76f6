"""Signed app configuration over a real Mosquitto, with a real daemon process
killed (SIGKILL) in the middle of a config trial."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devicerunner.transport import operator, topics
from devicerunner.transport.settings import parse_url
from devicerunner.trust.manifest import Health
from devicerunner.update.config_updates import ConfigFiles
from tests.brokers import Mosquitto
from tests.conftest import ROOT, wat
from tests.devicekit import Kit
from tests.test_appconfig import CONFIGURED_WAT, QUICK

P = "dr/v1"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "mosquitto").start()
    yield b
    b.stop()


class Events:
    """The device's events as the broker carries them."""

    def __init__(self, url: str, device: str) -> None:
        self.items: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        s = parse_url(url)
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"ev-{time.time_ns()}")
        self.c.on_message = self._msg
        self.c.connect(s.host, s.port)
        self.c.subscribe(topics.events(P, device), 1)
        self.c.loop_start()

    def _msg(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.items.append(json.loads(msg.payload))
            self._cond.notify_all()

    def wait(self, phase: str, version: int, timeout_s: float = 30) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            return next(
                (e for e in self.items if e.get("phase") == phase and e.get("config_version") == version),
                None,
            )

        with self._cond:
            self._cond.wait_for(lambda: find() is not None, timeout_s)
        ev = find()
        assert ev is not None, f"no {phase} for config v{version}: {self.items}"
        return ev

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def publish_config(url: str, data: bytes) -> None:
    with operator.Session(parse_url(url)) as s:
        s.publish_many([(topics.config(P, "app", "stable"), data)], retain=True)


def test_sigkill_during_a_config_trial_rolls_it_back_at_restart_and_never_retries_it(
    tmp_path: Path, broker: Mosquitto
) -> None:
    boot = tmp_path / "configured.wasm"
    boot.write_bytes(wat(CONFIGURED_WAT))
    kit = Kit(
        tmp_path / "dev",
        bootstrap=str(boot),
        extra_config=f'\n[broker]\nurl = "{broker.url}"\nreconnect_min_s = 0.1\nreconnect_max_s = 1.0\n',
        device_extra="trial_attempts = 1",  # one crash uses the only attempt (the default 2 retries once)
    )
    cmd = [sys.executable, "-m", "devicerunner.cli.main", "run", "--config", str(kit.config_path)]
    events = Events(broker.url, "dev-1")
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        publish_config(broker.url, kit.config(1, {"limit": "3"}, health=QUICK))
        events.wait("CONFIG_COMMITTED", 1)
        slow = Health(trial_ticks=10, trial_seconds=60, max_traps=0, max_overruns=50, max_broker_loss_s=60)
        publish_config(broker.url, kit.config(2, {"limit": "4"}, health=slow))
        events.wait("CONFIG_TRIAL", 2)
    finally:
        p.send_signal(signal.SIGKILL)  # power cut in the middle of the trial
        p.wait(10)
    st = ConfigFiles(kit.state_dir, "app").load()
    assert (st.phase, st.active_version, st.candidate_version, st.trial_attempts) == ("TRIAL", 1, 2, 1)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        rb = events.wait("CONFIG_ROLLED_BACK", 2)
        assert rb["reason"] == "trial_interrupted"
        # v2 is still retained on the broker and comes with the subscription: refused
        publish_config(broker.url, kit.config(3, {"limit": "5"}, health=QUICK))
        events.wait("CONFIG_COMMITTED", 3)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(20)
        events.close()
    assert [e["phase"] for e in events.items if e.get("config_version") == 2].count("CONFIG_TRIAL") == 1
    st = ConfigFiles(kit.state_dir, "app").load()
    assert (st.active_version, sorted(st.bad)) == (3, [2])
    kept = sorted(f.name for f in (kit.state_dir / "apps" / "app" / "config").glob("v*.json"))
    assert kept == ["v3.json"]  # older documents removed after the commit
