"""The artifact directory and the MQTT artifact server.

An artifact directory is what ``devicerunner publish --dir DIR`` writes and
what both ``devicerunner serve-artifacts`` and any static HTTP host serve::

    DIR/<sha256>                  the module (HTTP: GET {base}/<sha256>, Range per chunk)
    DIR/<sha256>.manifest         its signed release manifest (chunk boundaries)
    DIR/releases/<app>/<channel>  the current release manifest
    DIR/rollouts/<app>/<channel>  the current rollout document
    DIR/trust/root                the current trust root
    DIR/trust/roots/<version>     every root version (a device walks the chain)

Every file is written atomically (temp, fsync, rename); the module is
streamed from the bundle, one block at a time. Nothing here is trusted by
a device: it verifies every document and chunk against the signatures.

The server answers, on each device's own topics (docs/mqtt.md):
- chunk requests ``{p}/devices/{id}/requests/artifacts`` ``{"sha256", "chunks"}``
  with one message per chunk on ``{p}/devices/{id}/artifacts/{sha256}/{i}``;
- document requests ``{p}/devices/{id}/requests/documents`` with the current
  root, and the release and rollout document of each (app, channel) asked for.
Several servers share the request topics through an MQTT 5 shared
subscription (``$share/dr-artifacts/...``), so the broker balances them.
Requests wait in a bounded queue (the oldest are dropped and counted when it
is full); a chunk is read from disk when it is sent, never the whole module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

import paho.mqtt.client as paho

from devicerunner.errors import DeviceRunnerError, MalformedError, TransportError, VerificationError
from devicerunner.runtime.fsutil import atomic_write, fsync_dir, makedirs
from devicerunner.transport import topics
from devicerunner.transport.mqtt import make_client, no_delay
from devicerunner.transport.settings import BrokerSettings
from devicerunner.trust import manifest
from devicerunner.trust.bundle import iter_chunks, read_header

log = logging.getLogger(__name__)

HEX64 = re.compile(r"[0-9a-f]{64}")
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
MAX_REQUEST_BYTES = 4096
MAX_CHUNKS_PER_REQUEST = 64
MAX_APPS_PER_REQUEST = 32
MAX_ROOT_STEPS = 16
"""Root versions sent after the one a device has, at most, per request."""


class ArtifactDir:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def module_path(self, sha256: str) -> Path:
        return self.root / sha256

    def manifest_path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.manifest"

    def add_bundle(self, path: Path, channel: str | None = None) -> manifest.Manifest:
        """Copy a bundle's module (streamed, verified on the way) and manifests in."""
        with open(path, "rb") as f:
            return self.add_bundle_file(f, channel)

    def add_bundle_file(self, f: BinaryIO, channel: str | None = None) -> manifest.Manifest:
        man, module_offset = read_header(f)
        m = manifest.parse_manifest(man)
        if channel is not None and channel != m.channel:
            raise MalformedError(f"the bundle is signed for channel {m.channel!r}, not {channel!r}")
        makedirs(self.root)
        f.seek(module_offset)
        _stream_verified(f, m, self.module_path(m.artifact.sha256))
        atomic_write(self.manifest_path(m.artifact.sha256), man)
        self.put_document(f"releases/{m.app}/{m.channel}", man)
        return m

    def put_document(self, kind: str, data: bytes) -> None:
        p = self.root / kind
        makedirs(p.parent)
        atomic_write(p, data)

    def document(self, kind: str) -> bytes | None:
        try:
            with open(self.root / kind, "rb") as f:
                data = f.read(manifest.MAX_MANIFEST_BYTES + 1)
        except OSError:
            return None
        return data if 0 < len(data) <= manifest.MAX_MANIFEST_BYTES else None


