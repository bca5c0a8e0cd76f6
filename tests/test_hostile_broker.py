"""The broker is untrusted: attacks by someone who may publish anything on it
(or hand the device a bad file, or move its clock), each followed by the
genuine release, which must COMMIT. Real Mosquitto on a free loopback port,
real daemons, real sockets (docs/threat-model.md lists each attack)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devicerunner.device.daemon import Daemon
from devicerunner.transport import operator, topics
from devicerunner.transport.guard import PacketGuard, encode_length, raw_socket
from devicerunner.transport.settings import parse_url
from devicerunner.trust import bundle, manifest
from devicerunner.update.slots import AppSlots
from devicerunner.update.state import AppState
from devicerunner.update.updater import install_bundle
from firmware_shims.base import SkewedClock
from tests.brokers import Mosquitto
from tests.conftest import until
from tests.devicekit import Events, Kit, counter_module
from tests.test_mqtt import Listener

P = "dr/v1"
YEAR = 365 * 86400


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "mosquitto").start()
    yield b
    b.stop()


def mqtt_kit(tmp_path: Path, url: str, extra: str = "") -> Kit:
    return Kit(
        tmp_path / "dev",
        extra_config=f"""
[broker]
url = "{url}"
download_stall_s = 5
reconnect_min_s = 0.1
reconnect_max_s = 0.5
{extra}""",
    )


def publish(url: str, data: bytes) -> manifest.Manifest:
    return operator.publish_bundle(parse_url(url), data, P)


def publish_raw(url: str, items: list[tuple[str, bytes]], retain: bool = False) -> None:
    with operator.Session(parse_url(url)) as s:
        s.publish_many(items, retain=retain)


def signed_release(kit: Kit, module: bytes, sequence: int, *, issued: int, expires: int, **kw: Any) -> bytes:
    signed = manifest.manifest_signed(
        app="app",
        version=f"1.0.{sequence}",
        sequence=sequence,
        module=module,
        capabilities=["kv", "log"],
        hardware=[kit.hardware],
        issued=issued,
        expires=expires,
        trial_ticks=20,
        trial_seconds=0,
        tick_interval_ms=kit.tick_interval_ms,
        **kw,
    )
    return bundle.pack(manifest.sign_envelope(signed, kit.release_keys), module)


def committed(kit: Kit) -> tuple[int, str]:
    st = AppSlots(kit.state_dir, "app").load()[0]
    return st.active_sequence, st.phase


def rejected(ev: Events) -> list[dict[str, Any]]:
    return [e for e in ev.items if e["phase"] == "REJECTED"]


@pytest.fixture
def device(tmp_path: Path, broker: Mosquitto) -> Iterator[tuple[Kit, Daemon, Events]]:
    kit = mqtt_kit(tmp_path, broker.url)
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    assert d.channel.wait_connected(10)
    yield kit, d, ev
    d.stop()


# -- a refusal never blocks what is genuine -----------------------------------------------


def test_forged_retained_chunk_then_genuine_republish_commits(tmp_path: Path, broker: Mosquitto) -> None:
    kit = mqtt_kit(tmp_path, broker.url)
    data = kit.bundle(counter_module(3, pad_bytes=5000), 1, chunk_size=1024)
    m = publish(broker.url, data)
    publish_raw(broker.url, [(topics.chunk(P, m.artifact.sha256, 2), b"\0" * 1024)], retain=True)
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        rej = ev.wait("REJECTED", 1)
        assert rej["reason"] == "artifact_mismatch" and "chunk 2" in rej["reason_text"]
        assert AppSlots(kit.state_dir, "app").load()[0].bad_sequences == {}
        publish(broker.url, data)  # the operator republishes: the genuine chunk is back
        ev.wait("COMMITTED", 1)
        assert committed(kit) == (1, "COMMITTED")
    finally:
        d.stop()


def test_genuine_beta_manifest_replayed_on_stable_then_the_stable_promotion_commits(
    device: tuple[Kit, Daemon, Events], broker: Mosquitto
) -> None:
    kit, _d, ev = device
    module = counter_module(4)
    beta, _ = bundle.unpack(kit.bundle(module, 1, channel="beta"))
    # A genuine beta manifest, published by anyone on the stable topic (not retained).
    publish_raw(broker.url, [(topics.release(P, "app", "stable"), beta)])
    rej = ev.wait("REJECTED", 1)
    assert rej["reason"] == "wrong_target"
    publish(broker.url, kit.bundle(module, 1))  # promoted to stable: same sequence
    ev.wait("COMMITTED", 1)
    assert committed(kit) == (1, "COMMITTED")


def test_truncated_bundle_then_the_genuine_one_commits(tmp_path: Path) -> None:
    kit = Kit(tmp_path / "dev")
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        data = kit.bundle(counter_module(5, pad_bytes=3000), 1)
        install_bundle(kit.state_dir, data[:-1000])  # a copy cut short: the manifest is whole
        rej = ev.wait("REJECTED", 1)
        assert rej["reason"] == "artifact_mismatch"
        install_bundle(kit.state_dir, data)
        ev.wait("COMMITTED", 1)
        assert committed(kit) == (1, "COMMITTED")
    finally:
        d.stop()


def test_clock_ahead_for_one_delivery_then_fixed_commits(tmp_path: Path, broker: Mosquitto) -> None:
    kit = mqtt_kit(tmp_path, broker.url)
    clock = SkewedClock(10 * YEAR)  # the attacker moved the device's clock source
    d = Daemon(kit.cfg, clock=clock)
    ev = Events(d)
    d.start()
    try:
        assert d.channel.wait_connected(10)
        data = kit.bundle(counter_module(6), 1)
        publish(broker.url, data)
        assert ev.wait("REJECTED", 1)["reason"] == "expired"
        assert d.trust.time_floor < time.time() + 86400  # a refusal moves no floor
        clock.offset_ms = 0  # the clock is right again
        publish(broker.url, data)  # the same retained release, delivered again
        ev.wait("COMMITTED", 1)
        assert committed(kit) == (1, "COMMITTED")
    finally:
        d.stop()


def test_future_dated_release_then_a_normal_higher_sequence_commits(
    device: tuple[Kit, Daemon, Events], broker: Mosquitto
) -> None:
    kit, d, ev = device
    now = int(time.time())
    # Genuinely signed, on a signing box whose clock was ten years ahead.
    ahead = signed_release(kit, counter_module(7), 1, issued=now + 10 * YEAR, expires=now + 10 * YEAR + 86400)
    publish(broker.url, ahead)
    assert ev.wait("REJECTED", 1)["reason"] == "issued_in_future"
    assert d.trust.time_floor <= now + 3600  # the floor did not move to 2036
    publish(broker.url, kit.bundle(counter_module(8), 2))
    ev.wait("COMMITTED", 2)
    assert committed(kit) == (2, "COMMITTED")


def test_rollback_is_final_for_that_manifest_but_a_refusal_is_not(
    device: tuple[Kit, Daemon, Events], broker: Mosquitto
) -> None:
    import wasmtime

    from tests.conftest import EXAMPLES

    kit, _d, ev = device
    broken = bytes(wasmtime.wat2wasm((EXAMPLES / "broken-init.wat").read_text()))
    data = kit.bundle(broken, 1, caps=["log"])
    publish(broker.url, data)
    ev.wait("ROLLED_BACK", 1)
    assert "1" in AppSlots(kit.state_dir, "app").load()[0].bad_sequences
    n = len(ev.items)
    publish(broker.url, data)  # the same manifest again: never trialled twice
    publish(broker.url, kit.bundle(counter_module(9), 2))
    ev.wait("COMMITTED", 2)
    assert not [e for e in ev.items[n:] if e.get("sequence") == 1 and e["phase"] in ("STAGED", "TRIAL")]


# -- bounded memory whatever is published -----------------------------------------------------


def garbage_manifest(i: int, size: int) -> bytes:
    """Parseable as JSON, shaped like an envelope, signed by nobody we trust."""
    return json.dumps(
        {"signed": {"_type": "release", "pad": f"{i:08d}" + "x" * size}, "signatures": []}
    ).encode()


def test_flood_of_garbage_releases_then_genuine_commits(
    device: tuple[Kit, Daemon, Events], broker: Mosquitto
) -> None:
    kit, d, ev = device
    watcher = Listener(broker.url, topics.events(P, "dev-1"))  # what the operator sees
    release_topic = topics.release(P, "app", "stable")
    flood = [(release_topic, garbage_manifest(i, 120 * 1024)) for i in range(600)]
    started = time.monotonic()
    publish_raw(broker.url, flood)
    publish(broker.url, kit.bundle(counter_module(10), 1))
    ev.wait("COMMITTED", 1, timeout_s=60)
    elapsed = time.monotonic() - started
    stats = d.input_stats()
    # Newest-wins per topic: the lane never had more than one message per topic waiting.
    subscribed = 2 + 2 * len(kit.cfg.apps)  # trust/root, trust/roots/2, release, rollout
    assert stats["mailbox"]["peak_waiting"] <= subscribed
    # Every distinct garbage document was refused, but events (and log lines) are rate-limited.
    assert len(rejected(ev)) <= 10 + elapsed + 2, (len(rejected(ev)), elapsed)  # burst 10, 1/s
    assert stats["rejections"]["remembered"] <= 256
    # ... and the ones let through reach the operator (a refusal of unsigned input
    # once broke the event forwarding: no sequence, no app it was offered for).
    assert until(lambda: any(e.get("phase") == "REJECTED" for e in watcher.events()))
    watcher.close()


def unsigned_root(version: int) -> bytes:
    key = Ed25519PrivateKey.generate()
    now = int(time.time())
    signed = manifest.root_signed(
        version=version,
        issued=now - 60,
        expires=now + 86400,
        role_keys={"root": [key.public_key()], "release": [key.public_key()]},
        thresholds={"root": 1, "release": 1},
    )
    return manifest.sign_envelope(signed, [key])  # self-signed by a stranger


def genuine_root(kit: Kit, version: int) -> bytes:
    now = int(time.time())
    signed = manifest.root_signed(
        version=version,
        issued=now - 30,
        expires=now + 86400 * 30,
        role_keys={
            "root": [kit.root_key.public_key()],
            "release": [k.public_key() for k in kit.release_keys],
        },
        thresholds={"root": 1, "release": 2},
    )
    return manifest.sign_envelope(signed, [kit.root_key])


def test_unsigned_roots_are_dropped_then_the_genuine_rotation_and_release_commit(
    device: tuple[Kit, Daemon, Events], broker: Mosquitto
) -> None:
    kit, d, ev = device
    flood = [(topics.root(P), unsigned_root(v)) for v in range(2, 302)]
    flood += [(topics.root_version(P, 2), unsigned_root(2)) for _ in range(50)]
    publish_raw(broker.url, flood)
    operator.publish_root(parse_url(broker.url), genuine_root(kit, 2), P)
    assert until(lambda: d.trust.root is not None and d.trust.root.version == 2, 30)
    publish(broker.url, kit.bundle(counter_module(11), 1))
    ev.wait("COMMITTED", 1)
    stats = d.input_stats()["transport"]
    assert stats["roots_refused"] >= 1  # the unsigned v2s, verified on arrival and dropped
    assert stats["roots_ahead"] >= 1  # v3.. on trust/root: not verifiable, not kept
    root_events = [e for e in rejected(ev) if "trust root" in str(e.get("reason_text"))]
    assert len(root_events) <= 12  # rate-limited


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_oversize_payload_is_not_read_and_the_genuine_release_commits(
    tmp_path: Path, broker: Mosquitto, protocol: str
) -> None:
    kit = mqtt_kit(tmp_path, broker.url, extra=f'protocol = "{protocol}"\nmax_packet_bytes = 300000')
    release_topic = topics.release(P, "app", "stable")
    publish_raw(broker.url, [(release_topic, b"{" + b" " * (8 * 1024 * 1024))], retain=True)
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        assert d.channel.wait_connected(10)
        if protocol == "3.1.1":  # cut under paho, on the socket: its body was never buffered
            assert until(lambda: d.input_stats()["transport"]["oversize_packets"] == 1)
        publish(broker.url, kit.bundle(counter_module(12), 1))
        ev.wait("COMMITTED", 1)
        assert len(d.channel.connections()) == 1  # no reconnect loop on a retained monster
        if protocol == "5":  # the broker was told the bound and kept it to itself
            assert d.input_stats()["transport"]["oversize_packets"] == 0
    finally:
        d.stop()


def test_retained_garbage_under_trust_roots_is_not_delivered_across_reconnects(
    tmp_path: Path, broker: Mosquitto
) -> None:
    kit = mqtt_kit(tmp_path, broker.url)
    garbage = [(topics.root_version(P, v), unsigned_root(v)) for v in range(3, 503)]
    garbage.append((topics.root_version(P, "junk"), b"not a root"))
    publish_raw(broker.url, garbage, retain=True)
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        for n in range(1, 4):  # the link drops three times; the device reconnects by itself
            assert until(lambda n=n: len(d.channel.connections()) >= n, 20)  # type: ignore[misc]
            sock = raw_socket(d.channel.conn.client.socket())
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        assert until(lambda: len(d.channel.connections()) >= 4 and d.channel.connected(), 20)
        publish(broker.url, kit.bundle(counter_module(13), 1))
        ev.wait("COMMITTED", 1)
        stats = d.input_stats()
        assert stats["mailbox"]["accepted"] < 20, stats  # not 500 roots per reconnect
        assert stats["transport"]["roots_refused"] == 0
    finally:
        d.stop()


# -- the guard itself, on a real socket pair ------------------------------------------------------


def publish_packet(topic: str, payload: bytes, qos: int = 1, pid: int = 7) -> bytes:
    t = topic.encode()
    var = len(t).to_bytes(2, "big") + t + (pid.to_bytes(2, "big") if qos else b"")
    return bytes([0x30 | (qos << 1)]) + encode_length(len(var) + len(payload)) + var + payload


def recv(g: PacketGuard, n: int) -> bytes:
    """``g.recv`` retried as paho's loop would when told to come back later (bounded)."""
    for _ in range(10_000):
        try:
            return g.recv(n)
        except BlockingIOError:
            continue
    raise AssertionError("the guard never produced data")


