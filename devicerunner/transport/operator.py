"""Operator-side MQTT: publish releases and roots, clear unreferenced chunks,
read the fleet's status. Short-lived single clients (paho's own loop thread)."""

from __future__ import annotations

import contextlib
import hashlib
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
from devicerunner.transport import reports, topics
from devicerunner.transport.mqtt import FILTERS_PER_PACKET, make_client, no_delay
from devicerunner.transport.settings import BrokerSettings
from devicerunner.trust import bundle, manifest

WINDOW = 20
"""QoS 1 publishes in flight at once: a flat-out publisher overruns a broker's
queue for slow subscribers (Mosquitto drops past max_queued_messages)."""


class OperatorError(DeviceRunnerError):
    pass


class NotStoredError(OperatorError):
    """The broker acknowledged a retained publish but does not hold it."""


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
        # A callback that raises must not end paho's network thread (every later
        # publish would then time out): paho logs it and carries on.
        self.client.suppress_exceptions = True
        self._digests = False
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
            if msg.topic not in self.messages:
                # Only a topic not seen yet extends ``collect``: a device repeating
                # its own message cannot keep a listing open.
                self.last_message = time.monotonic()
            payload = bytes(msg.payload)
            # a read-back of chunks keeps digests, never the module
            self.messages[msg.topic] = hashlib.sha256(payload).digest() if self._digests else payload

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

    def read_back(
        self, expected: dict[str, bytes], filters: list[str], max_s: float = 5.0, digests: bool = False
    ) -> list[str]:
        """The topics of ``expected`` whose retained message the broker does not
        hold as published (missing or other bytes), read back by subscribing
        to ``filters``, then to each topic still missing by its exact name (RabbitMQ
        and AWS IoT Core deliver retained messages on exact subscriptions only).
        A broker that refuses a publish may still acknowledge it (Mosquitto drops
        a publish its ACL denies, silently, on MQTT 3.1.1): only reading it back
        shows it was stored. ``digests``: ``expected`` holds each payload's
        SHA-256, and only digests are kept."""
        with self._lock:
            self.messages = {}
            self._digests = digests
        try:
            bad = self._await(expected, filters, min(max_s, 2.0) if len(filters) < len(expected) else max_s)
            end = time.monotonic() + max_s
            for i in range(0, len(bad), FILTERS_PER_PACKET):
                if time.monotonic() >= end:
                    break
                batch = bad[i : i + FILTERS_PER_PACKET]
                self._await(
                    {t: expected[t] for t in batch}, batch, max(0.5, min(2.0, end - time.monotonic()))
                )
            with self._lock:
                return [t for t, p in expected.items() if self.messages.get(t) != p]
        finally:
            with self._lock:
                self._digests = False

    def _await(self, expected: dict[str, bytes], filters: list[str], max_s: float) -> list[str]:
        """Subscribe to ``filters`` until every topic of ``expected`` arrived as
        expected (or ``max_s``); the topics still missing."""
        self.client.subscribe([(f, 1) for f in filters])
        end = time.monotonic() + max_s
        while True:
            with self._lock:
                bad = [t for t, p in expected.items() if self.messages.get(t) != p]
            if not bad or time.monotonic() >= end:
                break
            time.sleep(0.02)
        self.client.unsubscribe(filters)
        return bad

    def check_stored(
        self, expected: dict[str, bytes], filters: list[str], what: str, size: int | None = None
    ) -> None:
        """Raise ``NotStoredError`` naming the first topic the broker does not hold.
        ``size``: the bytes to read back when ``expected`` holds digests."""
        digests = size is not None
        size = size if size is not None else sum(len(p) for p in expected.values())
        bad = self.read_back(expected, filters, max_s=5.0 + size / 500_000, digests=digests)
        if not bad:
            return
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        area = bad[0].rsplit("/", 2)[0] + "/#" if bad[0].count("/") >= 3 else bad[0]
        who = f"user {self.s.username!r}" if self.s.username else "this client"
        raise NotStoredError(
            f"the broker does not hold {what} at {bad[0]}{more} after acknowledging the publish: it most "
            f"likely refused it - check that its ACL lets {who} write (and read) {area} "
            "(Mosquitto drops a denied publish without telling the client; docs/operations.md)"
        )

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
    verify: bool = True,
    retain: bool = True,
) -> manifest.Manifest:
    """Chunks first (retained), then the manifest: no device ever sees a release
    whose chunks are missing. ``verify``: then read every one back from the
    broker (``NotStoredError`` names the first it does not hold). ``retain=False``
    (a broker without retained messages): the release only, live; the artifact
    servers hold the rest."""
    return publish_bundle_file(s, io.BytesIO(data), prefix, channel, progress, retain, verify)


