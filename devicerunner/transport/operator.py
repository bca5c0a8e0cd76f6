"""Operator-side MQTT: publish releases and roots, clear unreferenced chunks,
read the fleet's status. Short-lived single clients (paho's own loop thread)."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import paho.mqtt.client as paho

from devicerunner.errors import DeviceRunnerError, TransportError
from devicerunner.transport import reports, topics
from devicerunner.transport.mqtt import make_client, no_delay
from devicerunner.transport.settings import BrokerSettings
from devicerunner.trust import bundle, manifest
from devicerunner.trust import verify as trust

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

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            if msg.topic not in self.messages:
                # Only a topic not seen yet extends ``collect``: a device repeating
                # its own message cannot keep a listing open.
                self.last_message = time.monotonic()
            self.messages[msg.topic] = bytes(msg.payload)

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
        items: list[tuple[str, bytes]],
        *,
        retain: bool,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Publish with at most WINDOW unacknowledged messages; raises on failure."""
        inflight: list[paho.MQTTMessageInfo] = []
        done = 0
        for topic, payload in items:
            info = self.client.publish(topic, payload, qos=1, retain=retain)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise TransportError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
            inflight.append(info)
            if len(inflight) >= WINDOW:
                self._wait(inflight.pop(0), topic)
                done += 1
                if progress:
                    progress(done, len(items))
        for info in inflight:
            self._wait(info, "")
            done += 1
            if progress:
                progress(done, len(items))

    def _wait(self, info: paho.MQTTMessageInfo, topic: str) -> None:
        try:
            info.wait_for_publish(self.timeout_s)
        except (RuntimeError, ValueError) as e:
            raise TransportError(f"publish {topic} failed: {e}") from e
        if not info.is_published():
            raise TransportError(f"broker did not acknowledge a publish within {self.timeout_s:.0f} s")

    def read_back(self, expected: dict[str, bytes], filters: list[str], max_s: float = 5.0) -> list[str]:
        """The topics of ``expected`` whose retained message the broker does not
        hold as published (missing or other bytes), read back by subscribing
        to ``filters``. A broker that refuses a publish may still acknowledge
        it (Mosquitto drops a publish its ACL denies, silently, on MQTT 3.1.1):
        only reading it back shows it was stored."""
        with self._lock:
            self.messages = {}
        self.client.subscribe([(f, 1) for f in filters])
        end = time.monotonic() + max_s
        bad = list(expected)
        while True:
            with self._lock:
                bad = [t for t, p in expected.items() if self.messages.get(t) != p]
            if not bad or time.monotonic() >= end:
                break
            time.sleep(0.05)
        self.client.unsubscribe(filters)
        return bad

    def check_stored(self, expected: dict[str, bytes], filters: list[str], what: str) -> None:
        """Raise ``NotStoredError`` naming the first topic the broker does not hold."""
        size = sum(len(p) for p in expected.values())
        bad = self.read_back(expected, filters, max_s=5.0 + size / 500_000)
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

    def collect(self, filters: list[str], quiet_s: float = 0.5, max_s: float = 5.0) -> dict[str, bytes]:
        """Retained messages under ``filters``: until none arrived for ``quiet_s``."""
        start = time.monotonic()
        with self._lock:
            self.messages = {}  # only what arrives for these filters
        self.last_message = start
        self.client.subscribe([(f, 1) for f in filters])
        while time.monotonic() - start < max_s and time.monotonic() - self.last_message < quiet_s:
            time.sleep(0.05)
        self.client.unsubscribe(filters)
        with self._lock:
            return dict(self.messages)


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
) -> manifest.Manifest:
    """Chunks first (retained), then the manifest: no device ever sees a release
    whose chunks are missing. ``verify``: then read every one back from the
    broker (``NotStoredError`` names the first it does not hold)."""
    man, module = bundle.unpack(data)
    m = manifest.parse_manifest(man)
    if channel is not None and channel != m.channel:
        raise OperatorError(f"the bundle is signed for channel {m.channel!r}, not {channel!r} (re-sign it)")
    trust.verify_artifact(m, module)  # never publish a corrupt bundle
    chunks = _chunks(prefix, m, module)
    release_topic = topics.release(prefix, m.app, m.channel)
    with Session(s) as sess:
        sess.publish_many(chunks, retain=True, progress=progress)
        sess.publish_many([(release_topic, man)], retain=True)
        if verify:
            sess.check_stored(dict(chunks), [topics.chunk(prefix, m.artifact.sha256, "+")], "a chunk")
            sess.check_stored({release_topic: man}, [release_topic], "the release")
    return m


def _chunks(prefix: str, m: manifest.Manifest, module: bytes) -> list[tuple[str, bytes]]:
    cs = m.artifact.chunk_size
    return [
        (topics.chunk(prefix, m.artifact.sha256, i), module[i * cs : (i + 1) * cs])
        for i in range(len(m.artifact.chunks))
    ]


def release_stored(s: BrokerSettings, data: bytes, prefix: str) -> bool:
    """Does the broker already hold exactly this release and every chunk of it
    (read back)? Then a rollout needs no write access to releases or artifacts:
    an operator published it (``devicerunner publish``)."""
    man, module = bundle.unpack(data)
    m = manifest.parse_manifest(man)
    release_topic = topics.release(prefix, m.app, m.channel)
    with Session(s) as sess:
        if sess.read_back({release_topic: man}, [release_topic], max_s=1.0):
            return False
        chunks = dict(_chunks(prefix, m, module))
        size = sum(len(p) for p in chunks.values())
        missing = sess.read_back(chunks, [topics.chunk(prefix, m.artifact.sha256, "+")], 2.0 + size / 500_000)
        return not missing


def publish_root(s: BrokerSettings, data: bytes, prefix: str) -> manifest.Root:
    root = manifest.parse_root(data)
    items = {topics.root_version(prefix, root.version): data, topics.root(prefix): data}
    with Session(s) as sess:
        sess.publish_many(list(items.items()), retain=True)
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


def fleet_status(
    s: BrokerSettings, prefix: str, quiet_s: float = 0.5, reader: reports.Reader | None = None
) -> dict[str, reports.DeviceStatus]:
    """Every device's retained status; a malformed one is skipped (``reader`` warns once)."""
    reader = reader or reports.Reader(prefix)
    with Session(s) as sess:
        msgs = sess.collect([f"{prefix}/devices/+/status"], quiet_s=quiet_s, max_s=30)
    out: dict[str, reports.DeviceStatus] = {}
    for topic, payload in msgs.items():
        st = reader.read(topic, payload)
        if isinstance(st, reports.DeviceStatus):
            out[st.device] = st
    return out
