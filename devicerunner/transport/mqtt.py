"""One supervised MQTT connection (paho), with reconnection outside the client.

Invariants:
- Network I/O runs on the runtime's shared I/O loop (transport/ioloop.py),
  connecting on the connection's own lane of the runtime's ``connect``
  executor (it blocks): no thread of its own,
  so a process can hold a thousand of them. Callbacks run on the I/O loop
  and only hand messages over (``on_message`` must not block).
- Reconnection is ours, not paho's: capped exponential backoff with *full
  jitter* (sleep uniform in [0, min(cap, base * 2^attempt)]), every attempt
  logged, so a broker restart does not bring the fleet back in lockstep.
  The back-off resets only once a connection has stayed up ``stable_s``: a
  broker that accepts and then drops us (a duplicate client id kicked by its
  twin, an ACL refusing the first subscribe) gets ever longer pauses, not a
  reconnect storm. ``backoff_min_s`` must be > 0 and <= ``backoff_max_s``.
- At most one (re)connection is scheduled at a time, however many ways the
  loss is reported (``on_disconnect``, a failed read, a keepalive timeout).
- Subscriptions are remembered and renewed on every (re)connection (clean
  sessions: retained messages carry the state, nothing queues on the broker).
- paho return codes and socket errors are translated here into log lines
  and the ``connected`` state; nothing foreign escapes.
- With ``max_packet_bytes`` set, paho reads through a ``PacketGuard``
  (transport/guard.py): no packet larger than that is ever buffered. With
  MQTT 5 the bound is also announced in CONNECT (Maximum Packet Size).
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from devicerunner.runtime.lanes import Timer
from devicerunner.runtime.process import Runtime
from devicerunner.transport.guard import GuardedClient, OversizeHandler, raw_socket
from devicerunner.transport.ioloop import IoLoop
from devicerunner.transport.settings import BrokerSettings

log = logging.getLogger(__name__)
STABLE_S = 10.0
"""A connection that lasted this long was a working one: the back-off starts over."""

MAX_CONNECTS_KEPT = 64
FILTERS_PER_PACKET = 8
"""Topic filters per SUBSCRIBE/UNSUBSCRIBE packet: AWS IoT Core refuses more
than 8 in one packet; other brokers take any number, so 8 costs little."""

MessageHandler = Callable[[str, bytes, bool], None]
"""(topic, payload, retained)"""


def no_delay(client: paho.Client) -> None:
    """Disable Nagle: small MQTT packets (SUBSCRIBE, PUBACK, chunks' tails)
    otherwise wait out the peer's 40 ms delayed ACK, several times per update."""
    sock = raw_socket(client.socket())
    if sock is not None:  # TLS sockets are socket subclasses too
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_client(s: BrokerSettings, client_id: str, on_oversize: OversizeHandler | None = None) -> paho.Client:
    if s.protocol == "5":
        c: paho.Client = GuardedClient(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    else:
        c = GuardedClient(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311, clean_session=True
        )
    if isinstance(c, GuardedClient):
        c.max_packet_bytes = s.max_packet_bytes
        c.on_oversize = on_oversize
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
        stable_s: float = STABLE_S,
        rng: random.Random | None = None,
        runtime: Runtime | None = None,
        on_oversize: OversizeHandler | None = None,
    ) -> None:
        if not 0 < backoff_min_s <= backoff_max_s:
            raise ValueError(f"need 0 < backoff_min_s <= backoff_max_s, got {backoff_min_s}, {backoff_max_s}")
        self.settings = settings
        self.client = make_client(settings, client_id, on_oversize)
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
        self.connects: deque[float] = deque(maxlen=MAX_CONNECTS_KEPT)
        """Wall-clock times of the latest successful (re)connections (bounded; for reports)."""
        self._own_runtime = runtime is None
        self.runtime = runtime or Runtime(name=f"mqtt-{client_id}")
        host = self.runtime.hosts_io  # not inside the factory: shared() holds the runtime's lock
        self._io = self.runtime.shared("io", lambda name: IoLoop(name, host=host), IoLoop)
        self._lane = self.runtime.connect.lane(f"mqtt-{client_id}")
        self._attempt = 0
        self.stable_s = stable_s
        self._up_since: float | None = None
        self._first = True
        self._scheduled: Timer | None = None
        self._socket_closed = threading.Event()
        self._socket_closed.set()
        self._io.attach(self)

    # -- public ---------------------------------------------------------------

    def start(self) -> None:
        self._lane.post(self._connect)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._lane.close(timeout_s)  # drops a scheduled reconnect; waits for one in progress
        with contextlib.suppress(OSError, ValueError):
            self.client.disconnect()  # sent by the I/O loop, which then closes the socket
        if not self._socket_closed.wait(timeout_s):
            self._io.call(self._force_close)
        if self._own_runtime:
            self.runtime.close()

    def lost_s(self) -> float:
        since = self.lost_since
        return 0.0 if since is None else time.monotonic() - since

    def subscribe(self, topics: list[str], qos: int = 1) -> None:
        with self._lock:
            new = [t for t in topics if t not in self._subs]
            for t in new:
                self._subs[t] = qos
        if new and self.connected.is_set():
            for i in range(0, len(new), FILTERS_PER_PACKET):
                self.client.subscribe([(t, qos) for t in new[i : i + FILTERS_PER_PACKET]])

    def wants(self, topic: str) -> bool:
        """Is ``topic`` one this connection subscribed to (exact topics only)?
        Brokers' wildcard matching and stale deliveries are not trusted."""
        with self._lock:
            return topic in self._subs

    def refresh(self, topics: list[str], qos: int = 1) -> None:
        """Subscribe again to topics already subscribed: the broker re-sends their retained messages."""
        with self._lock:
            known = [t for t in topics if t in self._subs]
        if known and self.connected.is_set():
            self.client.subscribe([(t, qos) for t in known])

    def unsubscribe(self, topics: list[str]) -> None:
        with self._lock:
            gone = [t for t in topics if self._subs.pop(t, None) is not None]
        if gone and self.connected.is_set():
            for i in range(0, len(gone), FILTERS_PER_PACKET):
                self.client.unsubscribe(gone[i : i + FILTERS_PER_PACKET])

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False
    ) -> paho.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    # -- paho callbacks (I/O loop) ------------------------------------------------

    def _on_connect(self, client: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        if rc.is_failure:
            log.warning("broker %s refused the connection: %s", self.settings.url, rc)
            return
        no_delay(client)
        self.connected.set()
        self.lost_since = None
        self._up_since = time.monotonic()  # the back-off resets in _lost, if this lasts
        self.connects.append(time.time())
        with self._lock:
            subs = list(self._subs.items())
        for i in range(0, len(subs), FILTERS_PER_PACKET):
            client.subscribe(subs[i : i + FILTERS_PER_PACKET])
        log.info("connected to %s", self.settings.url)
        if self._user_on_connect is not None:
            self._user_on_connect()

    def _on_disconnect(self, _c: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        self._lost(f"disconnected: {rc}")

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        try:
            self._handler(msg.topic, bytes(msg.payload), bool(msg.retain))
        except Exception:
            log.exception("message handler failed for %s", msg.topic)

    # -- I/O loop ------------------------------------------------------------------------

    def socket_state(self, is_open: bool) -> None:
        if is_open:
            self._socket_closed.clear()
        else:
            self._socket_closed.set()

    def io_failed(self, rc: int) -> None:
        if not self._socket_closed.is_set():  # paho kept the socket: let it go, or we never reconnect
            self._force_close()
        self._lost(f"connection lost: {paho.error_string(rc)}")

    # -- supervision ------------------------------------------------------------------

    def backoff_s(self, attempt: int) -> float:
        return self._rng.uniform(0, min(self.backoff_max_s, self.backoff_min_s * 2**attempt))

    def _lost(self, why: str) -> None:
        if self.connected.is_set():
            self.lost_since = time.monotonic()
            up, self._up_since = self._up_since, None
            if up is not None and self.lost_since - up >= self.stable_s:
                self._attempt = 0  # it was a working connection: start over quickly
            self.connected.clear()
            if not self._stop.is_set():
                log.warning("%s from %s", why, self.settings.url)
        self._retry_later()

    def _retry_later(self) -> None:
        with self._lock:
            # Once: a loss is reported by on_disconnect *and* the failed read, and a
            # connection attempt already under way (its socket open) must not be cut.
            if self._stop.is_set() or self._scheduled is not None or not self._socket_closed.is_set():
                return
            delay = self.backoff_s(self._attempt)
            self._attempt += 1
            log.info("reconnecting to %s in %.2f s (attempt %d)", self.settings.url, delay, self._attempt)
            self._scheduled = self._lane.call_later(delay, self._connect)

    def _connect(self) -> None:
        with self._lock:
            self._scheduled = None
        if self._stop.is_set():
            return
        try:
            if self._first:
                if self.settings.protocol == "5":
                    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                    if self.settings.max_packet_bytes:
                        props.MaximumPacketSize = self.settings.max_packet_bytes
                    self.client.connect(
                        self.settings.host,
                        self.settings.port,
                        self.settings.keepalive_s,
                        clean_start=True,
                        properties=props,
                    )
                else:
                    self.client.connect(self.settings.host, self.settings.port, self.settings.keepalive_s)
                self._first = False
            else:
                self.client.reconnect()
        except (OSError, ssl.SSLError, ValueError) as e:
            log.info("connect to %s failed (%s)", self.settings.url, e)
            self._retry_later()

    def _force_close(self) -> None:
        sock = self.client.socket()
        if sock is not None and raw_socket(sock) is not None:
            self._io.drop(sock)  # type: ignore[arg-type]
            with contextlib.suppress(OSError):
                sock.close()
        self._socket_closed.set()
