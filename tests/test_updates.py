"""The update path on a real daemon with real files: commit, rollback, recovery.
Each test is named after the failure it covers."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devicerunner.device.daemon import Daemon
from devicerunner.update.slots import AppSlots
from devicerunner.update.updater import install_bundle
from tests.conftest import EXAMPLES, ROOT, until
from tests.devicekit import Events, Kit, counter_module
from tests.wasmgen import many_functions

BROKEN_INIT = (EXAMPLES / "broken-init.wat").read_text()
UNHEALTHY = (EXAMPLES / "unhealthy-after-50.wat").read_text()
SLOW = (EXAMPLES / "slow.wat").read_text()


def _wat(text: str) -> bytes:
    import wasmtime

    return bytes(wasmtime.wat2wasm(text))


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return Kit(tmp_path / "dev")


@pytest.fixture
def daemon(kit: Kit) -> Iterator[Daemon]:
    d = Daemon(kit.cfg)
    d.start()
    yield d
    d.stop()


def _state(kit: Kit):  # type: ignore[no-untyped-def]
    st, _ = AppSlots(kit.state_dir, "app").load()
    return st


def _kv_count(d: Daemon) -> int:
    raw = d.kv["app"].get(b"count")
    return int.from_bytes(raw or b"\0\0\0\0", "little")


def test_good_update_is_committed_without_a_missed_tick_and_keeps_kv_data(tmp_path: Path) -> None:
    # 50 ms ticks: a miss then means the swap held the scheduler, not machine load.
    kit = Kit(tmp_path / "dev", tick_interval_ms=50)
    daemon = Daemon(kit.cfg)
    daemon.start()
    try:
        _good_update(kit, daemon)
    finally:
        daemon.stop()


def _good_update(kit: Kit, daemon: Daemon) -> None:
    ev = Events(daemon)
    time.sleep(0.3)
    before = _kv_count(daemon)
    assert before > 0  # the bootstrap app has been counting
    install_bundle(kit.state_dir, kit.bundle(counter_module(1000), 1))
    ev.wait("COMMITTED", 1)
    st = _state(kit)
    assert (st.phase, st.active, st.active_sequence, st.highest_sequence) == ("COMMITTED", "a", 1, 1)
    assert AppSlots(kit.state_dir, "app").committed_sequence("a") == 1
    app = daemon.scheduler.apps["app"]
    assert app.spec.sequence == 1 and app.previous is None
    assert app.counters.missed == 0 and app.counters.traps == 0
    # The new version continued the old one's kv data: +1000 per tick on top of the
    # old count c0 (before <= c0 < 1000: the old version ticked for well under 50 s),
    # so after % 1000 == c0 >= before; a store started afresh would give after % 1000 == 0.
    after = _kv_count(daemon)
    assert after >= before + 1000 * 20
    assert after % 1000 >= before, (before, after)
    assert [e["phase"] for e in ev.items] == ["STAGED", "TRIAL", "COMMITTED"]


def test_broken_app_that_traps_in_init_is_rolled_back_and_never_retried(kit: Kit, daemon: Daemon) -> None:
    ev = Events(daemon)
    install_bundle(kit.state_dir, kit.bundle(_wat(BROKEN_INIT), 2, caps=["log"]))
    rb = ev.wait("ROLLED_BACK", 2)
    assert "dr_init" in rb["reason_text"] and "unreachable" in rb["reason_text"]
    st = _state(kit)
    assert st.phase == "ROLLED_BACK" and "2" in st.bad_sequences and st.active is None
    app = daemon.scheduler.apps["app"]
    assert app.spec.version == "local" and app.running  # the old app never stopped
    install_bundle(kit.state_dir, kit.bundle(_wat(BROKEN_INIT), 2, caps=["log"]))
    assert ev.wait("REJECTED", 2)["reason"] == "rollback"
    install_bundle(kit.state_dir, kit.bundle(counter_module(3), 3))  # a newer one is taken
    ev.wait("COMMITTED", 3)


def test_app_that_goes_unhealthy_after_50_ticks_during_the_trial_is_rolled_back(
    kit: Kit, daemon: Daemon
) -> None:
    ev = Events(daemon)
    install_bundle(kit.state_dir, kit.bundle(_wat(UNHEALTHY), 4, caps=["log"], trial_ticks=200))
    rb = ev.wait("ROLLED_BACK", 4)
    assert "dr_health" in rb["reason_text"]
    assert daemon.scheduler.apps["app"].spec.version == "local"
    assert _state(kit).bad_sequences["4"].startswith("dr_health")


def test_slow_app_that_overruns_its_tick_budget_is_rolled_back(kit: Kit, daemon: Daemon) -> None:
    ev = Events(daemon)
    install_bundle(kit.state_dir, kit.bundle(_wat(SLOW), 5, caps=["log"], tick_budget_ms=10))
    rb = ev.wait("ROLLED_BACK", 5)
    assert "overran" in rb["reason_text"]
    assert daemon.scheduler.apps["app"].spec.version == "local"


def test_unsigned_bundle_is_rejected_and_changes_nothing(kit: Kit, daemon: Daemon) -> None:
    ev = Events(daemon)
    outsider = Kit(kit.dir.parent / "outsider")
    before = (kit.state_dir / "apps" / "app" / "state.json").exists()
    install_bundle(kit.state_dir, outsider.bundle(counter_module(7), 9))
    rej = ev.wait("REJECTED", 9)
    assert rej["reason"] == "bad_signature"
    assert (kit.state_dir / "apps" / "app" / "state.json").exists() == before
    assert "9" not in _state(kit).bad_sequences  # a forgery cannot poison sequence 9


def test_stopped_daemon_takes_an_inbox_bundle_at_its_next_start(kit: Kit) -> None:
    install_bundle(kit.state_dir, kit.bundle(counter_module(5), 1))
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        ev.wait("COMMITTED", 1)
    finally:
        d.stop()
    assert not list((kit.state_dir / "inbox").glob("*.bundle"))


def test_corrupt_state_json_falls_back_to_the_committed_slot(kit: Kit) -> None:
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    install_bundle(kit.state_dir, kit.bundle(counter_module(2), 1))
    ev.wait("COMMITTED", 1)
    d.stop()
    state = kit.state_dir / "apps" / "app" / "state.json"
    for damage in (state.read_bytes()[:40], b"\x00\xff garbage", None):
        if damage is None:
            state.unlink()
        else:
            state.write_bytes(damage)
        d2 = Daemon(kit.cfg)
        d2.start()
        try:
            app = d2.scheduler.apps["app"]
            assert (app.spec.sequence, app.spec.version) == (1, "1.0.1")
        finally:
            d2.stop()
        st = _state(kit)
        assert st.active == "a" and st.active_sequence == 1 and "rebuilt" in (st.last_error or "")


def _run_daemon(kit: Kit, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "devicerunner.cli.main", "run", "--config", str(kit.config_path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _wait_phase_on_disk(kit: Kit, phase: str, timeout_s: float = 20) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if _state(kit).phase == phase:
            return
        time.sleep(0.02)
    raise AssertionError(f"phase {phase} not reached; state: {_state(kit)}")


def _live_status(kit: Kit, pid: int) -> dict:  # type: ignore[type-arg]
    try:
        status = json.loads((kit.state_dir / "status.json").read_bytes())
    except (OSError, ValueError):
        return {}
    return status["apps"]["app"] if status.get("pid") == pid else {}


def _on_trial(kit: Kit, p: subprocess.Popen[str]) -> bool:
    return bool(_live_status(kit, p.pid).get("trial"))


def _compilers_of(pid: int) -> list[int]:
    """The compiler child processes (devicerunner.sandbox.compiler) of process ``pid``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"devicerunner.sandbox.compiler" in cmd:
            found.append(int(d.name))
    return found