def _stream_verified(f: Any, m: manifest.Manifest, dest: Path) -> None:
    import hashlib

    whole = hashlib.sha256()
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with open(tmp, "wb") as out:
            start = f.tell()
            for _, data in iter_chunks(f, m, start):
                whole.update(data)
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if whole.hexdigest() != m.artifact.sha256:
            raise VerificationError("module sha256 differs from the manifest")
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class ArtifactServer:
    """Answers chunk and document requests from an ArtifactDir over MQTT."""

    def __init__(
        self,
        s: BrokerSettings,
        prefix: str,
        directory: Path,
        *,
        share: bool = True,
        group: str = topics.SERVER_GROUP,
        max_queue: int = 1000,
        client_id: str | None = None,
    ) -> None:
        self.s = s
        self.p = prefix
        self.dir = ArtifactDir(directory)
        self.share = share
        self.group = group
        self.requests: queue.Queue[tuple[str, str, bytes]] = queue.Queue(max_queue)
        self.stats = {"requests": 0, "chunks_sent": 0, "documents_sent": 0, "dropped": 0, "refused": 0}
        self._manifests: OrderedDict[str, manifest.Manifest | None] = OrderedDict()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self.client = make_client(s, client_id or f"dr-artifacts-{os.getpid()}-{time.time_ns() % 10**6}")
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self._worker = threading.Thread(target=self._work, name="dr-artifact-server", daemon=True)

    def filter(self) -> str:
        f = f"{self.p}/devices/+/requests/+"
        return f"$share/{self.group}/{f}" if self.share else f

    def start(self, timeout_s: float = 10.0) -> ArtifactServer:
        try:
            self.client.connect(self.s.host, self.s.port, self.s.keepalive_s)
        except OSError as e:
            raise TransportError(f"cannot connect to {self.s.url}: {e}") from e
        self.client.loop_start()
        if not self._connected.wait(timeout_s):
            self.stop()
            raise TransportError(f"no answer from {self.s.url} within {timeout_s:.0f} s")
        self._worker.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self.requests.put_nowait(("", "", b""))
        self.client.disconnect()
        self.client.loop_stop()
        if self._worker.is_alive():
            self._worker.join(5)

    def _on_connect(self, c: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        no_delay(c)
        c.subscribe(self.filter(), 1)  # again after every reconnect (clean session)

    def _on_subscribe(self, *_: Any) -> None:
        # Ready once the broker confirmed the subscription: a request published
        # before that (a device connecting at the same moment) would be lost on
        # a broker without retained messages.
        self._connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        parsed = topics.parse_request(self.p, msg.topic)
        if parsed is None or len(msg.payload) > MAX_REQUEST_BYTES:
            self.stats["refused"] += 1
            return
        item = (parsed[0], parsed[1], bytes(msg.payload))
        while True:  # full: drop the oldest request on purpose and count it
            try:
                self.requests.put_nowait(item)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self.requests.get_nowait()
                    self.stats["dropped"] += 1

    def _work(self) -> None:
        while not self._stop.is_set():
            device, kind, payload = self.requests.get()
            if self._stop.is_set():
                return
            self.stats["requests"] += 1
            try:
                body = json.loads(payload)
                if not isinstance(body, dict):
                    raise ValueError("not an object")
                if kind == "artifacts":
                    self._send_chunks(device, body)
                else:
                    self._send_documents(device, body)
            except (ValueError, TypeError, KeyError, DeviceRunnerError, OSError) as e:
                self.stats["refused"] += 1
                log.info("artifact server: refused a request from %s: %s", device, e)

    def _manifest(self, sha: str) -> manifest.Manifest | None:
        if sha in self._manifests:
            self._manifests.move_to_end(sha)
            return self._manifests[sha]
        try:
            m: manifest.Manifest | None = manifest.parse_manifest(self.dir.manifest_path(sha).read_bytes())
        except (OSError, VerificationError):
            m = None
        self._manifests[sha] = m
        while len(self._manifests) > 64:
            self._manifests.popitem(last=False)
        return m

    def _send_chunks(self, device: str, body: dict[str, Any]) -> None:
        sha, chunks = body["sha256"], body["chunks"]
        if not isinstance(sha, str) or not HEX64.fullmatch(sha):
            raise ValueError("sha256: 64 hex digits")
        if not isinstance(chunks, list) or len(chunks) > MAX_CHUNKS_PER_REQUEST:
            raise ValueError(f"chunks: a list of at most {MAX_CHUNKS_PER_REQUEST} indexes")
        m = self._manifest(sha)
        if m is None:
            raise ValueError(f"artifact {sha[:12]} is not here")
        with open(self.dir.module_path(sha), "rb") as f:
            for i in chunks:
                if type(i) is not int or not 0 <= i < len(m.artifact.chunks):
                    raise ValueError(f"chunk index {i!r} out of range")
                off, n = m.artifact.span(i)
                f.seek(off)
                data = f.read(n)
                info = self.client.publish(topics.artifact_response(self.p, device, sha, i), data, qos=1)
                self.stats["chunks_sent"] += 1
                if info.rc != paho.MQTT_ERR_SUCCESS:
                    raise TransportError(f"publish failed: {paho.error_string(info.rc)}")
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(10)  # one chunk in flight per request: bounded memory

    def _send_documents(self, device: str, body: dict[str, Any]) -> None:
        apps = body.get("apps", [])
        if not isinstance(apps, list) or len(apps) > MAX_APPS_PER_REQUEST:
            raise ValueError(f"apps: at most {MAX_APPS_PER_REQUEST}")
        kinds = ["root"]
        for a in apps:
            if not isinstance(a, dict):
                raise ValueError("apps: objects with app and channel")
            app, channel = a.get("app"), a.get("channel")
            if not (
                isinstance(app, str)
                and NAME.fullmatch(app)
                and isinstance(channel, str)
                and NAME.fullmatch(channel)
            ):
                raise ValueError("apps: bad app or channel name")
            kinds += [f"releases/{app}/{channel}", f"rollouts/{app}/{channel}"]
        sources = [(k, "trust/root" if k == "root" else k) for k in kinds]
        rv = body.get("root_version")
        if type(rv) is int and rv >= 0:  # the rotations it has not seen, so it can walk the chain
            # each on a topic of its own: the device keeps only the newest message
            # per topic, and v3 must not replace the v2 it needs to verify v3
            sources[1:1] = [
                (f"roots/{v}", f"trust/roots/{v}") for v in range(rv + 1, rv + 1 + MAX_ROOT_STEPS)
            ]
        for kind, path in sources:
            data = self.dir.document(path)
            if data is not None:
                self.client.publish(topics.document_response(self.p, device, kind), data, qos=1)
                self.stats["documents_sent"] += 1
