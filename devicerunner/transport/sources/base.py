"""The one interface every artifact source implements, and the rules the
base class enforces for all of them.

A source is told which chunks a download still misses (``FetchJob``) and
hands each chunk it obtains to the job's ``Sink`` (update/downloads), which
verifies it against the signed manifest and persists it. A source pins
nothing: the manifest says *what*, a source only says *where*.

The base class (not each source) makes sure that:
- a chunk is never longer than the manifest says, nor than MAX_CHUNK, before
  the sink sees it (``_deliver``), and a wrong-length chunk fails the source;
- foreign errors (OSError, urllib3's, paho's) become ``SourceError`` with a
  reason, once, here (``_guard``);
- a source reports the end of its attempt exactly once (``_finish``):
  done (every chunk delivered) or failed with an error, so the download can
  fall back to the next source.

Sources never write files, never verify signatures and never decide what
to fetch next beyond the chunks they were given.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from devicerunner.errors import ArtifactMismatchError, TransportError, VerificationError
from devicerunner.trust.manifest import MAX_CHUNK

log = logging.getLogger(__name__)


class SourceError(TransportError):
    """A source could not deliver (unreachable, too slow, hostile); try the next."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


@dataclass(frozen=True)
class ChunkRef:
    index: int
    offset: int
    size: int
    sha256: str


class Sink(Protocol):
    """What a source hands its chunks to (implemented by update/downloads)."""

    def deliver(self, ref: ChunkRef, data: bytes) -> bool:
        """Verify and persist; True when the chunk was wanted and is now held.
        Raises ArtifactMismatchError for bytes the manifest does not pin."""
        ...

    def missing(self) -> frozenset[int]:
        """Indexes not held yet (a source skips what another path brought)."""
        ...

    def refused(self, ref: ChunkRef, error: VerificationError) -> None:
        """Bytes for ``ref`` that did not match the manifest: reported, never kept."""
        ...


@dataclass
class FetchJob:
    """One source's attempt at the chunks one download misses."""

    artifact_sha256: str
    artifact_size: int
    refs: tuple[ChunkRef, ...]
    sink: Sink
    on_end: Callable[[FetchJob, SourceError | None], None]
    ended: bool = False
    cancelled: bool = False
    delivered: int = 0
    bytes_delivered: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    by_index: dict[int, ChunkRef] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_index = {r.index: r for r in self.refs}


class ArtifactSource(ABC):
    """Subclasses implement ``_start``/``_cancel`` (non-blocking) and call
    ``_deliver`` for each chunk and ``_finish`` once when they stop."""

    name = "source"

    def __init__(self, max_chunk_bytes: int = MAX_CHUNK) -> None:
        self.max_chunk_bytes = max_chunk_bytes
        self.stats = {"chunks": 0, "bytes": 0, "bad_chunks": 0, "failures": 0}

    def start(self, job: FetchJob) -> None:
        try:
            self._start(job)
        except SourceError as e:
            self._finish(job, e)
        except (OSError, ValueError, RuntimeError) as e:
            self._finish(job, SourceError("source_unavailable", f"{self.name}: {e}"))

    def cancel(self, job: FetchJob) -> None:
        """Stop without reporting (the download moved on); idempotent."""
        with job.lock:
            if job.ended:
                return
            job.ended = job.cancelled = True
        try:
            self._cancel(job)
        except (OSError, ValueError, RuntimeError) as e:
            log.debug("%s: cancel: %s", self.name, e)

    @abstractmethod
    def _start(self, job: FetchJob) -> None: ...

    def _cancel(self, job: FetchJob) -> None:  # noqa: B027 - optional hook
        pass

    def retry(self, job: FetchJob) -> None:  # noqa: B027 - optional hook
        """No progress for a while (the download's stall check): ask again."""

    def _deliver(self, job: FetchJob, ref: ChunkRef, data: bytes) -> bool:
        """Bound, then hand to the sink. False once the job has ended."""
        if job.ended:
            return False
        if len(data) != ref.size or len(data) > self.max_chunk_bytes:
            self.stats["bad_chunks"] += 1
            self._finish(
                job,
                SourceError(
                    "artifact_mismatch",
                    f"{self.name}: chunk {ref.index} is {len(data)} bytes, the manifest pins {ref.size}",
                ),
            )
            return False
        try:
            took = job.sink.deliver(ref, data)
        except ArtifactMismatchError as e:
            self.stats["bad_chunks"] += 1
            job.sink.refused(ref, e)
            self._bad_chunk(job, e)
            return False
        except OSError as e:  # the device's disk, not the source: reported as such
            self._finish(job, SourceError("io_error", f"{self.name}: cannot store chunk {ref.index}: {e}"))
            return False
        if took:
            self.stats["chunks"] += 1
            self.stats["bytes"] += len(data)
            with job.lock:
                job.delivered += 1
                job.bytes_delivered += len(data)
        if not job.sink.missing():
            self._finish(job, None)
        return took

    def _bad_chunk(self, job: FetchJob, error: ArtifactMismatchError) -> None:
        """A chunk that does not match: by default this source is not to be
        trusted for this download (a hostile mirror or server), so it ends."""
        self._finish(job, SourceError("artifact_mismatch", f"{self.name}: {error}"))

    def _finish(self, job: FetchJob, error: SourceError | None) -> None:
        with job.lock:
            if job.ended:
                return
            job.ended = True
        if error is not None:
            self.stats["failures"] += 1
            log.warning("artifact source %s failed: %s", self.name, error)
        try:
            self._cancel(job)
        except (OSError, ValueError, RuntimeError) as e:
            log.debug("%s: cleanup: %s", self.name, e)
        job.on_end(job, error)


def wanted(job: FetchJob) -> list[ChunkRef]:
    """The job's chunks the sink still misses, in order."""
    missing = job.sink.missing()
    return [r for r in job.refs if r.index in missing]
