"""Operators can trust what the tools say: rollouts that cannot report success
when nothing happened, and fleet views no device message can break. Real
Mosquitto, real daemons, the CLI as an operator runs it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devicerunner.device.daemon import Daemon
from devicerunner.fleet.rollout import Policy, RolloutController
from devicerunner.transport import operator, reports, topics
from devicerunner.transport.settings import parse_url
from sim.fleet import Watcher
from tests.brokers import Mosquitto
from tests.conftest import run_cli, until
from tests.devicekit import Events, Kit, counter_module

P = "dr/v1"

HOSTILE_STATUSES: dict[str, bytes] = {
    "apps-is-a-string": json.dumps({"hardware": "rpi4", "online": True, "apps": "x"}).encode(),
    "hardware-is-a-number": json.dumps({"hardware": 5, "online": True, "apps": {}}).encode(),
    "not-utf8": b"\xff\x00 not json {",
    "not-json": b"{'single': 'quotes'}",
    "huge": json.dumps({"hardware": "rpi4", "apps": {}, "pad": "x" * 300_000}).encode(),
    "deeply-nested": b"[" * 30_000 + b"]" * 30_000,  # under the size limit: json's recursion
    "app-is-a-list": json.dumps({"hardware": "rpi4", "apps": {"app": [1, 2]}}).encode(),
    "sequence-is-text": json.dumps({"hardware": "rpi4", "apps": {"app": {"sequence": "7"}}}).encode(),
    "claims-another-id": json.dumps({"device": "dev-1", "hardware": "rpi4", "apps": {}}).encode(),
}
HOSTILE_EVENTS: list[bytes] = [
    b"[]",
    b"not json",
    json.dumps({"app": "app", "phase": "COMMITTED", "sequence": "1"}).encode(),
    json.dumps({"app": {"x": 1}, "phase": "REJECTED"}).encode(),
    json.dumps({"app": "app", "phase": "COMMITTED", "sequence": 1, "ts": "yesterday"}).encode(),
]


def _write_key(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return key


def _publish_hostile(url: str, events: bool = True) -> None:
    with operator.Session(parse_url(url)) as sess:
        sess.publish_many(
            [(topics.status(P, f"bad-{name}"), payload) for name, payload in HOSTILE_STATUSES.items()],
            retain=True,
        )
        if events:
            sess.publish_many([(topics.events(P, "bad-events"), p) for p in HOSTILE_EVENTS], retain=False)


def _good_status(device: str, *, online: bool, sequence: int = 0) -> bytes:
    return json.dumps(
        {
            "device": device,
            "hardware": "rpi4",
            "online": online,
            "ts": time.time(),
            "apps": {"app": {"version": "1.0.0", "sequence": sequence, "phase": "COMMITTED"}},
        }
    ).encode()


@pytest.fixture
def mosq(tmp_path: Path):  # type: ignore[no-untyped-def]
    b = Mosquitto(tmp_path / "mosq").start()
    yield b
    b.stop()


# -- 2. hostile device messages ------------------------------------------------------


def test_status_validator_names_the_bad_field_and_never_raises_anything_else() -> None:
    for name, payload in HOSTILE_STATUSES.items():
        with pytest.raises(reports.MalformedReport) as e:
            reports.read_status(f"bad-{name}", payload)
        assert f"bad-{name}" in str(e.value)
    for payload in HOSTILE_EVENTS:
        with pytest.raises(reports.MalformedReport):
            reports.read_event("d", payload)
    will = reports.read_status("d", json.dumps({"device": "d", "hardware": "rpi4", "online": False}).encode())
    assert will.apps == {} and not will.online


def test_hostile_device_statuses_do_not_crash_fleet_status(mosq: Mosquitto) -> None:
    """A device may write its own retained status (the documented ACL): one
    writing `"apps": "x"`, `"hardware": 5`, non-JSON or 300 KB of it is skipped
    with one warning naming it; the fleet listing goes on."""
    _publish_hostile(mosq.url, events=False)
    with operator.Session(parse_url(mosq.url)) as sess:
        sess.publish_many([(topics.status(P, "good-1"), _good_status("good-1", online=True))], retain=True)
    for extra in ([], ["--json"]):
        r = run_cli("fleet", "status", "--broker", mosq.url, *extra, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr and "Error" not in r.stderr
        assert "good-1" in r.stdout
        for name in HOSTILE_STATUSES:
            assert r.stderr.count(f"device bad-{name}") == 1, (name, r.stderr)
            assert f"bad-{name}" not in r.stdout
        if extra:
            doc = json.loads(r.stdout)
            assert doc["devices"]["good-1"]["apps"]["app"]["version"] == "1.0.0"
            assert doc["summary"]["devices"] == 1  # the hostile ones are not counted


def test_a_device_repeating_its_status_cannot_stall_fleet_status(mosq: Mosquitto) -> None:
    """The listing ends after a quiet spell without a *new* device, however often
    one device republishes its own status."""
    s = parse_url(mosq.url)
    stop = time.monotonic() + 8
    with operator.Session(s) as flooder:
        flooder.publish_many([(topics.status(P, "chatty"), _good_status("chatty", online=True))], retain=True)
        t0 = time.monotonic()
        import threading

        def flood() -> None:
            while time.monotonic() < stop:
                flooder.client.publish(topics.status(P, "chatty"), _good_status("chatty", online=True), qos=0)
                time.sleep(0.02)

        th = threading.Thread(target=flood)
        th.start()
        try:
            fleet = operator.fleet_status(s, P, quiet_s=0.5)
            took = time.monotonic() - t0
        finally:
            th.join()
    assert "chatty" in fleet and took < 4, took


def test_hostile_device_messages_do_not_stop_a_rollout(tmp_path: Path, mosq: Mosquitto) -> None:
    """The same statuses (and malformed events) used to kill paho's thread inside
    `rollout`, which then failed with "broker did not acknowledge a publish"."""
    _publish_hostile(mosq.url)
    kit, rollout_key = _kit_with_rollout_key(tmp_path, mosq.url)
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        assert d.channel.wait_connected(10)
        seen: list[dict] = []  # type: ignore[type-arg]
        ctl = RolloutController(
            parse_url(mosq.url),
            P,
            kit.bundle(counter_module(3), 1, rollout_percent=0),
            rollout_key,
            Policy((100,), step_wait_s=30, abort_failure_pct=10, min_devices=1, device_timeout_s=30),
            seen.append,
        )
        _publish_hostile(mosq.url)  # again, while the controller listens
        result = ctl.run(discover_s=1.0)
        ev.wait("COMMITTED", 1)
    finally:
        d.stop()
    assert result["result"] == "completed", result
    assert result["eligible"] == result["committed"] == 1
    assert ctl.reader.malformed >= len(HOSTILE_STATUSES)


def test_hostile_device_messages_do_not_crash_the_simulators_watcher(mosq: Mosquitto) -> None:
    with Watcher(parse_url(mosq.url), P) as w:
        _publish_hostile(mosq.url)
        with operator.Session(parse_url(mosq.url)) as sess:
            sess.publish_many(
                [(topics.status(P, "good-1"), _good_status("good-1", online=True))], retain=True
            )
            sess.publish_many(
                [
                    (
                        topics.events(P, "good-1"),
                        json.dumps({"app": "app", "phase": "COMMITTED", "sequence": 1}).encode(),
                    )
                ],
                retain=False,
            )
        assert until(lambda: bool(w.events) and "good-1" in w.status)
        w.sample()
        assert set(w.status) == {"good-1"}
        assert [e["device"] for e in w.events] == ["good-1"]
        assert w.timeline[-1]["online"] == 1


# -- 1. rollouts that cannot lie ------------------------------------------------------


def _kit_with_rollout_key(tmp_path: Path, url: str) -> tuple[Kit, Ed25519PrivateKey]:
    from tests.test_rollout import _kit_with_rollout_key as make

    return make(tmp_path, url)


def test_rollout_refused_by_the_broker_acl_is_an_error_naming_the_topic(tmp_path: Path) -> None:
    """Mosquitto acknowledges a publish its ACL denies and drops it: `rollout`
    used to print "published" and "completed". It reads the release back."""
    acl = tmp_path / "acl"
    acl.write_text(f"topic read {P}/#\ntopic write {P}/rollouts/#\n")
    b = Mosquitto(tmp_path / "mosq", extra=f"acl_file {acl}\n").start()
    try:
        kit = Kit(tmp_path / "dev")
        (tmp_path / "b.bundle").write_bytes(kit.bundle(counter_module(2), 1, rollout_percent=0))
        _write_key(tmp_path / "ro.key")
        r = run_cli(
            "rollout",
            str(tmp_path / "b.bundle"),
            "--broker",
            b.url,
            "--steps",
            "100",
            "--key",
            str(tmp_path / "ro.key"),
            timeout=60,
        )
    finally:
        b.stop()
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{P}/artifacts/" in r.stderr and "ACL" in r.stderr, r.stderr
    assert "published" not in r.stdout and "completed" not in r.stdout


def test_rollout_pauses_when_devices_refuse_its_document(tmp_path: Path, mosq: Mosquitto) -> None:
    """The rollout key is not in the device's root: the device reports the refused
    document as an event with its reason, and the controller pauses on it
    instead of showing "updated 0" until --step-wait runs out."""
    kit = Kit(tmp_path / "dev", extra_config=f'\n[broker]\nurl = "{mosq.url}"\n')  # no rollout key
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    seen: list[dict] = []  # type: ignore[type-arg]
    try:
        assert d.channel.wait_connected(10)
        time.sleep(0.5)  # its first status is retained by now
        ctl = RolloutController(
            parse_url(mosq.url),
            P,
            kit.bundle(counter_module(3), 1, rollout_percent=0),
            Ed25519PrivateKey.generate(),
            Policy((100,), step_wait_s=60, abort_failure_pct=10, min_devices=1, device_timeout_s=60),
            seen.append,
        )
        t0 = time.monotonic()
        result = ctl.run(discover_s=1.0)
        took = time.monotonic() - t0
    finally:
        d.stop()
    refused = [e for e in ev.items if e.get("document") == "rollout"]
    assert refused and refused[0]["phase"] == "REJECTED" and refused[0]["reason"]
    assert result["result"] == "paused" and took < 30, (result, took)
    assert "refused the rollout document" in result["reason"]
    assert result["failed"] == result["eligible"] == 1
    assert "rollout document refused" in next(iter(result["failed_by"]))


def test_offline_device_is_timed_out_not_updated_and_the_rollout_is_not_completed(
    tmp_path: Path, mosq: Mosquitto
) -> None:
    """An offline device that never answers: the step pauses with the reason once
    --device-timeout passes, the counts add up, exit non-zero; --json events
    carry timestamps and come only on change."""
    kit = Kit(tmp_path / "dev")
    (tmp_path / "b.bundle").write_bytes(kit.bundle(counter_module(2), 1, rollout_percent=0))
    _write_key(tmp_path / "ro.key")
    with operator.Session(parse_url(mosq.url)) as sess:
        sess.publish_many([(topics.status(P, "asleep"), _good_status("asleep", online=False))], retain=True)
    r = run_cli(
        "rollout",
        str(tmp_path / "b.bundle"),
        "--broker",
        mosq.url,
        "--steps",
        "100",
        "--device-timeout",
        "2",
        "--step-wait",
        "30",
        "--key",
        str(tmp_path / "ro.key"),
        "--json",
        timeout=60,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert all(isinstance(e["ts"], float) for e in events)
    progress = [e for e in events if e["event"] == "progress"]
    keys = ("step", "eligible", "pending", "committed", "failed", "timed_out")
    assert len({tuple(e[k] for k in keys) for e in progress}) == len(progress)  # on change only
    last = events[-1]
    assert last["event"] == "paused" and "no eligible device took the release" in last["reason"]
    assert "1 offline" in last["reason"]
    assert last["eligible"] == 1 and last["timed_out"] == 1 and last["committed"] == 0
    for e in [*progress, last]:
        assert e["eligible"] == e["pending"] + e["committed"] + e["failed"] + e["timed_out"]
    assert "updated" not in last and not [e for e in events if e["event"] == "completed"]


def test_rollout_with_no_device_is_not_reported_completed(tmp_path: Path, mosq: Mosquitto) -> None:
    kit = Kit(tmp_path / "dev")
    (tmp_path / "b.bundle").write_bytes(kit.bundle(counter_module(2), 1, rollout_percent=0))
    _write_key(tmp_path / "ro.key")
    r = run_cli(
        "rollout",
        str(tmp_path / "b.bundle"),
        "--broker",
        mosq.url,
        "--steps",
        "100",
        "--step-wait",
        "1",
        "--key",
        str(tmp_path / "ro.key"),
        timeout=60,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "INCOMPLETE" in r.stdout and "completed" not in r.stdout


def test_resumed_rollout_counts_a_device_that_already_rolled_back_this_release_as_failed(
    tmp_path: Path, mosq: Mosquitto
) -> None:
    """Resuming after Ctrl-C: a device that rolled this sequence back in the first
    run never takes it again; it used to stay pending until --device-timeout."""
    kit = Kit(tmp_path / "dev")
    rolled = {
        "device": "dev-9",
        "hardware": "rpi4",
        "online": True,
        "apps": {
            "app": {
                "version": "1.0.0",
                "sequence": 0,
                "phase": "ROLLED_BACK",
                "last_error": "trial failed: dr_health reported unhealthy",
                "last_reason": "trial_failed",
                "last_error_sequence": 1,
            }
        },
    }
    with operator.Session(parse_url(mosq.url)) as sess:
        sess.publish_many([(topics.status(P, "dev-9"), json.dumps(rolled).encode())], retain=True)
    seen: list[dict] = []  # type: ignore[type-arg]
    ctl = RolloutController(
        parse_url(mosq.url),
        P,
        kit.bundle(counter_module(3), 1, rollout_percent=0),
        Ed25519PrivateKey.generate(),
        Policy((100,), step_wait_s=60, abort_failure_pct=10, min_devices=1, device_timeout_s=60),
        seen.append,
    )
    t0 = time.monotonic()
    result = ctl.run(discover_s=0.5)
    assert result["result"] == "paused" and time.monotonic() - t0 < 20, result
    assert result["failed"] == result["eligible"] == 1 and result["pending"] == 0
    assert list(result["failed_by"]) == ["rpi4: trial_failed"]


def test_rollout_of_a_release_an_operator_published_needs_no_write_access_to_releases(
    tmp_path: Path,
) -> None:
    """The rollout controller's identity may only move rollouts: a release an
    operator already published (read back, identical) is not published again."""
    kit = Kit(tmp_path / "dev")
    data = kit.bundle(counter_module(2), 1, rollout_percent=0)
    (tmp_path / "b.bundle").write_bytes(data)
    _write_key(tmp_path / "ro.key")
    seed = Mosquitto(tmp_path / "mosq").start()  # as the operator, with write access
    try:
        operator.publish_bundle(parse_url(seed.url), data, P)
    finally:
        seed.stop()  # persistence keeps the retained release and chunks
    acl = tmp_path / "acl"
    acl.write_text(f"topic read {P}/#\ntopic write {P}/rollouts/#\n")
    b = Mosquitto(tmp_path / "mosq", extra=f"acl_file {acl}\n").start()
    try:
        r = run_cli(
            "rollout",
            str(tmp_path / "b.bundle"),
            "--broker",
            b.url,
            "--steps",
            "100",
            "--step-wait",
            "1",
            "--key",
            str(tmp_path / "ro.key"),
            timeout=60,
        )
    finally:
        b.stop()
    assert "found app 1.0.1 (sequence 1; release and chunks read back" in r.stdout, r.stdout + r.stderr
    assert "NotStoredError" not in r.stderr and "INCOMPLETE" in r.stdout  # no device: not "completed"


def test_config_rollout_pauses_when_devices_refuse_its_document(tmp_path: Path, mosq: Mosquitto) -> None:
    """The same for a signed config: the device reports the refused config rollout
    document (CONFIG_REJECTED, document=rollout) and the controller pauses on it."""
    from tests.conftest import wat
    from tests.test_appconfig import CONFIGURED_WAT, QUICK

    boot = tmp_path / "configured.wasm"
    boot.write_bytes(wat(CONFIGURED_WAT))
    kit = Kit(tmp_path / "dev", bootstrap=str(boot), extra_config=f'\n[broker]\nurl = "{mosq.url}"\n')
    d = Daemon(kit.cfg, status_file=False)
    ev = Events(d)
    d.start()
    seen: list[dict] = []  # type: ignore[type-arg]
    try:
        assert d.channel.wait_connected(10)
        time.sleep(0.5)  # its first status is retained by now
        ctl = RolloutController(
            parse_url(mosq.url),
            P,
            kit.config(1, {"gain": "2"}, health=QUICK, rollout_percent=0),
            Ed25519PrivateKey.generate(),  # not in the device's root
            Policy((100,), step_wait_s=60, abort_failure_pct=10, min_devices=1, device_timeout_s=60),
            seen.append,
        )
        t0 = time.monotonic()
        result = ctl.run(discover_s=1.0)
        took = time.monotonic() - t0
    finally:
        d.stop()
    refused = [e for e in ev.items if e.get("document") == "rollout"]
    assert refused and refused[0]["phase"] == "CONFIG_REJECTED", ev.items
    assert result["result"] == "paused" and took < 30, (result, took)
    assert "refused the rollout document" in result["reason"]


def test_a_last_will_does_not_erase_what_the_watcher_knows_about_a_devices_apps(mosq: Mosquitto) -> None:
    """On a flaky link a device is offline for a moment after every reset: its last
    will ({"online": false}) replaced its status, so the simulator counted a device
    that had committed as not on the release (flaky-network: 9 to 12 of 20)."""
    with Watcher(parse_url(mosq.url), P) as w:
        with operator.Session(parse_url(mosq.url)) as sess:
            sess.publish_many(
                [(topics.status(P, "dev-1"), _good_status("dev-1", online=True, sequence=4))], retain=True
            )
            assert until(lambda: w.app_of("dev-1").get("sequence") == 4)
            will = json.dumps({"device": "dev-1", "hardware": "rpi4", "online": False}).encode()
            sess.publish_many([(topics.status(P, "dev-1"), will)], retain=True)
        assert until(lambda: w.count(lambda _d, st: not st.get("online")) == 1)
        assert w.app_of("dev-1").get("sequence") == 4


# -- fleet status at fleet size (issue #19) ---------------------------------------------


def test_fleet_status_of_a_large_fleet_is_a_summary_and_lists_devices_on_request(mosq: Mosquitto) -> None:
    """Past 20 devices the default is counts by app/version/phase and hardware,
    not thousands of rows; --devices lists them all."""
    n = 30
    items = [
        (topics.status(P, f"d{i:03d}"), _good_status(f"d{i:03d}", online=i % 3 != 0, sequence=i % 2))
        for i in range(n)
    ]
    with operator.Session(parse_url(mosq.url)) as sess:
        sess.publish_many(items, retain=True)
    r = run_cli("fleet", "status", "--broker", mosq.url, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"{n} device(s): 20 online, 10 offline" in r.stdout, r.stdout
    assert "hardware: rpi4 30" in r.stdout
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("app ")]
    assert sorted(rows) == [
        ["app", "1.0.0", "0", "COMMITTED", "15"],
        ["app", "1.0.0", "1", "COMMITTED", "15"],
    ]
    assert "d007" not in r.stdout and "--devices lists each of the 30 devices" in r.stdout
    listed = run_cli("fleet", "status", "--broker", mosq.url, "--devices", timeout=60)
    assert all(f"d{i:03d}" in listed.stdout for i in range(n)), listed.stdout
    doc = json.loads(run_cli("fleet", "status", "--broker", mosq.url, "--json", timeout=60).stdout)
    assert doc["summary"]["devices"] == n and "devices" not in doc
