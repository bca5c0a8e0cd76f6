"""The shipped broker configuration (deploy/mosquitto/) run as shipped:
devices by client certificate on one listener, operators by password on
another, per-device ACLs, and identities that cannot collide."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devicerunner.device.daemon import Daemon
from devicerunner.errors import TransportError
from devicerunner.transport import operator
from devicerunner.transport.settings import parse_url
from tests.brokers import DEPLOY, DeployedMosquitto
from tests.devicekit import Events, Kit, counter_module

P = "dr/v1"


@pytest.fixture
def deployed(tmp_path: Path) -> Iterator[DeployedMosquitto]:
    b = DeployedMosquitto(tmp_path / "broker", devices=("operator", "dev-1")).start()
    yield b
    b.stop()


def _device_client(b: DeployedMosquitto, device_id: str) -> paho.Client:
    cert, key = b.device_cert(device_id)
    ctx = ssl.create_default_context(cafile=str(b.ca))
    ctx.load_cert_chain(str(cert), str(key))
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=device_id)
    c.tls_set_context(ctx)
    connected = threading.Event()
    c.on_connect = lambda *_: connected.set()
    c.connect("127.0.0.1", b.device_port)
    c.loop_start()
    assert connected.wait(10), "the device's certificate was not accepted"
    return c


def test_no_value_in_the_shipped_config_carries_a_trailing_comment() -> None:
    # Mosquitto reads "password_file /x  # comment" as the path "/x  # comment".
    for name in ("mosquitto.conf", "acl-devices", "acl-operators"):
        for n, line in enumerate((DEPLOY / name).read_text().splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                assert "#" not in line.split(None, 1)[0], f"{name}:{n}"
                if name == "mosquitto.conf":
                    assert " #" not in line and "\t#" not in line, f"{name}:{n}: trailing comment"


def test_device_whose_id_is_operator_gets_no_operator_rights(deployed: DeployedMosquitto) -> None:
    dev = _device_client(deployed, "operator")
    try:
        for topic in (
            f"{P}/releases/app/stable",
            f"{P}/trust/root",
            f"{P}/rollouts/app/stable",
            f"{P}/devices/dev-1/status",
            f"{P}/devices/operator/status",
        ):
            dev.publish(topic, b'{"forged": true}', qos=1, retain=True).wait_for_publish(5)
    finally:
        dev.loop_stop()
        dev.disconnect()
    with operator.Session(parse_url(deployed.operator_url(), ca_file=deployed.ca)) as s:
        seen = s.collect([f"{P}/#"], quiet_s=0.5)
    assert sorted(seen) == [f"{P}/devices/operator/status"]  # its own status, nothing else


def test_operator_password_works_while_devices_need_certificates(
    tmp_path: Path, deployed: DeployedMosquitto
) -> None:
    cert, key = deployed.device_cert("dev-1")
    kit = Kit(
        tmp_path / "dev",
        extra_config=f"""
[broker]
url = "{deployed.device_url}"
ca_file = "{deployed.ca}"
cert_file = "{cert}"
key_file = "{key}"
reconnect_min_s = 0.1
reconnect_max_s = 1.0
""",
    )
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        op = parse_url(deployed.operator_url(), ca_file=deployed.ca)
        operator.publish_bundle(op, kit.bundle(counter_module(2), 1), P)
        ev.wait("COMMITTED", 1)
        fleet = operator.fleet_status(op, P)
        assert fleet["dev-1"].apps["app"].phase == "COMMITTED"
    finally:
        d.stop()


def test_rollout_controller_may_publish_releases_but_not_trust_roots(deployed: DeployedMosquitto) -> None:
    rc = parse_url(deployed.operator_url("rollout-controller"), ca_file=deployed.ca)
    with operator.Session(rc) as s:
        for topic in (f"{P}/releases/app/stable", f"{P}/rollouts/app/stable", f"{P}/trust/root"):
            s.client.publish(topic, b"x", qos=1, retain=True).wait_for_publish(5)
    with operator.Session(parse_url(deployed.operator_url(), ca_file=deployed.ca)) as s:
        seen = s.collect([f"{P}/#"], quiet_s=0.5)
    assert sorted(seen) == [f"{P}/releases/app/stable", f"{P}/rollouts/app/stable"]


def test_password_on_the_device_listener_is_refused_with_the_tls_reason(deployed: DeployedMosquitto) -> None:
    # An operator pointed at the devices' listener: no client certificate.
    s = parse_url(
        f"mqtts://operator:{DeployedMosquitto.PASSWORDS['operator']}@127.0.0.1:{deployed.device_port}",
        ca_file=deployed.ca,
    )
    t0 = time.monotonic()
    with pytest.raises(TransportError) as e, operator.Session(s, timeout_s=10):
        pass
    assert "no answer" not in str(e.value)
    assert "closed the connection" in str(e.value) and "client certificate" in str(e.value)
    assert time.monotonic() - t0 < 5  # told at once, not after the timeout


def test_untrusted_broker_certificate_is_named(tmp_path: Path, deployed: DeployedMosquitto) -> None:
    other = DeployedMosquitto(tmp_path / "other")  # another CA, never started
    s = parse_url(deployed.operator_url(), ca_file=other.ca)
    with pytest.raises(TransportError, match="certificate verify failed"), operator.Session(s):
        pass


def test_device_certificate_is_refused_on_the_operator_listener(deployed: DeployedMosquitto) -> None:
    cert, key = deployed.device_cert("operator")
    s = parse_url(
        f"mqtts://127.0.0.1:{deployed.operator_port}", ca_file=deployed.ca, cert_file=cert, key_file=key
    )
    with pytest.raises(TransportError, match="refused the connection"), operator.Session(s):
        pass
