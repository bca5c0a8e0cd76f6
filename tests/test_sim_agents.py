"""Simulator agents: devices in separate processes (as on separate hosts),
the scenario controller elsewhere, meeting only on the broker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.brokers import Mosquitto
from tests.conftest import ROOT, run_cli


def _agent(url: str, name: str, devices: int, workdir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "devicerunner.cli.main", "sim-agent", "--broker", url, "--name", name,
            "--devices", str(devices), "--workers", "1", "--workdir", str(workdir), "--wait", "120",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def test_two_agents_take_a_staged_rollout_driven_from_a_third_process(tmp_path: Path) -> None:
    b = Mosquitto(tmp_path / "mosq").start()
    agents = [_agent(b.url, name, 3, tmp_path / name) for name in ("host-a", "host-b")]
    try:
        r = run_cli("sim", "--agents", "2", "--broker", b.url, "--scenario", "happy", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "6 devices in 2 agents" in r.stdout, r.stdout
        assert "1/1 scenarios ok" in r.stdout, r.stdout
        for a in agents:  # the controller told them to stop when it was done
            out, _ = a.communicate(timeout=120)
            assert a.returncode == 0, out
            assert "3 devices running" in out and "stopped" in out, out
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
                a.communicate(timeout=30)
        b.stop()


def test_an_agent_without_a_simulation_says_so(tmp_path: Path) -> None:
    b = Mosquitto(tmp_path / "mosq").start()
    try:
        r = run_cli("sim-agent", "--broker", b.url, "--name", "lonely", "--devices", "1", "--wait", "1")
        assert r.returncode != 0
        assert "no simulation was set up" in r.stderr, r.stderr
    finally:
        b.stop()


def test_the_controller_needs_a_broker_to_meet_its_agents() -> None:
    r = run_cli("sim", "--agents", "2")
    assert r.returncode != 0 and "--agents needs --broker" in r.stderr, r.stderr
