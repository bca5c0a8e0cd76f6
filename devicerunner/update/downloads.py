"""Downloads: which chunks a verified release still needs, where they come
from, and what is kept across a power cut. ``<state_dir>/downloads/<sha256>/``.

Owns:
- the chunk store: the (verified) manifest and one file per chunk held, each
  written atomically only after its hash matched the signed manifest; chunks
  are re-hashed when a download is reopened (a corrupt file is fetched again);
  every file is size-checked before it is read (a chunk against MAX_CHUNK, a
  manifest against MAX_MANIFEST_BYTES); a download whose manifest does not
  parse, or sits under another release's hash, is removed;
- delta reuse: before anything is fetched, every wanted chunk that the
  device already holds — in an app slot's module (cut by that slot's own
  manifest) or in another download — is copied in by hash, so two builds that
  share most chunks cost only the difference, on every source;
- the fallback order: the configured sources are tried one after the other;
  a source that fails (unreachable, stalled, a chunk that does not match)
  is dropped for this attempt and the next one continues from the chunks
  held; when all have failed the download ends FAILED (or REJECTED for a
  chunk that did not match, naming it) and resumes on the next delivery of
  its release;
- assembly: the chunks are streamed into one file, hashed as they go; the
  module is never whole in memory before it is handed to the updater.

Nothing here is fsynced. Every file is written atomically (never torn) and
verified again whenever it is read: a reopened download re-hashes its
chunks and parses its manifest, and the assembled module is checked against
the signed sha256 as it is built and again before the updater writes it,
fsynced, into an app slot -- the durable copy. A power cut can therefore
cost download progress (chunks the kernel had not written back yet are
fetched again), never admit a wrong byte; and an update costs ~10 fewer
flash flushes (docs/benchmarks.md).

Never verifies signatures (the channel hands over verified manifests), never
talks to the network itself (sources do), never writes app slots.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from devicerunner.errors import ArtifactMismatchError, VerificationError
from devicerunner.runtime.fsutil import atomic_write
from devicerunner.runtime.lanes import Lane, Timer
from devicerunner.transport.sources.base import ArtifactSource, ChunkRef, FetchJob, SourceError
from devicerunner.trust import verify as trust
from devicerunner.trust.manifest import MAX_CHUNK, MAX_MANIFEST_BYTES, Manifest, parse_manifest
from devicerunner.update.events import Kind, Reason
from devicerunner.update.rejections import digest

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ASSEMBLED = "module.wasm"
STALL_RETRIES = 3
DONE_KINDS = frozenset({Kind.STAGED, Kind.COMMITTED, Kind.ROLLED_BACK})
"""After one of these, a download of that sequence (or an older one) is no longer
needed. Not REJECTED: a refusal may be about another document with the same
sequence (a replayed beta manifest) while the genuine one downloads."""


def refs(m: Manifest) -> list[ChunkRef]:
    a = m.artifact
    return [ChunkRef(i, a.offsets[i], a.sizes[i], a.chunks[i]) for i in range(len(a.chunks))]


class DownloadStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / "downloads"
        self._known: dict[str, Manifest] = {}
        """Directory name -> the manifest this store wrote or parsed there (its
        only writer while the daemon runs): ``pending`` runs on every update
        event and need not read and parse the same file each time."""

    def dir(self, m: Manifest) -> Path:
        return self.root / m.artifact.sha256

    def begin(self, m: Manifest) -> set[int]:
        """Open (or reopen) the download of ``m``; returns the chunk indexes held."""
        d = self.dir(m)
        if not (d / MANIFEST).exists():
            d.mkdir(parents=True, exist_ok=True)
            atomic_write(d / MANIFEST, m.raw, durable=False)
            self._known[d.name] = m
        return self.held(m)

    def held(self, m: Manifest) -> set[int]:
        d = self.dir(m)
        out: set[int] = set()
        if not d.is_dir():
            return out
        for p in d.glob("*.chunk"):
            try:
                i = int(p.stem) if p.stem.isascii() and p.stem.isdigit() else -1
                # a chunk is never larger than the manifest pins: bounded before reading
                trust.verify_chunk(m, i, _read_bounded(p, MAX_CHUNK))
                out.add(i)
            except (ValueError, OSError, VerificationError):
                log.warning("download %s: dropping bad chunk file %s", m.artifact.sha256[:12], p.name)
                with contextlib.suppress(OSError):
                    p.unlink()
        return out

    def put(self, m: Manifest, index: int, data: bytes) -> None:
        """Verify one chunk against the manifest, then persist it. Raises ArtifactMismatchError."""
        trust.verify_chunk(m, index, data)
        atomic_write(self.dir(m) / f"{index}.chunk", data, durable=False)

    def reuse(self, m: Manifest, missing: set[int]) -> tuple[set[int], int]:
        """Copy in every missing chunk the device holds elsewhere, by hash:
        (indexes now held, bytes reused). Each copy is verified like a fetch."""
        want: dict[str, list[int]] = {}
        for i in missing:
            want.setdefault(m.artifact.chunks[i], []).append(i)
        got: set[int] = set()
        reused = 0
        for path, donor in self._donors(m):
            if not want:
                break
            for j, h in enumerate(donor.artifact.chunks):
                if h not in want:
                    continue
                off, n = donor.artifact.span(j)
                try:
                    if path.is_dir():
                        data = _read_bounded(path / f"{j}.chunk", MAX_CHUNK)
                    else:
                        data = _read_range(path, off, n)
                except (OSError, ValueError):
                    continue
                if hashlib.sha256(data).hexdigest() != h:
                    continue  # the donor file changed or is corrupt: fetch instead
                for i in want.pop(h):
                    self.put(m, i, data)
                    got.add(i)
                    reused += len(data)
                if not want:
                    break
        return got, reused

    def _donors(self, m: Manifest) -> Iterator[tuple[Path, Manifest]]:
        """(module file or download dir, its manifest): app slots, then other downloads."""
        apps = self.state_dir / "apps"
        for slot in sorted(apps.glob("*/slots/*")) if apps.is_dir() else []:
            with contextlib.suppress(OSError, ValueError, VerificationError):
                yield (
                    slot / "module.wasm",
                    parse_manifest(_read_bounded(slot / "manifest.json", MAX_MANIFEST_BYTES)),
                )
        for d in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if d.name == m.artifact.sha256:
                continue
            with contextlib.suppress(OSError, ValueError, VerificationError):
                yield d, parse_manifest(_read_bounded(d / MANIFEST, MAX_MANIFEST_BYTES))

    def assemble(self, m: Manifest) -> Path:
        """Stream the chunks into one file (each checked again as it is read,
        then the whole sha256); returns its path. Not fsynced: the module is
        checked again before staging and rebuilt from the chunks after a
        power cut. Raises ArtifactMismatchError, OSError, ValueError (a chunk
        file too large)."""
        d = self.dir(m)
        out = d / ASSEMBLED
        tmp = d / f".{ASSEMBLED}.tmp"
        whole = hashlib.sha256()
        try:
            with open(tmp, "wb") as f:
                for i in range(len(m.artifact.chunks)):
                    data = _read_bounded(d / f"{i}.chunk", MAX_CHUNK)
                    trust.verify_chunk(m, i, data)
                    whole.update(data)
                    f.write(data)
            if whole.hexdigest() != m.artifact.sha256:
                raise ArtifactMismatchError("module sha256 differs from the manifest")
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return out

    def remove(self, sha256: str) -> None:
        self._known.pop(sha256, None)
        shutil.rmtree(self.root / sha256, ignore_errors=True)

    def pending(self) -> list[Manifest]:
        """Downloads held on disk: unfinished ones a previous run left (their
        manifests parse), and this run's."""
        out: list[Manifest] = []
        try:
            names = os.listdir(self.root)
        except OSError:
            return out
        for name in names:
            known = self._known.get(name)
            if known is not None:
                out.append(known)
                continue
            d = self.root / name
            try:
                m = parse_manifest(_read_bounded(d / MANIFEST, MAX_MANIFEST_BYTES))
                if d.name != m.artifact.sha256:  # stored under another release's name
                    raise ValueError(f"manifest for {m.artifact.sha256[:12]} under {d.name[:12]}")
                self._known[name] = m
                out.append(m)
            except (OSError, ValueError, VerificationError) as e:
                log.warning("download %s unusable (%s); removed", d.name[:12], e)
                shutil.rmtree(d, ignore_errors=True)
        return out