def read_packet(g: PacketGuard) -> bytes:
    """Read one packet the way paho does: a byte, the length bytes, then the rest."""
    header = recv(g, 1)
    length, mult = 0, 1
    while True:
        b = recv(g, 1)
        header += b
        length += (b[0] & 0x7F) * mult
        mult *= 128
        if not b[0] & 0x80:
            break
    body = b""
    while len(body) < length:
        body += recv(g, length - len(body))
    return header + body


def test_guard_cuts_an_oversize_publish_to_its_topic_and_passes_the_next_one_whole() -> None:
    a, b = socket.socketpair()
    cut: list[tuple[str, int]] = []
    g = PacketGuard(b, 64 * 1024, lambda t, n: cut.append((t, n)))
    huge = publish_packet("dr/v1/releases/app/stable", os.urandom(1024) * (20 * 1024))  # 20 MiB
    small = publish_packet("dr/v1/trust/root", b"hello", pid=8)
    writer = threading.Thread(target=lambda: (a.sendall(huge), a.sendall(small)), daemon=True)
    writer.start()
    try:
        first = read_packet(g)
        assert first == publish_packet("dr/v1/releases/app/stable", b"")  # topic and packet id, no payload
        assert cut == [("dr/v1/releases/app/stable", len(huge) - 5)]  # type byte, 4 length bytes
        assert read_packet(g) == small  # the stream is in step again
        assert g.cut_packets == 1
    finally:
        writer.join(10)
        a.close()
        b.close()


