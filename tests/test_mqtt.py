"""Updates over a real Mosquitto (started here on a free loopback port): end to
end, tampering, broker restarts, power cuts mid-download, bursts, TLS, ACLs,
and the embedded broker."""

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

from devicerunner.device.daemon import Daemon
from devicerunner.transport import operator, reports, topics
from devicerunner.transport.guard import raw_socket
from devicerunner.transport.settings import parse_url
from devicerunner.trust import bundle, manifest
from devicerunner.update.slots import AppSlots
from tests.brokers import Mosquitto, free_port
from tests.conftest import EXAMPLES, ROOT, until
from tests.devicekit import Events, Kit, counter_module

P = "dr/v1"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "mosquitto").start()
    yield b
    b.stop()


def mqtt_kit(tmp_path: Path, url: str, extra: str = "", **kw: Any) -> Kit:
    return Kit(
        tmp_path / "dev",
        extra_config=f"""
[broker]
url = "{url}"
download_stall_s = 5
reconnect_min_s = 0.1
reconnect_max_s = 1.0
{extra}""",
        **kw,
    )


class Listener:
    """A plain subscriber (the test's own eyes on the broker)."""

    def __init__(self, url: str, topic: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        s = parse_url(url)
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"listener-{time.time_ns()}")
        self.c.on_message = self._msg
        self.c.connect(s.host, s.port)
        self.c.subscribe(topic, 1)
        self.c.loop_start()

    def _msg(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(p) for _, p in self.messages]

    def wait_event(self, phase: str, sequence: int, timeout_s: float = 30) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            return next(
                (e for e in self.events() if e.get("phase") == phase and e.get("sequence") == sequence), None
            )

        with self._cond:
            self._cond.wait_for(lambda: find() is not None, timeout_s)
        ev = find()
        assert ev is not None, f"no {phase} {sequence}: {self.events()}"
        return ev

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _publish(url: str, data: bytes) -> manifest.Manifest:
    return operator.publish_bundle(parse_url(url), data, P)


def test_good_release_is_committed_end_to_end_and_reported_in_fleet_status(
    tmp_path: Path, broker: Mosquitto
) -> None:
    kit = mqtt_kit(tmp_path, broker.url)
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        assert d.channel.wait_connected(10)
        _publish(broker.url, kit.bundle(counter_module(3), 1))
        ev.wait("COMMITTED", 1)
        fleet: dict[str, reports.DeviceStatus] = {}

        def committed() -> bool:
            app = fleet["dev-1"].apps.get("app") if "dev-1" in fleet else None
            return app is not None and app.phase == "COMMITTED"

        for _ in range(50):  # status is published right after the event; bounded wait
            fleet = operator.fleet_status(parse_url(broker.url), P, quiet_s=0.2)
            if committed():
                break
        app = fleet["dev-1"].apps["app"]
        assert fleet["dev-1"].online is True
        assert (app.sequence, app.phase) == (1, "COMMITTED")
    finally:
        d.stop()
    # the clean stop marked it offline (the last will covers crashes)
    assert operator.fleet_status(parse_url(broker.url), P, quiet_s=0.2)["dev-1"].online is False


def test_broken_release_is_rolled_back_with_the_reason_in_fleet_status(
    tmp_path: Path, broker: Mosquitto
) -> None:
    import wasmtime

    kit = mqtt_kit(tmp_path, broker.url)
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        broken = bytes(wasmtime.wat2wasm((EXAMPLES / "broken-init.wat").read_text()))
        _publish(broker.url, kit.bundle(broken, 1, caps=["log"]))
        ev.wait("ROLLED_BACK", 1)
        time.sleep(0.3)
        app = operator.fleet_status(parse_url(broker.url), P, quiet_s=0.2)["dev-1"].apps["app"]
        assert app.phase == "ROLLED_BACK" and "dr_init" in (app.last_error or "")
        assert app.last_error_sequence == 1
        assert d.scheduler.apps["app"].spec.version == "local"
    finally:
        d.stop()


