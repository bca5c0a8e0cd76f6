"""Request/response over MQTT, for brokers without usable retained messages
(Azure IoT Hub, AWS IoT Core's wildcard rule, RabbitMQ clusters, Event Grid's
64 KB retained cap).

The device publishes ``{"sha256": ..., "chunks": [indexes]}`` (QoS 1, not
retained) on ``{p}/devices/{id}/requests/artifacts`` and receives each chunk
on ``{p}/devices/{id}/artifacts/{sha256}/{index}`` — one subscription, inside
its own ACL namespace. At most ``window`` chunks are requested and not yet
received at any time, so a device never has more than ``window`` chunks in
flight towards it (per-connection rate limits, broker queues). Servers
(``devicerunner serve-artifacts``) share the request topics through an MQTT 5
shared subscription; any of them may answer.
"""

from __future__ import annotations

import json
import threading
from typing import Protocol

from devicerunner.transport import topics
from devicerunner.transport.sources.base import ArtifactSource, FetchJob, SourceError, wanted

DEFAULT_WINDOW = 8
MAX_WINDOW = 64


class Connection(Protocol):
    def subscribe(self, topics: list[str], qos: int = 1) -> None: ...
    def unsubscribe(self, topics: list[str]) -> None: ...
    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> object: ...


class RequestSource(ArtifactSource):
    name = "mqtt"

    def __init__(
        self,
        conn: Connection,
        prefix: str,
        device_id: str,
        window: int = DEFAULT_WINDOW,
        max_chunk_bytes: int | None = None,
    ) -> None:
        super().__init__(*(() if max_chunk_bytes is None else (max_chunk_bytes,)))
        if not 1 <= window <= MAX_WINDOW:
            raise SourceError("bad_config", f"request window must be 1..{MAX_WINDOW}, got {window}")
        self.conn = conn
        self.p = prefix
        self.id = device_id
        self.window = window
        self._jobs: dict[str, FetchJob] = {}
        self._asked: dict[str, set[int]] = {}
        self._lock = threading.Lock()

    def subscription(self) -> str:
        return topics.artifact_response(self.p, self.id, "+", "+")

    def _start(self, job: FetchJob) -> None:
        with self._lock:
            self._jobs[job.artifact_sha256] = job
            self._asked[job.artifact_sha256] = set()
        self._fill(job)

    def _fill(self, job: FetchJob) -> None:
        """Ask for more chunks while fewer than ``window`` are outstanding."""
        with self._lock:
            asked = self._asked.get(job.artifact_sha256)
            if asked is None:
                return
            missing = job.sink.missing()
            asked &= missing
            room = self.window - len(asked)
            if room < max(1, self.window // 2) and asked:
                return  # ask in batches, not one message per chunk
            new = [r.index for r in job.refs if r.index in missing and r.index not in asked][:room]
            asked.update(new)
        if new:
            self._ask(job, new)

    def _ask(self, job: FetchJob, indexes: list[int]) -> None:
        body = json.dumps({"sha256": job.artifact_sha256, "chunks": indexes}, separators=(",", ":"))
        self.conn.publish(topics.artifact_request(self.p, self.id), body.encode(), qos=1)

    def retry(self, job: FetchJob) -> None:
        """Nothing arrived for a while: ask again for what is outstanding."""
        with self._lock:
            asked = self._asked.get(job.artifact_sha256)
            if asked is None:
                return
            asked.clear()
        if wanted(job):
            self._fill(job)

    def _cancel(self, job: FetchJob) -> None:
        with self._lock:
            if self._jobs.get(job.artifact_sha256) is job:
                del self._jobs[job.artifact_sha256]
                self._asked.pop(job.artifact_sha256, None)

    def on_message(self, sha256: str, index_text: str, payload: bytes) -> bool:
        """A message on ``{p}/devices/{id}/artifacts/{sha}/{index}``."""
        with self._lock:
            job = self._jobs.get(sha256)
        if job is None or not index_text.isdigit():
            return False
        ref = job.by_index.get(int(index_text))
        if ref is None or ref.index not in job.sink.missing():
            return False  # a duplicate (two servers answered) or not ours
        took = self._deliver(job, ref, payload)
        if not job.ended:
            self._fill(job)
        return took
