"""Each simulator scenario, at small scale, as a user runs it: devicerunner sim."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.brokers import Mosquitto
from tests.conftest import run_cli


@pytest.mark.parametrize(
    "scenario",
    [
        "happy",
        "bad-release",
        "tampered",
        "broker-outage",
        "power-loss",
        "key-rotation",
        "flaky-network",
        "bad-config",
    ],
)
def test_scenario_passes_on_a_small_fleet(scenario: str, tmp_path: Path) -> None:
    # The flaky network runs at the demo's size (20) on the embedded broker: at 6
    # devices amqtt's stale wills and unsolicited retained floods went unnoticed.
    devices = "20" if scenario == "flaky-network" else "6"
    r = run_cli(
        "sim", "--devices", devices, "--scenario", scenario, "--report", str(tmp_path / "rep"), timeout=300
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["ok"] is True and summary["scenarios"][0]["name"] == scenario
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "Versions across the fleet" in page and "data:image/png;base64" in page
    if scenario == "flaky-network":  # a PUBACK lost on a stalled link is not a broker error
        assert "Traceback" not in r.stderr and "Timeout waiting for PUBACK" not in r.stderr, r.stderr[-3000:]
    # every rollout line says something ("rollout published: " used to end there)
    assert not re.search(r"rollout \w+: *$", r.stdout, re.M), r.stdout
    if scenario in ("bad-release", "bad-config"):
        assert set(summary["rollbacks_by_hardware"]) == {"stb-b"}
        assert "PAUSED" in r.stdout.upper()


def test_demo_scenarios_against_a_real_mosquitto(tmp_path: Path) -> None:
    b = Mosquitto(tmp_path / "mosq").start()
    try:
        r = run_cli("sim", "--devices", "9", "--broker", b.url, timeout=300)
    finally:
        b.stop()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "3/3 scenarios ok" in r.stdout