def publish_bundle_file(
    s: BrokerSettings,
    f: BinaryIO,
    prefix: str,
    channel: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    retain: bool = True,
    verify: bool = True,
) -> manifest.Manifest:
    """``publish_bundle`` from an open bundle file, one chunk in memory at a time
    (the read-back compares chunk digests, never holds the module)."""
    man, module_offset = bundle.read_header(f)
    m = manifest.parse_manifest(man)
    if channel is not None and channel != m.channel:
        raise OperatorError(f"the bundle is signed for channel {m.channel!r}, not {channel!r} (re-sign it)")
    chunks = (
        (topics.chunk(prefix, m.artifact.sha256, i), data)
        for i, data in bundle.iter_chunks(f, m, module_offset)
    )
    release_topic = topics.release(prefix, m.app, m.channel)
    with Session(s) as sess:
        if retain:
            sess.publish_many(chunks, retain=True, progress=progress, total=len(m.artifact.chunks))
        sess.publish_many([(release_topic, man)], retain=retain)
        if verify and retain:
            chunk_filter = [topics.chunk(prefix, m.artifact.sha256, "+")]
            sess.check_stored(_chunk_digests(prefix, m), chunk_filter, "a chunk", size=m.artifact.size)
            sess.check_stored({release_topic: man}, [release_topic], "the release")
    return m


def _chunk_digests(prefix: str, m: manifest.Manifest) -> dict[str, bytes]:
    """Every chunk topic -> the sha256 (raw digest) its retained message must have."""
    return {
        topics.chunk(prefix, m.artifact.sha256, i): bytes.fromhex(h) for i, h in enumerate(m.artifact.chunks)
    }


def release_stored(s: BrokerSettings, data: bytes, prefix: str) -> bool:
    """Does the broker already hold exactly this release and every chunk of it
    (read back)? Then a rollout needs no write access to releases or artifacts:
    an operator published it (``devicerunner publish``)."""
    man, _module = bundle.unpack(data)
    m = manifest.parse_manifest(man)
    release_topic = topics.release(prefix, m.app, m.channel)
    with Session(s) as sess:
        if sess.read_back({release_topic: man}, [release_topic], max_s=1.0):
            return False
        missing = sess.read_back(
            _chunk_digests(prefix, m),
            [topics.chunk(prefix, m.artifact.sha256, "+")],
            2.0 + m.artifact.size / 500_000,
            digests=True,
        )
        return not missing


def publish_root(s: BrokerSettings, data: bytes, prefix: str, retain: bool = True) -> manifest.Root:
    root = manifest.parse_root(data)
    items = {topics.root_version(prefix, root.version): data, topics.root(prefix): data}
    with Session(s) as sess:
        sess.publish_many(list(items.items()), retain=retain)
        if retain:
            sess.check_stored(items, list(items), "the trust root")
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
    s: BrokerSettings,
    prefix: str,
    quiet_s: float = 0.5,
    spread_s: float = 2.0,
    reader: reports.Reader | None = None,
) -> dict[str, reports.DeviceStatus]:
    """Retained statuses, and the replies to a status request within ``spread_s``
    (``spread_s=0``: retained ones only; ~1 s per 1,000 devices keeps it gentle).
    A malformed status is skipped (``reader`` warns once per device)."""
    reader = reader or reports.Reader(prefix)
    with Session(s) as sess:
        msgs = sess.collect(
            [f"{prefix}/devices/+/status"],
            quiet_s=quiet_s,
            max_s=30 + spread_s,
            min_s=spread_s + quiet_s if spread_s > 0 else 0.0,
            then=(lambda: request_status(sess, prefix, spread_s)) if spread_s > 0 else None,
        )
    out: dict[str, reports.DeviceStatus] = {}
    for topic, payload in msgs.items():
        st = reader.read(topic, payload)
        if isinstance(st, reports.DeviceStatus):
            out[st.device] = st
    return out