def _read_bounded(path: Path, max_bytes: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path.name}: over {max_bytes} bytes")
    return data


def _read_range(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


class UpdateHooks(Protocol):
    """What a finished (or failed) download reports to (the updater)."""

    def emit(self, app: str, kind: Kind, **fields: Any) -> None: ...
    def offer(self, manifest: bytes, module: bytes, source: str) -> None: ...
    def reject(self, manifest: bytes, error: VerificationError, source: str) -> None: ...
    def note_downloading(self, m: Manifest, resumed: int) -> None: ...
    def note_failure(self, m: Manifest, reason: str, text: str, source: str) -> None: ...


@dataclass
class Download:
    m: Manifest
    store: DownloadStore
    done: Callable[[Download], None]
    missing_: set[int] = field(default_factory=set)
    resumed: int = 0
    bytes_reused: int = 0
    fetched: int = 0
    bytes_fetched: int = 0
    source_index: int = -1
    job: FetchJob | None = None
    failures: list[str] = field(default_factory=list)
    last_error: SourceError | None = None
    retries: int = 0
    started: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)
    sources_used: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    on_refused: Callable[[VerificationError], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    # -- the Sink every source delivers to (any thread) --------------------------

    def missing(self) -> frozenset[int]:
        with self.lock:
            return frozenset(self.missing_)

    def refused(self, ref: ChunkRef, error: VerificationError) -> None:
        """A source brought bytes the manifest does not pin for ``ref``: reported
        (once per manifest, by the updater's refusal memory), never kept."""
        self.stats["chunks_refused"] = self.stats.get("chunks_refused", 0) + 1
        if self.on_refused is not None:
            self.on_refused(error)

    def deliver(self, ref: ChunkRef, data: bytes) -> bool:
        with self.lock:
            if ref.index not in self.missing_:
                return False
            self.store.put(self.m, ref.index, data)  # verified before it touches disk
            self.missing_.discard(ref.index)
            self.fetched += 1
            self.bytes_fetched += len(data)
            self.stats["chunks_fetched"] = self.stats.get("chunks_fetched", 0) + 1
            self.stats["bytes_fetched"] = self.stats.get("bytes_fetched", 0) + len(data)
            self.last_progress = time.monotonic()
            complete = not self.missing_
        if complete:
            self.done(self)
        return True


class Downloads:
    """Every active download of one device; state changes run on ``lane``."""

    def __init__(
        self,
        store: DownloadStore,
        sources: Sequence[ArtifactSource],
        lane: Lane,
        hooks: UpdateHooks,
        *,
        stall_s: float,
        connected: Callable[[], bool],
    ) -> None:
        self.store = store
        self.sources = list(sources)
        self.lane = lane
        self.hooks = hooks
        self.stall_s = stall_s
        self.connected = connected
        self.active: dict[str, Download] = {}
        self.offered: dict[str, int] = {}
        """app -> the highest sequence handed to the updater (not fetched again)."""
        self.offered_digest: dict[str, str] = {}
        """app -> the digest of that manifest (a refusal of *another* document with
        the same sequence, e.g. a replayed beta manifest, must not clear it)."""
        self._stall_timer: Timer | None = None
        self.stats = {"chunks_fetched": 0, "chunks_resumed": 0, "bytes_fetched": 0, "bytes_reused": 0}

    # -- on the lane ---------------------------------------------------------------

    def start(self, m: Manifest) -> None:
        if m.sequence <= self.offered.get(m.app, 0):
            return  # handed to the updater already; redelivered (reconnect) before it settled
        cur = self.active.get(m.app)
        if cur is not None:
            if cur.m.sequence >= m.sequence:
                return
            self._stop(cur)  # superseded by a newer release
        try:
            held = self.store.begin(m)
            missing = set(range(len(m.artifact.chunks))) - held
            reused_idx, reused = self.store.reuse(m, missing) if missing else (set(), 0)
        except OSError as e:
            self._failed(m, Reason.IO_ERROR, f"cannot start download: {e}")
            return
        dl = Download(
            m,
            self.store,
            self._post_complete,
            stats=self.stats,
            on_refused=lambda e: self.hooks.reject(m.raw, e, "mqtt"),
        )
        dl.missing_ = missing - reused_idx
        dl.resumed = len(held) + len(reused_idx)
        dl.bytes_reused = reused + sum(m.artifact.sizes[i] for i in held)
        self.active[m.app] = dl
        self.stats["chunks_resumed"] += dl.resumed
        self.stats["bytes_reused"] += dl.bytes_reused
        self.hooks.note_downloading(m, resumed=dl.resumed)
        if not dl.missing_:
            self._complete(dl)
            return
        if self._stall_timer is None:
            self._stall_timer = self.lane.every(1.0, lambda: self.check_stalls(time.monotonic()))
        self._next_source(dl)

    def _post(self, fn: Callable[[], None]) -> None:
        self.lane.post(fn)  # refused once the lane is closed (the device is stopping): dropped

    def _post_complete(self, dl: Download) -> None:
        self._post(lambda: self._complete(dl))

    def _next_source(self, dl: Download) -> None:
        dl.source_index += 1
        dl.retries = 0
        dl.last_progress = time.monotonic()
        if dl.source_index >= len(self.sources):
            self._give_up(dl)
            return
        src = self.sources[dl.source_index]
        dl.sources_used.append(src.name)
        missing = dl.missing()
        job = FetchJob(
            dl.m.artifact.sha256,
            dl.m.artifact.size,
            tuple(r for r in refs(dl.m) if r.index in missing),
            dl,
            lambda j, err: self._post(lambda: self._source_ended(dl, j, err)),
        )
        dl.job = job
        src.start(job)

    def _source_ended(self, dl: Download, job: FetchJob, err: SourceError | None) -> None:
        if self.active.get(dl.m.app) is not dl or dl.job is not job:
            return  # superseded meanwhile
        if not dl.missing():
            return  # _complete is posted
        src = self.sources[dl.source_index].name
        e = err or SourceError("incomplete", f"{src}: stopped with chunks missing")
        dl.failures.append(f"{src}: {e.reason}: {e}")
        dl.last_error = e
        self.hooks.emit(
            dl.m.app,
            Kind.SOURCE_FAILED,
            sequence=dl.m.sequence,
            source=src,
            reason=e.reason,
            reason_text=str(e),
        )
        self._next_source(dl)

    def _give_up(self, dl: Download) -> None:
        self._stop(dl)
        e = dl.last_error
        text = "; ".join(dl.failures) or "no artifact source is configured"
        self._failed(
            dl.m,
            Reason.DOWNLOAD_STALLED
            if e is not None and e.reason == Reason.DOWNLOAD_STALLED
            else Reason.DOWNLOAD_FAILED,
            f"every artifact source failed ({text}); {len(dl.missing_)} chunk(s) missing (kept for resume)",
        )

    def _stop(self, dl: Download) -> None:
        if dl.job is not None and 0 <= dl.source_index < len(self.sources):
            self.sources[dl.source_index].cancel(dl.job)
        if self.active.get(dl.m.app) is dl:
            del self.active[dl.m.app]

    def _complete(self, dl: Download) -> None:
        if self.active.get(dl.m.app) is not dl:
            return
        self._stop(dl)
        try:
            path = self.store.assemble(dl.m)
        except VerificationError as e:
            self.store.remove(dl.m.artifact.sha256)
            self.hooks.reject(dl.m.raw, e, "mqtt")
            return
        except (OSError, ValueError) as e:
            self._failed(dl.m, Reason.IO_ERROR, f"cannot assemble the module: {e}")
            return
        self.hooks.emit(
            dl.m.app,
            Kind.DOWNLOADED,
            sequence=dl.m.sequence,
            version=dl.m.version,
            chunks_fetched=dl.fetched,
            chunks_resumed=dl.resumed,
            bytes_fetched=dl.bytes_fetched,
            bytes_reused=dl.bytes_reused,
            sources=dl.sources_used,
            seconds=round(time.monotonic() - dl.started, 3),
        )
        try:
            module = _read_bounded(path, dl.m.artifact.size)  # the updater stages and compiles from bytes
        except (OSError, ValueError) as e:
            self._failed(dl.m, Reason.IO_ERROR, f"cannot read the assembled module: {e}")
            return
        self.offered[dl.m.app] = dl.m.sequence
        self.offered_digest[dl.m.app] = digest(dl.m.raw)
        self.hooks.offer(dl.m.raw, module, "mqtt")

    def _failed(self, m: Manifest, reason: str, text: str) -> None:
        self.hooks.note_failure(m, reason, text, "mqtt")
        self.hooks.emit(m.app, Kind.FAILED, sequence=m.sequence, reason=reason, reason_text=text)

    def check_stalls(self, now: float) -> None:
        if not self.active and self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
            return
        if not self.connected():
            for dl in self.active.values():
                dl.last_progress = now  # no progress is possible offline: not a stall
            return
        for dl in list(self.active.values()):
            if now - dl.last_progress < self.stall_s or dl.job is None:
                continue
            src = self.sources[dl.source_index]
            if dl.retries < STALL_RETRIES:
                dl.retries += 1
                dl.last_progress = now
                log.warning(
                    "download %s %d stalled on %s; retry %d", dl.m.app, dl.m.sequence, src.name, dl.retries
                )
                src.retry(dl.job)
            else:
                job = dl.job
                src.cancel(job)
                self._source_ended(
                    dl,
                    job,
                    SourceError(
                        "download_stalled",
                        f"no progress for {self.stall_s:.0f} s after {STALL_RETRIES} retries; "
                        f"{len(dl.missing())} chunk(s) missing",
                    ),
                )

    def resume_pending(self, still_valid: Callable[[Manifest], bool]) -> None:
        for m in self.store.pending():
            if not still_valid(m):
                self.store.remove(m.artifact.sha256)  # superseded, committed or no longer valid
                continue
            log.info("resuming download of %s %s (sequence %d)", m.app, m.version, m.sequence)
            self.start(m)