def _settle(kit: Kit) -> dict:  # type: ignore[type-arg]
    cmd = [sys.executable, "-m", "devicerunner.cli.main", "run", "--config", str(kit.config_path)]
    r = subprocess.run(
        [*cmd, "--once", "--for", "30", "--json"],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["apps"]["app"]  # type: ignore[no-any-return]


def _kill(p: subprocess.Popen[str]) -> None:
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=10)


def test_power_cut_during_a_trial_does_not_burn_a_good_release(kit: Kit) -> None:
    """With one trial attempt, one power cut during a trial rolled back (and
    burnt) a good release; the default tolerates one."""
    install_bundle(kit.state_dir, kit.bundle(counter_module(9), 1, trial_seconds=3))
    p = _run_daemon(kit)
    try:
        assert until(lambda: _on_trial(kit, p), timeout_s=30)
    finally:
        _kill(p)
    st = _state(kit)
    assert (st.phase, st.trial_attempts) == ("TRIAL", 1)
    status = _settle(kit)
    assert status["version"] == "1.0.1" and status["state"]["phase"] == "COMMITTED"
    assert status["state"]["bad_sequences"] == {}


def test_release_that_crashes_the_daemon_while_compiling_and_on_trial_runs_at_most_twice(kit: Kit) -> None:
    """The trial attempt is persisted before the candidate is compiled: a crash
    while compiling counts (it used to leave STAGED with 0 attempts, so a
    module that kills the daemon at compile time did so at every restart)."""
    install_bundle(kit.state_dir, kit.bundle(many_functions(20_000), 1, trial_seconds=60))
    p = _run_daemon(kit)
    try:  # crash 1: while the candidate compiles
        # TRIAL on disk and a compiler running: the candidate's (the bootstrap's came before)
        assert until(lambda: _state(kit).phase == "TRIAL" and bool(_compilers_of(p.pid)), timeout_s=30)
        compilers = _compilers_of(p.pid)
    finally:
        _kill(p)
    assert until(lambda: not any(Path(f"/proc/{c}").exists() for c in compilers))  # died with the daemon
    st = _state(kit)
    assert (st.phase, st.trial_attempts) == ("TRIAL", 1)
    p = _run_daemon(kit)
    try:  # crash 2: while it runs on trial
        assert until(lambda: _on_trial(kit, p), timeout_s=30)
    finally:
        _kill(p)
    assert _state(kit).trial_attempts == 2
    status = _settle(kit)  # no attempts left: rolled back without running it again
    assert status["version"] == "local" and status["state"]["phase"] == "ROLLED_BACK"
    assert status["state"]["last_reason"] == "trial_interrupted"
    assert "1" in status["state"]["bad_sequences"]