def test_guard_drops_the_connection_on_an_oversize_packet_that_is_not_a_publish() -> None:
    a, b = socket.socketpair()
    g = PacketGuard(b, 64 * 1024, lambda t, n: None)
    a.sendall(bytes([0x90]) + encode_length(1024 * 1024))  # a SUBACK of 1 MiB
    try:
        with pytest.raises(ConnectionAbortedError):
            g.recv(1)
    finally:
        a.close()
        b.close()


def test_flood_that_replaces_the_waiting_genuine_release_cannot_hide_it(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """Newest-wins drops what waits: a flood right behind the genuine (retained)
    release replaces it before the device looked. The device asks the broker
    for the retained copy again once the flood has drained."""
    from devicerunner.runtime.process import Runtime

    kit = mqtt_kit(tmp_path, broker.url)
    rt = Runtime(work_threads=1)  # held below: the transport lane cannot run either
    d = Daemon(kit.cfg, runtime=rt)
    ev = Events(d)
    d.start()
    gate = threading.Event()
    try:
        assert d.channel.wait_connected(10)
        d.updater.submit(lambda: gate.wait(20))
        publish(broker.url, kit.bundle(counter_module(14), 1))  # retained, as always
        release_topic = topics.release(P, "app", "stable")
        publish_raw(broker.url, [(release_topic, garbage_manifest(i, 1000)) for i in range(50)])
        assert until(lambda: d.input_stats()["mailbox"]["replaced"] >= 50)
        gate.set()
        ev.wait("COMMITTED", 1)
    finally:
        gate.set()
        d.stop()
        rt.close()


def test_root_several_versions_ahead_is_reached_by_walking_the_chain(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """The device was off for three rotations: trust/root says v4, which it cannot
    verify yet (and does not keep); it walks trust/roots/2, /3, /4 one exact topic
    at a time, each verified against the one before."""
    kit = mqtt_kit(tmp_path, broker.url)
    for v in (2, 3, 4):
        operator.publish_root(parse_url(broker.url), genuine_root(kit, v), P)
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        assert until(lambda: d.trust.root is not None and d.trust.root.version == 4, 20)
        assert [e["root_version"] for e in ev.items if e["phase"] == "ROOT_ROTATED"] == [2, 3, 4]
        publish(broker.url, kit.bundle(counter_module(15), 1))
        ev.wait("COMMITTED", 1)
    finally:
        d.stop()


def test_sequence_burnt_by_a_refusal_in_an_older_version_is_taken_again(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """Devices poisoned before this fix (a forged chunk wrote ``"1": "artifact_mismatch:
    ..."`` into bad_sequences) recover by themselves; a real rollback stays final."""
    kit = mqtt_kit(tmp_path, broker.url)
    app_dir = kit.state_dir / "apps" / "app"
    app_dir.mkdir(parents=True)
    bad = {"1": "artifact_mismatch: chunk 2: sha256 differs from the manifest", "7": "dr_init failed"}
    legacy = dataclasses.asdict(AppState(bad_sequences=bad))  # as an older version wrote it: unsealed,
    legacy.pop("last_error_sequence")  # and without the fields that came with the seal
    (app_dir / "state.json").write_text(json.dumps({**legacy, "phase": "REJECTED"}))
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        assert AppSlots(kit.state_dir, "app").load()[0].bad == frozenset({7})
        publish(broker.url, kit.bundle(counter_module(16), 1))
        ev.wait("COMMITTED", 1)
    finally:
        d.stop()


def test_replayed_beta_manifest_while_the_genuine_one_is_staged_does_not_make_it_fetched_twice(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """The genuine release was handed to the (busy) updater; a beta manifest with
    the same sequence is replayed and refused. That refusal is about another
    document: the genuine one, redelivered by a reconnect, is not taken twice."""
    from devicerunner.runtime.process import Runtime

    kit = mqtt_kit(tmp_path, broker.url)
    rt = Runtime(work_threads=2)  # one thread is held by the blocked updater below
    d = Daemon(kit.cfg, runtime=rt)
    ev = Events(d)
    d.start()
    gate = threading.Event()
    try:
        assert d.channel.wait_connected(10)
        d.updater.submit(lambda: gate.wait(20))
        module = counter_module(17)
        publish(broker.url, kit.bundle(module, 1))
        ev.wait("DOWNLOADED", 1)
        beta, _ = bundle.unpack(kit.bundle(module, 1, channel="beta"))
        publish_raw(broker.url, [(topics.release(P, "app", "stable"), beta)])
        assert ev.wait("REJECTED", 1)["reason"] == "wrong_target"
        sock = raw_socket(d.channel.conn.client.socket())
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)  # the retained genuine release comes again
        assert until(lambda: len(d.channel.connections()) >= 2 and d.delivery.stats["releases_seen"] >= 3)
        gate.set()
        ev.wait("COMMITTED", 1)
        time.sleep(0.5)  # a second offer would be processed right after the first
        phases = [(e["phase"], e.get("reason")) for e in ev.items if e.get("sequence") == 1]
        assert [p for p, _ in phases].count("DOWNLOADED") == 1, phases
        assert ("REJECTED", "rollback") not in phases, phases
    finally:
        gate.set()
        d.stop()
        rt.close()


def test_guard_cuts_an_oversize_mqtt5_publish_with_an_empty_property_list() -> None:
    """A broker that ignores the Maximum Packet Size the device announced."""
    a, b = socket.socketpair()
    g = PacketGuard(b, 64 * 1024, lambda t, n: None, mqtt5=True)
    t = b"dr/v1/trust/root"
    var = (
        len(t).to_bytes(2, "big") + t + (9).to_bytes(2, "big") + b"\x03\x01\x01\x00"
    )  # 3 bytes of properties
    body = os.urandom(200 * 1024)
    a.sendall(bytes([0x33]) + encode_length(len(var) + len(body)) + var + body)  # QoS 1, retained
    try:
        cut = read_packet(g)
        expect = len(t).to_bytes(2, "big") + t + (9).to_bytes(2, "big") + b"\x00"
        assert cut == bytes([0x33]) + encode_length(len(expect)) + expect
    finally:
        a.close()
        b.close()


def test_future_dated_config_is_refused_and_moves_no_floor(tmp_path: Path) -> None:
    """Configs raise the floor when staged, so their ``issued`` is judged like a release's."""
    from devicerunner.errors import IssuedInFutureError
    from devicerunner.trust import appconfig
    from devicerunner.trust import verify as trust

    kit = Kit(tmp_path / "dev")
    root = trust.load_trusted_root((kit.dir / "root.json").read_bytes())
    now = int(time.time())
    signed = appconfig.config_signed(
        app="app",
        version=1,
        settings={"limit": "1"},
        hardware=[kit.hardware],
        issued=now + 10 * YEAR,
        expires=now + 10 * YEAR + 86400,
    )
    data = manifest.sign_envelope(signed, [kit.config_key])
    device = trust.DeviceIdentity(kit.device_id, kit.hardware, {"app": frozenset({"log"})})
    with pytest.raises(IssuedInFutureError):
        appconfig.verify_config(
            data,
            root=root,
            device=device,
            channel="stable",
            history=appconfig.ConfigHistory(),
            time_floor=0,
            now=now,
        )


def test_flood_of_unsigned_configs_is_reported_rate_limited(tmp_path: Path) -> None:
    kit = Kit(tmp_path / "dev")
    d = Daemon(kit.cfg, status_file=False)
    ev = Events(d)
    d.start()
    try:
        stranger = Ed25519PrivateKey.generate()
        started = time.monotonic()
        for v in range(1, 101):  # distinct documents: each one is news to the refusal memory
            d.config_updates.offer(kit.config(v, {"limit": "1"}, signers=[stranger]), "mqtt")
        assert until(lambda: any(e["phase"] == "CONFIG_REJECTED" for e in ev.items))
        d.updater.submit(lambda: None)
        assert until(lambda: d.updater.idle.is_set())
        refused = [e for e in ev.items if e["phase"] == "CONFIG_REJECTED"]
        assert len(refused) <= 10 + (time.monotonic() - started) + 1, len(refused)
    finally:
        d.stop()
