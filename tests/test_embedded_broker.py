"""The embedded broker (amqtt) behaves like MQTT says where a fleet on a flaky
link depends on it: take-over without a stale will, retained messages only
for a client's own subscriptions."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devicerunner.fleet.broker import EmbeddedBroker
from tests.brokers import free_port
from tests.conftest import until


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    b = EmbeddedBroker(port=free_port())
    b.start()
    yield b
    b.stop()


class Client:
    def __init__(self, b: EmbeddedBroker, client_id: str, **will: object) -> None:
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.c.on_message = self._on_message
        if will:
            self.c.will_set(**will)  # type: ignore[arg-type]
        self.b = b

    def _on_message(self, _c: object, _u: object, m: paho.MQTTMessage) -> None:
        with self.lock:
            self.got.append((m.topic, bytes(m.payload)))

    def start(self, keepalive: int = 30) -> Client:
        connected = threading.Event()
        self.c.on_connect = lambda *_: connected.set()
        self.c.connect(self.b.host, self.b.port, keepalive)
        self.c.loop_start()
        assert connected.wait(10)
        return self

    def topics(self) -> list[str]:
        with self.lock:
            return [t for t, _ in self.got]

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _retained(b: EmbeddedBroker, topic: str) -> bytes:
    reader = Client(b, "reader").start()
    try:
        reader.c.subscribe(topic, 1)
        assert until(lambda: bool(reader.got))
        return reader.got[-1][1]
    finally:
        reader.stop()


def test_a_stalled_connection_taken_over_does_not_publish_a_stale_will(broker: EmbeddedBroker) -> None:
    """A device whose link stalled reconnects with the same id and publishes
    "online"; amqtt used to publish the old connection's will ("offline",
    retained) when its keepalive ran out, seconds *after* that: fleet views
    showed committed devices as offline."""
    stale = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev-1", protocol=paho.MQTTv311)
    stale.will_set("s/dev-1", b"offline", qos=1, retain=True)
    stale.connect(broker.host, broker.port, keepalive=2)  # CONNECT sent; then silence (no loop): a stall
    sock = stale.socket()
    assert isinstance(sock, socket.socket)
    sock.settimeout(10)
    assert sock.recv(4)[:1] == b"\x20"  # CONNACK: the broker holds this connection now
    fresh = Client(broker, "dev-1", topic="s/dev-1", payload=b"offline", qos=1, retain=True).start()
    try:
        fresh.c.publish("s/dev-1", b"online", qos=1, retain=True).wait_for_publish(10)

        def old_link_closed() -> bool:  # the broker closes the old connection (at once, or at keepalive)
            sock.settimeout(0.1)
            try:
                while chunk := sock.recv(4096):
                    del chunk
                return True
            except TimeoutError:
                return False
            except OSError:
                return True

        assert until(old_link_closed, 10)
        time.sleep(0.5)  # a will, if any, is published as the old link closes
        assert _retained(broker, "s/dev-1") == b"online"
    finally:
        fresh.stop()
        sock.close()


def test_a_new_client_gets_retained_messages_only_for_its_own_subscriptions(broker: EmbeddedBroker) -> None:
    """amqtt sent every connecting client the retained messages of every filter any
    client had subscribed to: seconds of unsolicited chunks on a slow link, at
    every reconnect."""
    pub = Client(broker, "pub").start()
    watcher = Client(broker, "watcher").start()
    try:
        watcher.c.subscribe("big/#", 1)
        for i in range(5):
            pub.c.publish(f"big/{i}", b"x" * 4096, qos=1, retain=True).wait_for_publish(10)
        pub.c.publish("mine/1", b"hello", qos=1, retain=True).wait_for_publish(10)
        assert until(lambda: len(watcher.got) >= 5)
        newcomer = Client(broker, "newcomer").start()
        try:
            newcomer.c.subscribe("mine/#", 1)
            assert until(lambda: "mine/1" in newcomer.topics())
            # retained messages of other clients' filters would have come first
            assert newcomer.topics() == ["mine/1"]
        finally:
            newcomer.stop()
    finally:
        pub.stop()
        watcher.stop()
