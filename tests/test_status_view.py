"""`devicerunner status` and the device's MQTT status add up: the active release
and the candidate are shown apart, and the last error says which release it is
about and what to publish next."""

from __future__ import annotations

import json
from pathlib import Path

from devicerunner.device.daemon import Daemon
from devicerunner.transport import reports
from devicerunner.update.decisions import plan_boot, plan_rollback
from devicerunner.update.slots import AppSlots
from devicerunner.update.state import AppState
from tests.conftest import run_cli
from tests.devicekit import Kit

TRIAL = AppState(
    active="a",
    active_sequence=1,
    active_version="1.0.0",
    pending="b",
    pending_sequence=2,
    pending_version="1.1.0",
    phase="TRIAL",
    trial_attempts=1,
    highest_sequence=1,
)


def test_status_during_a_trial_does_not_mix_the_new_version_with_the_old_sequence(tmp_path: Path) -> None:
    """It showed `1.1.0 (sequence 0, slot -), phase TRIAL`: new version, old sequence and slot."""
    kit = Kit(tmp_path / "dev")
    AppSlots(kit.state_dir, "app").save(TRIAL)
    r = run_cli("status", "--config", str(kit.config_path))
    assert r.returncode == 0, r.stderr
    assert "app: 1.0.0 (sequence 1, slot a), phase TRIAL" in r.stdout, r.stdout
    assert "candidate: 1.1.0 (sequence 2, slot b), TRIAL" in r.stdout, r.stdout


def test_mqtt_status_during_a_trial_reports_the_active_release_and_the_candidate(tmp_path: Path) -> None:
    kit = Kit(tmp_path / "dev", extra_config='\n[broker]\nurl = "mqtt://127.0.0.1:1"\n')
    AppSlots(kit.state_dir, "app").save(TRIAL)
    d = Daemon(kit.cfg)  # not started: the status is built from the state on disk
    try:
        st = reports.read_status(kit.device_id, d.channel._status_payload(True))
    finally:
        d.stop()
    app = st.apps["app"]
    assert (app.version, app.sequence) == ("1.0.0", 1)
    assert (app.pending_version, app.pending_sequence) == ("1.1.0", 2)


def test_last_error_names_its_sequence_and_says_to_publish_a_higher_one(tmp_path: Path) -> None:
    """A rolled-back sequence can never be taken again: the status says so and
    which sequence the fix needs, instead of a bare error."""
    rolled = plan_rollback(TRIAL, 2, "trial failed: dr_health reported unhealthy")
    assert rolled.last_error_sequence == 2
    assert plan_boot(TRIAL, attempts=1).state.last_error_sequence == 2  # a crash during the trial
    kit = Kit(tmp_path / "dev")
    AppSlots(kit.state_dir, "app").save(rolled)
    r = run_cli("status", "--config", str(kit.config_path))
    assert "last error (sequence 2): trial failed" in r.stdout, r.stdout
    assert (
        "sequence 2 can no longer be taken on this device: publish the fix with a sequence above 2"
        in r.stdout
    )
    j = json.loads(run_cli("status", "--config", str(kit.config_path), "--json").stdout)
    assert j["apps"]["app"]["state"]["last_error_sequence"] == 2
    assert j["apps"]["app"]["error"] == {
        "text": rolled.last_error,
        "reason": "trial_failed",
        "sequence": 2,
        "retry_above": 2,
    }
