"""The rollout role, its document, membership, the controller's decision, and
a device honouring a staged rollout over a real Mosquitto."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devicerunner.device.daemon import Daemon
from devicerunner.errors import BadSignatureError, ExpiredError, RollbackError
from devicerunner.fleet.rollout import Policy, decide
from devicerunner.transport import operator, topics
from devicerunner.transport.settings import parse_url
from devicerunner.trust import manifest
from devicerunner.trust import verify as trust
from tests.brokers import Mosquitto
from tests.conftest import run_cli, until
from tests.devicekit import Events, Kit, counter_module
from tests.trustsim import NOW, Repo

P = "dr/v1"


def doc(
    repo: Repo,
    *,
    version: int = 5,
    percent: int = 50,
    paused: bool = False,
    signers: list | None = None,  # type: ignore[type-arg]
    expires: int = NOW + 3600,
) -> bytes:
    signed = manifest.rollout_signed(
        app="thermo",
        channel="stable",
        sequence=5,
        percent=percent,
        salt="s",
        paused=paused,
        version=version,
        issued=NOW - 10,
        expires=expires,
    )
    return manifest.sign_envelope(signed, signers if signers is not None else repo.rollout_keys)


def test_rollout_document_signed_by_a_release_key_is_refused() -> None:
    repo = Repo()
    with pytest.raises(BadSignatureError):
        trust.verify_rollout(
            doc(repo, signers=repo.release_keys), root=repo.root(), time_floor=0, now=NOW, last_version=0
        )
    assert (
        trust.verify_rollout(doc(repo), root=repo.root(), time_floor=0, now=NOW, last_version=0).percent == 50
    )


def test_replayed_older_rollout_document_cannot_undo_a_pause() -> None:
    repo = Repo()
    with pytest.raises(RollbackError):
        trust.verify_rollout(doc(repo, version=4), root=repo.root(), time_floor=0, now=NOW, last_version=5)


def test_expired_rollout_document_is_refused() -> None:
    repo = Repo()
    with pytest.raises(ExpiredError):
        trust.verify_rollout(
            doc(repo, expires=NOW - 1), root=repo.root(), time_floor=0, now=NOW, last_version=0
        )


def test_rollout_document_under_an_expired_root_is_refused() -> None:
    # verify_release refused an expired root; verify_rollout did not look at it.
    repo = Repo()
    root = trust.load_trusted_root(repo.root_bytes(expires=NOW - 1))
    with pytest.raises(ExpiredError, match="trust root"):
        trust.verify_rollout(doc(repo), root=root, time_floor=0, now=NOW, last_version=0)


def test_raising_the_percent_only_adds_devices() -> None:
    ids = [f"dev-{i}" for i in range(2000)]
    prev: set[str] = set()
    for pct in (0, 1, 5, 25, 50, 100):
        cur = {d for d in ids if trust.in_rollout(d, "salt-x", pct)}
        assert prev <= cur
        assert abs(len(cur) - 20 * pct) <= max(40, 20 * pct * 0.25)  # roughly pct% of 2000
        prev = cur


def test_paused_document_overrides_the_manifest_default() -> None:
    repo = Repo()
    m = trust.verify_release(
        repo.release(rollout_percent=100),
        root=repo.root(),
        device=trust.DeviceIdentity("d", "rpi4", {"thermo": frozenset({"log", "sensors"})}),
        history={},
        time_floor=0,
        now=NOW,
    )
    paused = manifest.parse_rollout(doc(repo, paused=True, percent=100))
    assert trust.eligible("d", m, None)
    assert not trust.eligible("d", m, paused)


def test_controller_pauses_only_past_the_threshold_with_enough_devices() -> None:
    pol = Policy((1, 100), 10, abort_failure_pct=20, min_devices=5, device_timeout_s=10)
    assert decide(included=4, failed=4, policy=pol) == "continue"  # too few to judge
    assert decide(included=10, failed=2, policy=pol) == "continue"  # 20% is not above 20%
    assert decide(included=10, failed=3, policy=pol) == "abort"


def _kit_with_rollout_key(tmp_path: Path, url: str) -> tuple[Kit, Ed25519PrivateKey]:
    """A device whose root lists a rollout key."""
    rollout_key = Ed25519PrivateKey.generate()
    kit = Kit(tmp_path / "dev", extra_config=f'\n[broker]\nurl = "{url}"\n')
    now = int(time.time())
    signed = manifest.root_signed(
        version=1,
        issued=now - 60,
        expires=now + 86400,
        role_keys={
            "root": [kit.root_key.public_key()],
            "release": [k.public_key() for k in kit.release_keys],
            "rollout": [rollout_key.public_key()],
        },
        thresholds={"root": 1, "release": 2, "rollout": 1},
    )
    (kit.dir / "root.json").write_bytes(manifest.sign_envelope(signed, [kit.root_key]))
    return kit, rollout_key


def _publish_rollout(url: str, key: Ed25519PrivateKey, version: int, percent: int, paused: bool) -> None:
    now = int(time.time())
    r = manifest.rollout_signed(
        app="app",
        channel="stable",
        sequence=1,
        percent=percent,
        salt="app-1",
        paused=paused,
        version=version,
        issued=now,
        expires=now + 3600,
    )
    with operator.Session(parse_url(url)) as sess:
        sess.publish_many(
            [(topics.rollout(P, "app", "stable"), manifest.sign_envelope(r, [key]))], retain=True
        )


def test_device_waits_for_the_rollout_document_before_taking_a_staged_release(tmp_path: Path) -> None:
    b = Mosquitto(tmp_path / "mosq").start()
    kit, rollout_key = _kit_with_rollout_key(tmp_path, b.url)
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    s = parse_url(b.url)
    try:
        assert d.channel.wait_connected(10)
        operator.publish_bundle(s, kit.bundle(counter_module(4), 1, rollout_percent=0), P)
        # First the positive signal: the device has seen the release and decided it
        # is not in its rollout yet; only then does "nothing happened" mean anything.
        assert until(lambda: "app" in d.rollouts.waiting)
        assert not [e for e in ev.items if e.get("sequence") == 1]  # 0%: nothing happens
        _publish_rollout(b.url, rollout_key, version=1, percent=100, paused=False)
        ev.wait("COMMITTED", 1)
    finally:
        d.stop()
        b.stop()


def test_replayed_older_rollout_document_after_a_reboot_cannot_undo_a_pause(tmp_path: Path) -> None:
    """The replay floor survives a reboot: an attacker who puts back an older
    (genuinely signed, unpaused) document while the device restarts gains nothing."""
    b = Mosquitto(tmp_path / "mosq").start()
    kit, rollout_key = _kit_with_rollout_key(tmp_path, b.url)
    try:
        d = Daemon(kit.cfg)
        d.start()
        try:
            assert d.channel.wait_connected(10)
            operator.publish_bundle(parse_url(b.url), kit.bundle(counter_module(4), 1, rollout_percent=0), P)
            _publish_rollout(b.url, rollout_key, version=2, percent=100, paused=True)
            assert until(lambda: getattr(d.rollouts.documents.get("app"), "version", 0) == 2)
        finally:
            d.stop()
        _publish_rollout(b.url, rollout_key, version=1, percent=100, paused=False)  # the replay
        d2 = Daemon(kit.cfg)
        ev = Events(d2)
        d2.start()
        try:
            assert d2.channel.wait_connected(10)
            # Positive signals first: the release was seen and parked (paused), and the
            # replayed (retained) document arrived and was decided as stale. A sleep
            # here passed whenever the document was slower than the sleep.
            assert until(lambda: "app" in d2.rollouts.waiting)
            assert until(lambda: d2.rollouts.counts["stale"] >= 1)
            assert not [e for e in ev.items if e.get("sequence") == 1], ev.items  # still paused
            assert d2.rollouts.documents["app"].version == 2 and d2.rollouts.documents["app"].paused
        finally:
            d2.stop()
    finally:
        b.stop()


def test_rollout_cli_refuses_a_bundle_that_would_bypass_the_first_step(tmp_path: Path) -> None:
    kit = Kit(tmp_path / "dev")
    (tmp_path / "b.bundle").write_bytes(kit.bundle(counter_module(1), 1, rollout_percent=100))
    r = run_cli("keygen", "ro", "--dir", str(tmp_path))
    assert r.returncode == 0
    r = run_cli(
        "rollout",
        str(tmp_path / "b.bundle"),
        "--broker",
        "mqtt://127.0.0.1:1",
        "--steps",
        "1,100",
        "--key",
        str(tmp_path / "ro.key"),
    )
    assert r.returncode == 1 and "--rollout-percent 0" in r.stderr and "Traceback" not in r.stderr


def test_rollout_document_field_is_strict() -> None:
    repo = Repo()
    env = json.loads(doc(repo))
    env["signed"]["percent"] = 101
    with pytest.raises(Exception, match="percent"):
        manifest.parse_rollout(manifest.sign_envelope(env["signed"], repo.rollout_keys))
