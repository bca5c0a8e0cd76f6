"""Retained chunks: ``{p}/artifacts/{sha256}/{index}``, one retained message
per chunk, published by the operator before the release (unchanged on the
wire). The device subscribes to *missing* chunks' topics only, at most
``window`` at a time (the broker sends a retained message the moment it is
subscribed to, so subscribing to all 800 chunks of a 30 MB module would put
all of it in flight towards the device at once), and drops each
subscription once the chunk is held, so nothing held is fetched twice.

Needs a broker that keeps retained messages and delivers them on exact-topic
subscriptions (Mosquitto, EMQX, HiveMQ, amqtt, RabbitMQ on one node).
"""

from __future__ import annotations

import threading
from typing import Protocol

from devicerunner.errors import ArtifactMismatchError
from devicerunner.transport import topics
from devicerunner.transport.sources.base import ArtifactSource, FetchJob, wanted

DEFAULT_WINDOW = 16


class Subscriber(Protocol):
    def subscribe(self, topics: list[str], qos: int = 1) -> None: ...
    def unsubscribe(self, topics: list[str]) -> None: ...


class RetainedSource(ArtifactSource):
    name = "retained"

    def __init__(
        self, conn: Subscriber, prefix: str, window: int = DEFAULT_WINDOW, max_chunk_bytes: int | None = None
    ) -> None:
        super().__init__(*(() if max_chunk_bytes is None else (max_chunk_bytes,)))
        self.conn = conn
        self.p = prefix
        self.window = max(1, window)
        self._jobs: dict[str, FetchJob] = {}
        self._subscribed: dict[str, set[int]] = {}
        self._lock = threading.Lock()

    def _topic(self, job: FetchJob, index: int) -> str:
        return topics.chunk(self.p, job.artifact_sha256, index)

    def _start(self, job: FetchJob) -> None:
        with self._lock:
            self._jobs[job.artifact_sha256] = job
            self._subscribed[job.artifact_sha256] = set()
        self._fill(job)

    def _fill(self, job: FetchJob) -> None:
        """Subscribe to more missing chunks while fewer than ``window`` are outstanding."""
        with self._lock:
            subs = self._subscribed.get(job.artifact_sha256)
            if subs is None:
                return
            subs &= job.sink.missing()
            room = self.window - len(subs)
            if room < max(1, self.window // 2) and subs:
                return  # subscribe in batches, not one SUBSCRIBE per chunk
            new = [r.index for r in wanted(job) if r.index not in subs][:room]
            subs.update(new)
        if new:
            self.conn.subscribe([self._topic(job, i) for i in new])

    def retry(self, job: FetchJob) -> None:
        """Re-subscribe: the broker sends the retained messages again."""
        with self._lock:
            subs = sorted(self._subscribed.get(job.artifact_sha256, ()))
        t = [self._topic(job, i) for i in subs]
        if t:
            self.conn.unsubscribe(t)
            self.conn.subscribe(t)
        else:
            self._fill(job)

    def _bad_chunk(self, job: FetchJob, error: ArtifactMismatchError) -> None:
        """Anyone may publish on a chunk topic: a chunk that does not match is
        dropped and the download keeps waiting for the genuine one (republished,
        or sent again when the stall retry subscribes again)."""

    def _cancel(self, job: FetchJob) -> None:
        with self._lock:
            if self._jobs.get(job.artifact_sha256) is not job:
                return
            del self._jobs[job.artifact_sha256]
            subs = self._subscribed.pop(job.artifact_sha256, set())
        if subs:
            self.conn.unsubscribe([self._topic(job, i) for i in sorted(subs)])

    def on_message(self, topic: str, payload: bytes) -> bool:
        """A message on ``{p}/artifacts/...``; False when it is nobody's chunk."""
        parsed = topics.parse_chunk(self.p, topic)
        if parsed is None:
            return False
        sha, index = parsed
        with self._lock:
            job = self._jobs.get(sha)
        if job is None or index not in job.sink.missing():
            return False  # not ours, or a duplicate delivery
        ref = job.by_index.get(index)
        if ref is None:
            return False
        took = self._deliver(job, ref, payload)
        if took:
            self.conn.unsubscribe([topic])
            with self._lock:
                self._subscribed.get(sha, set()).discard(index)
        if not job.ended:
            self._fill(job)
        return took
