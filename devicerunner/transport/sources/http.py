"""HTTP(S) from any static host, CDN or object store: ``GET {base}/{sha256}``
with one ``Range`` request per missing chunk.

Client: urllib3 2.x (pinned ``>=2.2,<3``). Why: it is the most widely
deployed Python HTTP client (under requests and pip), keeps connections
alive per host, verifies TLS with the system store or a given CA file,
bounds redirects (``Retry(redirect=n)``) and streams bodies
(``preload_content=False``), with no async runtime and no dependency of its
own — a device needs exactly that and nothing more. httpx would add
anyio/h11/httpcore for features (HTTP/2, async) the device does not use.

Rules, enforced here whatever the server does:
- one chunk at a time, read in pieces of at most ``READ_PIECE`` bytes: at
  most one chunk of memory, never the artifact;
- a ``206`` with the exact ``Content-Range`` asked for, and never more than
  the chunk's size from the manifest (a ``200`` with the whole file, an
  oversized or short body fails the source);
- every chunk has a deadline (``chunk_timeout_s`` plus its size at
  ``min_bytes_per_s``): a slow-loris server that dribbles bytes cannot hold
  a download, and the per-read timeout covers a silent one;
- at most ``max_redirects`` redirects, and never from https to http;
- the first response's ``ETag`` must stay the same: a mirror swapped between
  chunks fails at once (and its chunks would fail their hashes anyway).
Resume is per chunk: what is held on disk is never asked for again.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError, ResponseError

from devicerunner.transport.sources.base import ArtifactSource, ChunkRef, FetchJob, SourceError, wanted

log = logging.getLogger(__name__)

READ_PIECE = 16 * 1024


class HttpSource(ArtifactSource):
    name = "http"

    def __init__(
        self,
        base_url: str,
        *,
        ca_file: Path | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 10.0,
        chunk_timeout_s: float = 20.0,
        min_bytes_per_s: int = 16 * 1024,
        max_redirects: int = 3,
        max_chunk_bytes: int | None = None,
    ) -> None:
        super().__init__(*(() if max_chunk_bytes is None else (max_chunk_bytes,)))
        scheme = urlsplit(base_url).scheme
        if scheme not in ("http", "https"):
            raise SourceError("bad_config", f"artifact URL must be http(s)://, got {base_url!r}")
        self.base = base_url.rstrip("/")
        self.https = scheme == "https"
        self.chunk_timeout_s = chunk_timeout_s
        self.min_bytes_per_s = min_bytes_per_s
        self.max_redirects = max_redirects
        self.pool = urllib3.PoolManager(
            num_pools=4,
            maxsize=1,
            cert_reqs="CERT_REQUIRED",
            ca_certs=str(ca_file) if ca_file else None,
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            retries=False,
        )

    def url(self, sha256: str) -> str:
        return f"{self.base}/{sha256}"

    def _start(self, job: FetchJob) -> None:
        threading.Thread(
            target=self._run, args=(job,), name=f"dr-http-{job.artifact_sha256[:8]}", daemon=True
        ).start()

    def _run(self, job: FetchJob) -> None:
        etag: str | None = None
        try:
            for ref in wanted(job):
                if job.ended:
                    return
                data, tag = self._get(job.artifact_sha256, ref)
                if etag is None:
                    etag = tag
                elif tag is not None and tag != etag:
                    raise SourceError(
                        "mirror_changed", f"http: the artifact's ETag changed ({etag} -> {tag})"
                    )
                if not self._deliver(job, ref, data) and job.ended:
                    return
            if not job.ended:
                self._finish(
                    job, None if not job.sink.missing() else SourceError("incomplete", "http: chunks left")
                )
        except SourceError as e:
            self._finish(job, e)
        except (HTTPError, OSError, ValueError) as e:  # foreign errors become ours, here
            self._finish(job, SourceError("source_unavailable", f"http: {type(e).__name__}: {e}"))

    def _get(self, sha256: str, ref: ChunkRef) -> tuple[bytes, str | None]:
        deadline = time.monotonic() + self.chunk_timeout_s + ref.size / self.min_bytes_per_s
        last = ref.offset + ref.size - 1
        try:
            resp = self.pool.request(
                "GET",
                self.url(sha256),
                headers={"Range": f"bytes={ref.offset}-{last}", "Accept-Encoding": "identity"},
                preload_content=False,
                redirect=True,
                # follow redirects, retry nothing else (the next source is the retry)
                retries=urllib3.Retry(
                    total=self.max_redirects,
                    connect=0,
                    read=0,
                    other=0,
                    status=0,
                    redirect=self.max_redirects,
                ),
            )
        except MaxRetryError as e:
            if isinstance(e.reason, ResponseError):  # "too many redirects"
                raise SourceError("too_many_redirects", f"http: {e.reason}") from e
            raise SourceError("source_unavailable", f"http: {e.reason}") from e
        try:
            final = resp.geturl() or ""
            if self.https and final.startswith("http://"):
                raise SourceError("tls_downgrade", f"http: redirected from https to {final}")
            if resp.status != 206:
                raise SourceError(
                    "bad_response", f"http: status {resp.status} for a range request (need 206)"
                )
            want = f"bytes {ref.offset}-{last}/"
            if not (resp.headers.get("Content-Range") or "").startswith(want):
                raise SourceError(
                    "bad_response", f"http: Content-Range {resp.headers.get('Content-Range')!r}"
                )
            length = resp.headers.get("Content-Length")
            if length is not None and (not length.isdigit() or int(length) != ref.size):
                raise SourceError("artifact_mismatch", f"http: Content-Length {length}, chunk is {ref.size}")
            buf = bytearray()
            while len(buf) <= ref.size:
                if time.monotonic() > deadline:
                    raise SourceError(
                        "too_slow", f"http: chunk {ref.index} not received in time (slow server)"
                    )
                piece = resp.read1(min(READ_PIECE, ref.size + 1 - len(buf)))
                if not piece:
                    break
                buf += piece
            if len(buf) != ref.size:
                raise SourceError(
                    "artifact_mismatch", f"http: chunk {ref.index} is {len(buf)}+ bytes, not {ref.size}"
                )
            return bytes(buf), resp.headers.get("ETag")
        finally:
            resp.release_conn()