def test_tampered_chunk_on_the_broker_is_rejected_and_named_in_the_event(
    tmp_path: Path, broker: Mosquitto
) -> None:
    kit = mqtt_kit(tmp_path, broker.url)
    data = kit.bundle(counter_module(3, pad_bytes=5000), 1, chunk_size=1024)
    m = _publish(broker.url, data)
    with operator.Session(parse_url(broker.url)) as s:  # an attacker overwrites chunk 2
        s.publish_many([(topics.chunk(P, m.artifact.sha256, 2), b"\0" * 1024)], retain=True)
    events = Listener(broker.url, topics.events(P, "dev-1"))
    d = Daemon(kit.cfg)
    d.start()
    try:
        rej = events.wait_event("REJECTED", 1)
        assert rej["reason"] == "artifact_mismatch" and "chunk 2" in rej["reason_text"]
        assert d.scheduler.apps["app"].spec.version == "local"  # it never ran
        assert AppSlots(kit.state_dir, "app").load()[0].active is None
    finally:
        d.stop()
        events.close()


def _publish_chunks(url: str, data: bytes, indexes: range) -> manifest.Manifest:
    man, module = bundle.unpack(data)
    m = manifest.parse_manifest(man)
    cs = m.artifact.chunk_size
    with operator.Session(parse_url(url)) as s:
        s.publish_many(
            [(topics.chunk(P, m.artifact.sha256, i), module[i * cs : (i + 1) * cs]) for i in indexes],
            retain=True,
        )
    return m


def _publish_manifest(url: str, data: bytes) -> None:
    man, _ = bundle.unpack(data)
    m = manifest.parse_manifest(man)
    with operator.Session(parse_url(url)) as s:
        s.publish_many([(topics.release(P, m.app, m.channel), man)], retain=True)


def test_broker_restart_mid_download_resumes_without_fetching_a_chunk_twice(
    tmp_path: Path, broker: Mosquitto
) -> None:
    kit = mqtt_kit(tmp_path, broker.url)
    data = kit.bundle(counter_module(3, pad_bytes=100_000), 1, chunk_size=1024)
    m = manifest.parse_manifest(bundle.unpack(data)[0])
    n = len(m.artifact.chunks)
    half = n // 2
    # A slow upload: the manifest and the first half are there, the rest is not yet.
    _publish_chunks(broker.url, data, range(half))
    _publish_manifest(broker.url, data)
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        ev.wait("DOWNLOADING", 1)
        end = time.monotonic() + 20
        while d.delivery.stats["chunks_fetched"] < half and time.monotonic() < end:
            time.sleep(0.02)
        assert d.delivery.stats["chunks_fetched"] == half
        broker.restart(down_s=0.5)  # retained messages survive (persistence), the device reconnects
        _publish_chunks(broker.url, data, range(half, n))
        done = ev.wait("DOWNLOADED", 1, timeout_s=30)
        ev.wait("COMMITTED", 1)
        assert done["chunks_fetched"] == n
        assert d.channel.stats["chunk_messages"] == n  # not one chunk delivered twice
        assert len(d.channel.connections()) >= 2
    finally:
        d.stop()


