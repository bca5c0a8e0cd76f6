"""One supervised MQTT connection (paho), with reconnection outside the client.

Invariants:
- paho's network I/O runs on this object's own thread (``client.loop``);
  callbacks only hand messages over (``on_message`` must not block).
- Reconnection is ours, not paho's: capped exponential backoff with *full
  jitter* (sleep uniform in [0, min(cap, base * 2^attempt)]), every attempt
  logged, so a broker restart does not bring the fleet back in lockstep.
- Subscriptions are remembered and renewed on every (re)connection (clean
  sessions: retained messages carry the state, nothing queues on the broker).
- paho return codes and socket errors are translated here into log lines
  and the ``connected`` state; nothing foreign escapes.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from devicerunner.transport.settings import BrokerSettings

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes, bool], None]
"""(topic, payload, retained)"""


def no_delay(client: paho.Client) -> None:
    """Disable Nagle: small MQTT packets (SUBSCRIBE, PUBACK, chunks' tails)
    otherwise wait out the peer's 40 ms delayed ACK, several times per update."""
    sock = client.socket()
    if isinstance(sock, socket.socket):  # TLS sockets are socket subclasses too
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_client(s: BrokerSettings, client_id: str) -> paho.Client:
    c = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311, clean_session=True
    )
    if s.username:
        c.username_pw_set(s.username, s.password)
    if s.tls:
        ctx = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
        if s.cert_file and s.key_file:
            ctx.load_cert_chain(str(s.cert_file), str(s.key_file))
        c.tls_set_context(ctx)
    c.max_inflight_messages_set(20)
    return c


class Connection:
    def __init__(
        self,
        settings: BrokerSettings,
        client_id: str,
        *,
        on_message: MessageHandler,
        on_connect: Callable[[], None] | None = None,
        will: tuple[str, bytes, int, bool] | None = None,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.client = make_client(settings, client_id)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=will[2], retain=will[3])
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self._handler = on_message
        self._user_on_connect = on_connect
        self._subs: dict[str, int] = {}
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self._stop = threading.Event()
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self._rng = rng or random.Random()
        self.lost_since: float | None = time.monotonic()
        self.connects: list[float] = []
        """Wall-clock times of successful (re)connections (for reports)."""
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{client_id}", daemon=True)

    # -- public ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        with contextlib.suppress(OSError, ValueError):
            self.client.disconnect()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def lost_s(self) -> float:
        since = self.lost_since
        return 0.0 if since is None else time.monotonic() - since

    def subscribe(self, topics: list[str], qos: int = 1) -> None:
        with self._lock:
            new = [t for t in topics if t not in self._subs]
            for t in new:
                self._subs[t] = qos
        if new and self.connected.is_set():
            for i in range(0, len(new), 100):
                self.client.subscribe([(t, qos) for t in new[i : i + 100]])

    def unsubscribe(self, topics: list[str]) -> None:
        with self._lock:
            gone = [t for t in topics if self._subs.pop(t, None) is not None]
        if gone and self.connected.is_set():
            for i in range(0, len(gone), 100):
                self.client.unsubscribe(gone[i : i + 100])

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False
    ) -> paho.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    # -- paho callbacks (network thread) ------------------------------------------

    def _on_connect(self, client: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        if rc.is_failure:
            log.warning("broker %s refused the connection: %s", self.settings.url, rc)
            return
        no_delay(client)
        self.connected.set()
        self.lost_since = None
        self.connects.append(time.time())
        with self._lock:
            subs = list(self._subs.items())
        for i in range(0, len(subs), 100):
            client.subscribe(subs[i : i + 100])
        log.info("connected to %s", self.settings.url)
        if self._user_on_connect is not None:
            self._user_on_connect()

    def _on_disconnect(self, _c: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        if self.connected.is_set():
            self.lost_since = time.monotonic()
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("disconnected from %s: %s", self.settings.url, rc)

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        try:
            self._handler(msg.topic, bytes(msg.payload), bool(msg.retain))
        except Exception:
            log.exception("message handler failed for %s", msg.topic)

    # -- supervision ------------------------------------------------------------------

    def backoff_s(self, attempt: int) -> float:
        return self._rng.uniform(0, min(self.backoff_max_s, self.backoff_min_s * 2**attempt))

    def _run(self) -> None:
        attempt = 0
        first = True
        while not self._stop.is_set():
            try:
                if first:
                    self.client.connect(self.settings.host, self.settings.port, self.settings.keepalive_s)
                    first = False
                else:
                    self.client.reconnect()
            except (OSError, ssl.SSLError, ValueError) as e:
                delay = self.backoff_s(attempt)
                log.info(
                    "connect to %s failed (%s); attempt %d, retrying in %.2f s",
                    self.settings.url,
                    e,
                    attempt + 1,
                    delay,
                )
                attempt += 1
                self._stop.wait(delay)
                continue
            while not self._stop.is_set():
                rc = self.client.loop(timeout=0.2)
                if rc != paho.MQTT_ERR_SUCCESS:
                    break
                if self.connected.is_set():
                    attempt = 0
            if self._stop.is_set():
                break
            if self.connected.is_set():  # loop failed without an on_disconnect
                self.connected.clear()
                self.lost_since = time.monotonic()
            delay = self.backoff_s(attempt)
            log.info("reconnecting to %s in %.2f s (attempt %d)", self.settings.url, delay, attempt + 1)
            attempt += 1
            self._stop.wait(delay)