def test_compile_bomb_is_refused_in_a_bounded_child_and_the_daemon_keeps_running(tmp_path: Path) -> None:
    """A signed module of many trivial functions is cheap to ship and costly to
    compile (~5 KB of compiler memory each). Compiled in the daemon it took
    the daemon down; now its compiler hits compile_memory_bytes and the
    release is rolled back while the running app keeps ticking."""
    kit = Kit(tmp_path / "dev", device_extra="compile_memory_bytes = 209715200")  # 200 MiB
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        install_bundle(kit.state_dir, kit.bundle(many_functions(50_000), 1))  # 300 KB, ~300 MB to compile
        rolled = ev.wait("ROLLED_BACK", 1, timeout_s=60)
        assert "compile_memory_bytes" in rolled["reason_text"]
        app = d.scheduler.apps["app"]
        assert app.running and app.spec.version == "local"
        ticks = app.counters.ticks
        assert until(lambda: app.counters.ticks > ticks)
    finally:
        d.stop()
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grew_mb < 100, f"the daemon's peak RSS grew by {grew_mb:.0f} MB"
    assert not [e for e in ev.items if e["phase"] == "COMMITTED"]


def test_disk_full_while_staging_keeps_the_old_app_and_retries_later(tmp_path: Path, small_fs: Path) -> None:
    kit = Kit(small_fs / "dev")
    d = Daemon(kit.cfg)  # first boot provisions the root into the state dir
    d.start()
    d.stop()
    install_bundle(kit.state_dir, kit.bundle(counter_module(4, pad_bytes=300_000), 1))
    ballast = small_fs / "ballast"
    free = shutil.disk_usage(small_fs).free
    ballast.write_bytes(b"\0" * max(0, free - 64 * 1024))  # leave far less than the module needs
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        failed = ev.wait("FAILED", 1)
        assert failed["reason"] == "io_error" and "No space left" in failed["reason_text"]
        app = d.scheduler.apps["app"]
        assert app.running and app.spec.version == "local"
        t = app.counters.ticks
        time.sleep(0.1)
        assert app.counters.ticks > t  # the old app kept ticking
        assert list((kit.state_dir / "inbox").glob("*.bundle"))  # kept for the retry
        ballast.unlink()  # space comes back: the retry goes through
        ev.wait("COMMITTED", 1, timeout_s=30)
    finally:
        d.stop()
    assert _state(kit).active_sequence == 1


def test_device_offline_before_a_local_install_does_not_roll_it_back(tmp_path: Path) -> None:
    """The trial's broker rule counts only the outage *during* the trial: a device
    offline for longer than ``max_broker_loss_s`` before an install keeps it."""
    from tests.brokers import free_port

    kit = Kit(tmp_path / "dev", extra_config=f'\n[broker]\nurl = "mqtt://127.0.0.1:{free_port()}"\n')
    d = Daemon(kit.cfg)  # nothing listens on that port: offline from the start
    ev = Events(d)
    d.start()
    try:
        assert until(lambda: d.broker_lost_s() > 2.5, timeout_s=10)
        install_bundle(kit.state_dir, kit.bundle(counter_module(2), 1, trial_seconds=1, max_broker_loss_s=2))
        ev.wait("COMMITTED", 1, timeout_s=20)
    finally:
        d.stop()
    assert not [e for e in ev.items if e["phase"] == "ROLLED_BACK"]
    assert _state(kit).active_sequence == 1


@pytest.mark.parametrize(
    ("ask", "field"),
    [
        ({"memory_bytes": 3 * 1024**3}, "manifest.limits.memory_bytes"),
        ({"tick_budget_ms": 60_000}, "tick_budget_ms"),
    ],
)
def test_release_asking_for_more_than_the_device_policy_is_refused_whole(
    kit: Kit,
    daemon: Daemon,
    ask: dict,  # type: ignore[type-arg]
    field: str,
) -> None:
    """A 3 GiB memory limit on an app whose device.toml allows 16 MiB (2.1 GB RSS
    once committed), or a 60 s tick budget that stalls the other apps: the
    manifest asks, the device policy decides."""
    ev = Events(daemon)
    install_bundle(kit.state_dir, kit.bundle(counter_module(2), 1, **ask))
    rejected = ev.wait("REJECTED", 1)
    assert rejected["reason"] == "limit_above_policy" and field in rejected["reason_text"]
    app = daemon.scheduler.apps["app"]
    assert app.running and app.spec.version == "local"
    assert app.spec.limits.memory_bytes == 16 * 1024**2
    assert not [e for e in ev.items if e["phase"] in ("STAGED", "TRIAL", "COMMITTED")]
