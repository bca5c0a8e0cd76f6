"""Operator-side MQTT: publish releases and roots, clear unreferenced chunks,
read the fleet's status. Short-lived single clients (paho's own loop thread)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO, TextIO

import paho.mqtt.client as paho

from devicerunner.errors import DeviceRunnerError, TransportError
from devicerunner.transport import topics
from devicerunner.transport.mqtt import make_client, no_delay
from devicerunner.transport.settings import BrokerSettings
from devicerunner.trust import bundle, manifest

WINDOW = 20
"""QoS 1 publishes in flight at once: a flat-out publisher overruns a broker's
queue for slow subscribers (Mosquitto drops past max_queued_messages)."""


class OperatorError(DeviceRunnerError):
    pass


class Session:
    """A connected operator client; use as a context manager."""

    def __init__(self, s: BrokerSettings, client_id: str | None = None, timeout_s: float = 10.0) -> None:
        self.s = s
        self.client = make_client(s, client_id or f"dr-op-{time.time_ns() % 10**9}")
        self.timeout_s = timeout_s
        self._connected = threading.Event()
        self._rc: Any = None
        self.messages: dict[str, bytes] = {}
        self.last_message = 0.0
        self._lock = threading.Lock()
        self._closed: str | None = None
        self._socket_error: str | None = None
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.on_log = self._on_log
        self.client.on_subscribe = self._on_subscribe
        self._subacks = threading.Condition()
        self._acked: set[int] = set()

    def _on_connect(self, c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        no_delay(c)
        self._rc = rc
        self._connected.set()

    def _on_log(self, _c: Any, _u: Any, level: int, text: str) -> None:
        # paho reports why a socket failed (a TLS alert, an EOF) only in its log.
        if level == paho.MQTT_LOG_ERR and self._socket_error is None:
            self._socket_error = text

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if not self._connected.is_set():
            self._closed = self._socket_error or str(rc)
            self._connected.set()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        with self._subacks:
            self._acked.add(mid)
            self._subacks.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages[msg.topic] = bytes(msg.payload)
            self.last_message = time.monotonic()

    def __enter__(self) -> Session:
        try:
            self.client.connect(self.s.host, self.s.port, self.s.keepalive_s)
        except OSError as e:
            raise TransportError(f"cannot connect to {self.s.url}: {e}") from e
        self.client.loop_start()
        if not self._connected.wait(self.timeout_s):
            self.__exit__()
            raise TransportError(f"no answer from {self.s.url} within {self.timeout_s:.0f} s")
        if self._closed is not None:
            self.__exit__()
            raise TransportError(self._closed_reason(self._closed))
        if self._rc is not None and self._rc.is_failure:
            self.__exit__()
            raise TransportError(f"{self.s.url} refused the connection: {self._rc}")
        return self

    def _closed_reason(self, why: str) -> str:
        msg = f"{self.s.url} closed the connection before accepting it: {why}"
        if self.s.tls and self.s.cert_file is None:
            msg += (
                " (a listener that requires a client certificate closes the TLS session of a client"
                " without one: pass --cert-file/--key-file, or use the password listener)"
            )
        return msg

    def __exit__(self, *_: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish_many(
        self,
        items: Iterable[tuple[str, bytes]],
        *,
        retain: bool,
        progress: Callable[[int, int], None] | None = None,
        total: int | None = None,
    ) -> None:
        """Publish with at most WINDOW unacknowledged messages; raises on failure.
        ``items`` may be a generator: only WINDOW payloads are held at once."""
        inflight: list[paho.MQTTMessageInfo] = []
        done = 0
        if total is None:
            items = list(items)
            total = len(items)
        for topic, payload in items:
            info = self.client.publish(topic, payload, qos=1, retain=retain)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise TransportError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
            inflight.append(info)
            if len(inflight) >= WINDOW:
                self._wait(inflight.pop(0), topic)
                done += 1
                if progress:
                    progress(done, total)
        for info in inflight:
            self._wait(info, "")
            done += 1
            if progress:
                progress(done, total)

    def _wait(self, info: paho.MQTTMessageInfo, topic: str) -> None:
        try:
            info.wait_for_publish(self.timeout_s)
        except (RuntimeError, ValueError) as e:
            raise TransportError(f"publish {topic} failed: {e}") from e
        if not info.is_published():
            raise TransportError(f"broker did not acknowledge a publish within {self.timeout_s:.0f} s")

    def collect(
        self,
        filters: list[str],
        quiet_s: float = 0.5,
        max_s: float = 5.0,
        min_s: float = 0.0,
        then: Callable[[], None] | None = None,
    ) -> dict[str, bytes]:
        """Messages under ``filters`` (retained, and live ones after ``then``
        ran): until none arrived for ``quiet_s``, and for ``min_s`` at least."""
        start = time.monotonic()
        with self._lock:
            self.messages = {}  # only what arrives for these filters
        self.last_message = start
        info = self.client.subscribe([(f, 1) for f in filters])
        if then is not None:
            self.wait_subscribed(info)
            then()
        while time.monotonic() - start < max_s and (
            time.monotonic() - self.last_message < quiet_s or time.monotonic() - start < min_s
        ):
            time.sleep(0.05)
        self.client.unsubscribe(filters)
        with self._lock:
            return dict(self.messages)

    def wait_subscribed(self, info: tuple[int, int | None]) -> None:
        """Wait (bounded) until the broker acknowledged a SUBSCRIBE."""
        rc, mid = info
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise TransportError(f"subscribe failed: {paho.error_string(rc)}")
        with self._subacks:
            self._subacks.wait_for(lambda: mid in self._acked, self.timeout_s)


def progress_bar(out: TextIO = sys.stderr, label: str = "chunks") -> Callable[[int, int], None]:
    tty = out.isatty()
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if not tty and done != total:
            return
        if done != total and now - last[0] < 0.05:
            return
        last[0] = now
        width = 30
        filled = width * done // max(1, total)
        end = "\n" if done == total else ""
        out.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label}{end}")
        out.flush()

    return show


def publish_bundle(
    s: BrokerSettings,
    data: bytes,
    prefix: str,
    channel: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    retain: bool = True,
) -> manifest.Manifest:
    """Chunks first (retained), then the manifest: no device ever sees a release
    whose chunks are missing. ``retain=False`` (a broker without retained
    messages): the release only, live; the artifact servers hold the rest."""
    return publish_bundle_file(s, io.BytesIO(data), prefix, channel, progress, retain)


def publish_bundle_file(
    s: BrokerSettings,
    f: BinaryIO,
    prefix: str,
    channel: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    retain: bool = True,
) -> manifest.Manifest:
    """``publish_bundle`` from an open bundle file, one chunk in memory at a time."""
    man, module_offset = bundle.read_header(f)
    m = manifest.parse_manifest(man)
    if channel is not None and channel != m.channel:
        raise OperatorError(f"the bundle is signed for channel {m.channel!r}, not {channel!r} (re-sign it)")
    chunks = (
        (topics.chunk(prefix, m.artifact.sha256, i), data)
        for i, data in bundle.iter_chunks(f, m, module_offset)
    )
    with Session(s) as sess:
        if retain:
            sess.publish_many(chunks, retain=True, progress=progress, total=len(m.artifact.chunks))
        sess.publish_many([(topics.release(prefix, m.app, m.channel), man)], retain=retain)
    return m


def publish_root(s: BrokerSettings, data: bytes, prefix: str, retain: bool = True) -> manifest.Root:
    root = manifest.parse_root(data)
    with Session(s) as sess:
        sess.publish_many(
            [(topics.root_version(prefix, root.version), data), (topics.root(prefix), data)], retain=retain
        )
    return root


def gc(s: BrokerSettings, prefix: str, dry_run: bool = False) -> tuple[int, int]:
    """Clear retained chunks that no current release references; (kept, removed)."""
    with Session(s) as sess:
        releases = sess.collect([f"{prefix}/releases/+/+"])
        referenced = set()
        for payload in releases.values():
            if payload:
                with contextlib.suppress(DeviceRunnerError):
                    referenced.add(manifest.parse_manifest(payload).artifact.sha256)
        chunks = sess.collect([f"{prefix}/artifacts/+/+"], quiet_s=1.0, max_s=60)
        # Only chunk topics are ever cleared, whatever else a loose broker delivers.
        held: dict[str, str] = {}
        for t, p in chunks.items():
            parsed = topics.parse_chunk(prefix, t)
            if p and parsed is not None:
                held[t] = parsed[0]
        stale = [t for t, sha in held.items() if sha not in referenced]
        if not dry_run:
            sess.publish_many([(t, b"") for t in stale], retain=True)
    return len(held) - len(stale), len(stale)


def request_status(sess: Session, prefix: str, spread_s: float) -> None:
    """Ask every device for its status (brokers that never deliver retained
    statuses on a wildcard, e.g. RabbitMQ, AWS IoT Core): each answers after
    a random delay in [0, spread_s], so N devices send N/spread_s a second."""
    body = json.dumps({"spread_s": spread_s, "nonce": os.urandom(8).hex()}).encode()
    sess.publish_many([(topics.status_request(prefix), body)], retain=False)


def fleet_status(
    s: BrokerSettings, prefix: str, quiet_s: float = 0.5, spread_s: float = 2.0
) -> dict[str, dict[str, Any]]:
    """Retained statuses, and the replies to a status request within ``spread_s``
    (``spread_s=0``: retained ones only; ~1 s per 1,000 devices keeps it gentle)."""
    with Session(s) as sess:
        msgs = sess.collect(
            [f"{prefix}/devices/+/status"],
            quiet_s=quiet_s,
            max_s=30 + spread_s,
            min_s=spread_s + quiet_s if spread_s > 0 else 0.0,
            then=(lambda: request_status(sess, prefix, spread_s)) if spread_s > 0 else None,
        )
    out: dict[str, dict[str, Any]] = {}
    for topic, payload in msgs.items():
        msg = topics.parse_device_message(prefix, topic, payload)
        if msg is not None and msg[1] == "status":
            out[msg[0]] = msg[2]
    return out