def test_sigkill_mid_download_resumes_without_refetching_held_chunks(
    tmp_path: Path, broker: Mosquitto
) -> None:
    kit = mqtt_kit(tmp_path, broker.url)
    data = kit.bundle(counter_module(3, pad_bytes=60_000), 1, chunk_size=1024)
    m = manifest.parse_manifest(bundle.unpack(data)[0])
    n = len(m.artifact.chunks)
    _publish_chunks(broker.url, data, range(n // 2))
    _publish_manifest(broker.url, data)
    cmd = [sys.executable, "-m", "devicerunner.cli.main", "run", "--config", str(kit.config_path)]
    dl_dir = kit.state_dir / "downloads" / m.artifact.sha256
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        end = time.monotonic() + 30
        while len(list(dl_dir.glob("*.chunk"))) < n // 2 and time.monotonic() < end:
            time.sleep(0.02)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    held = len(list(dl_dir.glob("*.chunk")))
    assert held == n // 2
    events = Listener(broker.url, topics.events(P, "dev-1"))
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        events.wait_event("DOWNLOADING", 1)
        _publish_chunks(broker.url, data, range(n // 2, n))
        done = events.wait_event("DOWNLOADED", 1)
        events.wait_event("COMMITTED", 1)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(20)
        events.close()
    assert (done["chunks_resumed"], done["chunks_fetched"]) == (held, n - held)


def test_burst_of_100_releases_leaves_the_device_on_the_highest_sequence(
    tmp_path: Path, broker: Mosquitto
) -> None:
    kit = mqtt_kit(tmp_path, broker.url)
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        assert d.channel.wait_connected(10)
        bundles = [kit.bundle(counter_module(seq), seq, trial_ticks=2) for seq in range(1, 101)]
        s = parse_url(broker.url)
        for b in bundles:
            operator.publish_bundle(s, b, P)
        ev.wait("COMMITTED", 100, timeout_s=120)
        st = AppSlots(kit.state_dir, "app").load()[0]
        assert (st.active_sequence, st.phase) == (100, "COMMITTED")
        assert d.scheduler.apps["app"].spec.sequence == 100
    finally:
        d.stop()


def test_device_cannot_publish_a_release_or_another_devices_status(tmp_path: Path) -> None:
    work = tmp_path / "acl"
    work.mkdir()
    pw = work / "passwd"
    for user in ("operator", "dev-1"):
        subprocess.run(
            ["mosquitto_passwd", "-b", *(["-c"] if user == "operator" else []), str(pw), user, f"{user}-pw"],
            check=True,
            capture_output=True,
        )
    acl = work / "acl"
    acl.write_text(f"""user operator
topic readwrite {P}/#

pattern write {P}/devices/%u/#
pattern read {P}/devices/%u/#
pattern read {P}/fleet/status-request
pattern read {P}/releases/#
pattern read {P}/rollouts/#
pattern read {P}/artifacts/#
pattern read {P}/trust/#
""")
    b = Mosquitto(
        work,
        listener=f"listener {{port}} 127.0.0.1\nallow_anonymous false\npassword_file {pw}\nacl_file {acl}\n",
    ).start()
    try:
        dev = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev-1")
        dev.username_pw_set("dev-1", "dev-1-pw")
        dev.connect("127.0.0.1", b.port)
        dev.loop_start()
        for topic in (f"{P}/releases/app/stable", f"{P}/devices/dev-2/status", f"{P}/devices/dev-1/status"):
            dev.publish(topic, b'{"forged": true}', qos=1, retain=True).wait_for_publish(5)
        dev.loop_stop()
        dev.disconnect()
        op = parse_url(f"mqtt://operator:operator-pw@127.0.0.1:{b.port}")
        with operator.Session(op) as s:
            seen = s.collect([f"{P}/#"], quiet_s=0.5)
        assert f"{P}/devices/dev-1/status" in seen  # its own status: allowed
        assert f"{P}/releases/app/stable" not in seen  # a device cannot publish a release
        assert f"{P}/devices/dev-2/status" not in seen  # nor another device's status
    finally:
        b.stop()


def _make_pki(d: Path) -> dict[str, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(
        name: str, key: Any, issuer: Any, issuer_key: Any, ca: bool, san: bool = False
    ) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            import ipaddress

            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return b.sign(issuer_key, hashes.SHA256())

    out = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
    ca = cert("test-ca", ca_key, ca_name, ca_key, True)
    out["ca"] = d / "ca.crt"
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, san in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        c = cert(name if name == "server" else "dev-1", key, ca_name, ca_key, False, san)
        out[name] = d / f"{name}.crt"
        out[name].write_bytes(c.public_bytes(serialization.Encoding.PEM))
        out[f"{name}_key"] = d / f"{name}.key"
        out[f"{name}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return out


def test_release_is_committed_over_tls_with_client_certificates(tmp_path: Path) -> None:
    work = tmp_path / "tls"
    work.mkdir()
    pki = _make_pki(work)
    b = Mosquitto(
        work,
        listener=f"listener {{port}} 127.0.0.1\nallow_anonymous true\ncafile {pki['ca']}\n"
        f"certfile {pki['server']}\nkeyfile {pki['server_key']}\nrequire_certificate true\n",
    ).start()
    try:
        url = f"mqtts://127.0.0.1:{b.port}"
        kit = mqtt_kit(
            tmp_path,
            url,
            extra=f'ca_file = "{pki["ca"]}"\ncert_file = "{pki["client"]}"\n'
            f'key_file = "{pki["client_key"]}"\n',
        )
        d = Daemon(kit.cfg)
        ev = Events(d)
        d.start()
        try:
            s = parse_url(url, ca_file=pki["ca"], cert_file=pki["client"], key_file=pki["client_key"])
            operator.publish_bundle(s, kit.bundle(counter_module(2), 1), P)
            ev.wait("COMMITTED", 1)
        finally:
            d.stop()
        # without a client certificate the broker refuses the connection
        from devicerunner.errors import TransportError

        with pytest.raises(TransportError), operator.Session(parse_url(url, ca_file=pki["ca"]), timeout_s=3):
            pass
    finally:
        b.stop()


def test_embedded_amqtt_broker_carries_the_same_flow(tmp_path: Path) -> None:
    from devicerunner.fleet.broker import EmbeddedBroker

    eb = EmbeddedBroker(port=free_port())
    eb.start()
    try:
        kit = mqtt_kit(tmp_path, eb.url)
        d = Daemon(kit.cfg)
        ev = Events(d)
        d.start()
        try:
            assert d.channel.wait_connected(10)
            _publish(eb.url, kit.bundle(counter_module(2, pad_bytes=3000), 1, chunk_size=1024))
            ev.wait("COMMITTED", 1)
        finally:
            d.stop()
    finally:
        eb.stop()


def test_gc_clears_only_chunks_no_current_release_references(tmp_path: Path, broker: Mosquitto) -> None:
    kit = mqtt_kit(tmp_path, broker.url)
    old = _publish(broker.url, kit.bundle(counter_module(1, pad_bytes=3000), 1, chunk_size=1024))
    new = _publish(
        broker.url, kit.bundle(counter_module(2, pad_bytes=3000), 2, chunk_size=1024)
    )  # replaces it
    s = parse_url(broker.url)
    kept, removed = operator.gc(s, P)
    assert removed == len(old.artifact.chunks) and kept == len(new.artifact.chunks)
    with operator.Session(s) as sess:
        left = sess.collect([f"{P}/artifacts/+/+"], quiet_s=0.5)
    assert {t.split("/")[-2] for t, p in left.items() if p} == {new.artifact.sha256}


def test_app_telemetry_drains_to_its_mqtt_topic(tmp_path: Path, broker: Mosquitto) -> None:
    kit = mqtt_kit(tmp_path, broker.url, bootstrap=str(EXAMPLES / "thermostat.wasm"))
    tel = Listener(broker.url, f"{P}/devices/dev-1/telemetry/app/climate")
    d = Daemon(kit.cfg)
    d.start()
    try:
        end = time.monotonic() + 20
        while not tel.messages and time.monotonic() < end:  # the thermostat publishes every 10th tick
            time.sleep(0.05)
    finally:
        d.stop()
        tel.close()
    assert tel.messages
    doc = json.loads(tel.messages[0][1])
    assert set(doc) == {"temp", "fan", "setpoint"}


def test_gc_never_clears_a_current_release(tmp_path: Path, broker: Mosquitto) -> None:
    kit = mqtt_kit(tmp_path, broker.url)
    m = _publish(broker.url, kit.bundle(counter_module(1), 1))
    s = parse_url(broker.url)
    operator.gc(s, P)
    with operator.Session(s) as sess:
        left = sess.collect([f"{P}/releases/+/+", f"{P}/artifacts/+/+"], quiet_s=0.5)
    assert left.get(topics.release(P, "app", "stable"))  # the release is still there
    assert len([t for t, p in left.items() if "/artifacts/" in t and p]) == len(m.artifact.chunks)


def test_release_redelivered_by_a_reconnect_while_it_is_being_staged_is_not_taken_twice(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """A flaky link reconnects between download and staging: the retained release
    arrives again. It must not be fetched and offered a second time (which
    ended in a spurious REJECTED 'sequence 1 is not above 1' after the commit)."""
    import socket

    from devicerunner.runtime.process import Runtime

    kit = mqtt_kit(tmp_path, broker.url)
    rt = Runtime(work_threads=2)  # one thread is held by the blocked updater below
    d = Daemon(kit.cfg, runtime=rt)
    ev = Events(d)
    d.start()
    gate = threading.Event()
    try:
        assert d.channel.wait_connected(10)
        d.updater.submit(lambda: gate.wait(20))  # the updater is busy: the release waits for it
        _publish(broker.url, kit.bundle(counter_module(3), 1))
        ev.wait("DOWNLOADED", 1)
        sock = raw_socket(d.channel.conn.client.socket())  # under the packet guard
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)  # the link drops; the device reconnects by itself
        assert until(lambda: len(d.channel.connections()) >= 2 and d.delivery.stats["releases_seen"] >= 2)
        # A marker behind the redelivery, on the same topic (so the same transport lane,
        # in order) and then the same updater lane: a release no trusted key signed.
        # Once it is refused and the updater is idle, a second offer of sequence 1, had
        # the redelivery made one, has been processed: no sleep decides this.
        forged = json.loads(bundle.unpack(kit.bundle(counter_module(5), 2))[0])
        forged["signatures"] = [{"keyid": "0" * 64, "sig": "0" * 128}]
        with operator.Session(parse_url(broker.url)) as s:
            s.publish_many([(topics.release(P, "app", "stable"), json.dumps(forged).encode())], retain=False)
        gate.set()
        ev.wait("REJECTED", 2)
        ev.wait("COMMITTED", 1)
        assert until(d.updater.idle.is_set)
        phases = [e["phase"] for e in ev.items if e.get("sequence") == 1]
        assert phases.count("DOWNLOADED") == 1 and "REJECTED" not in phases, phases
    finally:
        gate.set()
        d.stop()
        rt.close()


def test_duplicate_client_id_kicked_by_the_broker_backs_off_instead_of_a_reconnect_storm(
    broker: Mosquitto,
) -> None:
    """Two connections with one client id: the broker drops the older one on every
    connect. The back-off used to reset as soon as a connection opened, so the pair
    reconnected every ~0.05 s (132 reconnects in 13 s, measured); it now resets only
    after a connection stayed up ``stable_s``."""
    import random

    from devicerunner.runtime.process import Runtime
    from devicerunner.transport.mqtt import Connection

    rt = Runtime(work_threads=1)
    settings = parse_url(broker.url, keepalive_s=30)
    twins = [
        Connection(
            settings,
            "same-id",
            on_message=lambda t, p, r: None,
            runtime=rt,
            backoff_min_s=0.1,
            backoff_max_s=2.0,
            rng=random.Random(i),
        )
        for i in range(2)
    ]
    try:
        for c in twins:
            c.start()
        assert until(lambda: sum(len(c.connects) for c in twins) >= 2)
        t0 = time.monotonic()
        time.sleep(4.0)  # a window to count reconnects in (nothing to await: we count)
        reconnects = sum(len(c.connects) for c in twins)
        assert reconnects <= 16, f"{reconnects} connects in {time.monotonic() - t0:.1f} s"
    finally:
        for c in twins:
            c.stop()
        rt.close()


def test_reconnect_back_off_must_be_positive_and_ordered() -> None:
    from devicerunner.transport.mqtt import Connection

    settings = parse_url("mqtt://127.0.0.1:1")
    for lo, hi in ((0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)):
        with pytest.raises(ValueError, match="backoff_min_s"):
            Connection(settings, "x", on_message=lambda t, p, r: None, backoff_min_s=lo, backoff_max_s=hi)


def test_failed_staging_write_keeps_the_downloaded_chunks_and_is_retried_with_backoff(
    tmp_path: Path, broker: Mosquitto, small_fs: Path
) -> None:
    """Disk full while staging a release that came over MQTT: STAGED used to be
    announced before the write, which deleted the downloaded chunks, and the
    "will retry" only happened at the next reconnect (stuck at DOWNLOADING)."""
    import shutil

    from devicerunner.runtime.process import Runtime

    kit = mqtt_kit(small_fs, broker.url)
    rt = Runtime(work_threads=2)  # one thread is held by the blocked updater below
    d = Daemon(kit.cfg, runtime=rt)
    ev = Events(d)
    d.start()
    gate = threading.Event()
    ballast = small_fs / "ballast"
    try:
        assert d.channel.wait_connected(10)
        d.updater.submit(lambda: gate.wait(20))  # downloaded, not yet staged
        m = _publish(broker.url, kit.bundle(counter_module(4, pad_bytes=300_000), 1))
        ev.wait("DOWNLOADED", 1)
        ballast.write_bytes(b"\0" * max(0, shutil.disk_usage(small_fs).free - 64 * 1024))
        gate.set()
        failed = ev.wait("FAILED", 1)
        assert failed["reason"] == "io_error" and "No space left" in failed["reason_text"]
        chunks = kit.state_dir / "downloads" / m.artifact.sha256
        assert len(list(chunks.glob("*.chunk"))) == len(m.artifact.chunks)  # kept for the retry
        ballast.unlink()  # space comes back: the retry goes through, no reconnect needed
        ev.wait("COMMITTED", 1, timeout_s=30)
        assert len(d.channel.connections()) == 1  # no reconnect needed
    finally:
        gate.set()
        d.stop()
        rt.close()
    assert AppSlots(kit.state_dir, "app").load()[0].active_sequence == 1


def test_the_heartbeat_counts_from_the_last_status_published_not_from_a_fixed_clock(
    tmp_path: Path, broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device's statuses during an update make a heartbeat right after them
    redundant: the heartbeat comes HEARTBEAT_S after the last status, whatever
    published it (10,000 devices sent ~20,000 such statuses in one rollout)."""
    from devicerunner.transport import channel

    beat = 1.5
    monkeypatch.setattr(channel, "HEARTBEAT_S", beat)
    kit = mqtt_kit(tmp_path, broker.url)
    seen = Listener(broker.url, topics.status(P, "dev-1"))
    arrivals: list[float] = []
    seen.c.on_message = lambda _c, _u, m: arrivals.append(time.monotonic())
    d = Daemon(kit.cfg)
    d.start()
    try:
        assert until(lambda: len(arrivals) >= 1, 10)  # the status on connect
        first = arrivals[-1]
        time.sleep(beat / 2)
        n = len(arrivals)
        with operator.Session(parse_url(broker.url)) as s:  # ask for a status now
            s.client.publish(topics.status_request(P), json.dumps({"spread_s": 0}).encode(), qos=1)
        assert until(lambda: len(arrivals) > n, 10)
        answered = arrivals[n]
        assert answered - first < beat  # the answer came before a fixed-clock heartbeat would
        assert until(lambda: len(arrivals) > n + 1, 10)
        # the next one is the heartbeat, a whole period after the answer
        assert arrivals[n + 1] - answered >= beat * 0.9, (first, arrivals)
    finally:
        d.stop()
        seen.close()
