"""Releases, rollout documents and trust roots delivered over the network:
verify, download the artifact chunk by chunk, hand a complete release to the
updater (which stages it exactly like a local install).

Runs on the device channel's lane: the transport hands over what arrives
(``Inbound``) and fetches chunks on request (``ChunkFetcher``); this module
decides what to fetch and what to keep. Nothing here runs Wasm or touches
app slots.

Downloads ask for each *missing* chunk only, so a chunk held on disk
(update.downloads) is never fetched again after a reconnect or a power cut.
A download with no progress for ``stall_s`` while connected is asked again
up to ``STALL_RETRIES`` times, then reported FAILED; the next delivery of
its release (e.g. after a reconnect) resumes it.

Whoever can publish on the broker reaches this module (docs/threat-model.md):
a root is kept only if it verifies against the current root on arrival, the
next version is asked for by exact topic (``want_root``), nothing unsigned
is kept; a release must arrive on the topic of the (app, channel) it was
signed for; a chunk that does not match is dropped and the download keeps
waiting for the genuine one. A refusal is reported once per document (the
updater's refusal memory) and never blocks a later delivery.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from devicerunner.errors import RollbackError, VerificationError, WrongTargetError
from devicerunner.runtime.lanes import Lane, Timer
from devicerunner.runtime.ratelimit import RateLimitedLog
from devicerunner.trust import manifest
from devicerunner.trust.manifest import Manifest
from devicerunner.trust.store import TrustStore
from devicerunner.update.downloads import DownloadStore
from devicerunner.update.events import Event, Kind, Reason
from devicerunner.update.rejections import digest
from devicerunner.update.rollouts import RolloutGate
from devicerunner.update.updater import Updater

log = logging.getLogger(__name__)

STAGE_RETRY_MIN_S = 1.0
STAGE_RETRY_MAX_S = 60.0
STALL_RETRIES = 3
DONE_KINDS = frozenset({Kind.STAGED, Kind.COMMITTED, Kind.ROLLED_BACK})
"""After one of these, a download of that sequence (or an older one) is no longer
needed. Not REJECTED: a refusal may be about another document with the same
sequence (a replayed beta manifest) while the genuine one downloads."""


class ChunkFetcher(Protocol):
    """How chunks are asked for; they arrive through ``Delivery.on_chunk``."""

    def want(self, sha256: str, indices: list[int]) -> None: ...

    def drop(self, sha256: str, indices: list[int]) -> None: ...

    def online(self) -> bool: ...

    def want_root(self, version: int) -> None:
        """Ask for trust root ``version`` (by its exact topic), instead of the one asked for before."""


@dataclass
class Download:
    m: Manifest
    missing: set[int]
    resumed: int
    fetched: int = 0
    retries: int = 0
    started: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)


class Delivery:
    def __init__(
        self,
        *,
        state_dir: Path,
        updater: Updater,
        trust_store: TrustStore,
        rollouts: RolloutGate,
        fetcher: ChunkFetcher,
        lane: Lane,
        stall_s: float,
    ) -> None:
        self._updater = updater
        self._verifier = updater.verifier
        self._trust = trust_store
        self._rollouts = rollouts
        self._fetcher = fetcher
        self._lane = lane
        self.stall_s = stall_s
        self.store = DownloadStore(state_dir)
        self.active: dict[str, Download] = {}
        self._by_sha: dict[str, str] = {}
        self._refused = RateLimitedLog(log, rate_per_s=0.5, burst=10)
        """Log lines (and root REJECTED events) about refused broker input."""
        self._offered: dict[str, int] = {}
        self._offered_digest: dict[str, str] = {}
        """app -> the digest of that manifest (a refusal of *another* document with
        the same sequence, e.g. a replayed beta manifest, must not clear it)."""
        """app -> the highest sequence handed to the updater (not fetched again)."""
        self._stage_retry_s: dict[str, float] = {}
        """app -> the last delay before offering a release whose staging failed again."""
        self._stall_timer: Timer | None = None
        """Armed while a download is active (idle devices do not wake up for it)."""
        self.stats = {
            "chunks_fetched": 0,
            "chunks_resumed": 0,
            "releases_seen": 0,
            "chunk_messages": 0,
            "chunks_refused": 0,
            "roots_refused": 0,
            "roots_ahead": 0,
        }

    def start(self) -> None:
        """On the lane, before the first connection: ask for the next root, resume downloads."""
        self._follow_next_root()
        self.resume_downloads()

    # -- trust roots ------------------------------------------------------------------

    def on_root(self, payload: bytes) -> None:
        """Only the next version, verified against the current root on arrival,
        is kept (as the new root); anything else is dropped at once."""
        current = self._trust.root
        if not payload or current is None:
            return
        try:
            version = manifest.parse_root(payload).version
        except VerificationError as e:
            self._root_refused(e, "(malformed)")
            return
        if version <= current.version:
            return
        if version > current.version + 1:
            # Not verifiable yet: the chain is walked on trust/roots/{n}, one exact
            # topic at a time (asked for already); nothing is kept.
            self.stats["roots_ahead"] += 1
            return
        try:
            self._trust.rotate(payload)
        except VerificationError as e:
            self._root_refused(e, f"v{version}")
            return
        self._updater.emit("*", Kind.ROOT_ROTATED, root_version=version)
        self._follow_next_root()

    def _root_refused(self, e: VerificationError, what: str) -> None:
        self.stats["roots_refused"] += 1
        held = self._refused.allow(time.monotonic())
        if held is None:
            return
        log.warning("trust root %s refused: %s (%d similar suppressed)", what, e, held)
        self._updater.emit(
            "*", Kind.REJECTED, reason=e.reason, reason_text=f"trust root {what}: {e}", suppressed=held
        )

    def _follow_next_root(self) -> None:
        root = self._trust.root
        if root is not None:
            self._fetcher.want_root(root.version + 1)

    # -- rollout documents ----------------------------------------------------------------

    def on_rollout(self, app: str, payload: bytes) -> None:
        ready = self._rollouts.on_document(app, payload)
        if ready is not None:
            self.start_download(ready)

    # -- releases ------------------------------------------------------------------------

    def on_release(self, app: str, channel: str, payload: bytes) -> None:
        """A release delivered on the topic of (``app``, ``channel``)."""
        if not payload:
            return  # a cleared retained release (or one cut for its size)
        self.stats["releases_seen"] += 1
        try:
            m = self._verifier.release(payload)
            if (m.app, m.channel) != (app, channel):
                raise WrongTargetError(
                    f"delivered on the topic of {app}/{channel}, but signed for {m.app}/{m.channel}"
                )
        except RollbackError:
            return  # we have it (or decided on it) already: redelivered on every reconnect
        except VerificationError as e:
            # Remembered by digest and reported once; never blocks a later delivery.
            self._updater.reject(payload, e, "mqtt")
            return
        if not self._rollouts.eligible(m):
            self._refused.log(  # a genuine manifest, but replayable by anyone: rate-limited
                logging.INFO,
                time.monotonic(),
                "release %s %s (sequence %d) is not for this device yet (rollout)",
                m.app,
                m.version,
                m.sequence,
            )
            self._rollouts.waiting[m.app] = m
            return
        self.start_download(m)

    def start_download(self, m: Manifest) -> None:
        if m.sequence <= self._offered.get(m.app, 0):
            return  # handed to the updater already; redelivered (reconnect) before it settled
        cur = self.active.get(m.app)
        if cur is not None:
            if cur.m.sequence >= m.sequence:
                return
            self._abandon(cur)  # superseded by a newer release
        try:
            held = self.store.begin(m)
        except OSError as e:
            self._failed(m, Reason.IO_ERROR, f"cannot start download: {e}")
            return
        dl = Download(m, set(range(len(m.artifact.chunks))) - held, resumed=len(held))
        self.active[m.app] = dl
        if self._stall_timer is None:
            self._stall_timer = self._lane.every(1.0, lambda: self._check_stalls(time.monotonic()))
        self._by_sha[m.artifact.sha256] = m.app
        self.stats["chunks_resumed"] += dl.resumed
        self._updater.note_downloading(m, resumed=dl.resumed)
        if not dl.missing:
            self._complete(dl)
        else:
            self._fetcher.want(m.artifact.sha256, sorted(dl.missing))

    def _abandon(self, dl: Download) -> None:
        self._fetcher.drop(dl.m.artifact.sha256, sorted(dl.missing))
        self.active.pop(dl.m.app, None)
        self._by_sha.pop(dl.m.artifact.sha256, None)

    def on_chunk(self, sha: str, index: int, payload: bytes) -> None:
        self.stats["chunk_messages"] += 1
        app = self._by_sha.get(sha)
        dl = self.active.get(app) if app else None
        if dl is None or index not in dl.missing or not payload:
            return  # not ours, a duplicate delivery, or cleared (or cut for its size)
        try:
            self.store.put(dl.m, index, payload)
        except VerificationError as e:
            # Tampered or mixed in by whoever can publish: dropped, and the download
            # keeps waiting for the genuine chunk (a republish, or the stall retry).
            self.stats["chunks_refused"] += 1
            self._updater.reject(dl.m.raw, e, "mqtt")
            return
        except OSError as e:
            self._abandon(dl)
            self._failed(dl.m, Reason.IO_ERROR, f"cannot store chunk {index}: {e}")
            return
        dl.missing.discard(index)
        dl.fetched += 1
        dl.last_progress = time.monotonic()
        self.stats["chunks_fetched"] += 1
        self._fetcher.drop(sha, [index])
        if not dl.missing:
            self._complete(dl)

    def _complete(self, dl: Download) -> None:
        self._abandon(dl)
        try:
            module = self.store.assemble(dl.m)
        except VerificationError as e:
            self.store.remove(dl.m.artifact.sha256)
            self._updater.reject(dl.m.raw, e, "mqtt")
            return
        self._updater.emit(
            dl.m.app,
            Kind.DOWNLOADED,
            sequence=dl.m.sequence,
            version=dl.m.version,
            chunks_fetched=dl.fetched,
            chunks_resumed=dl.resumed,
            seconds=round(time.monotonic() - dl.started, 3),
        )
        self._offered[dl.m.app] = dl.m.sequence
        self._offered_digest[dl.m.app] = digest(dl.m.raw)
        self._updater.offer(dl.m.raw, module, "mqtt")

    def _failed(self, m: Manifest, reason: str, text: str) -> None:
        self._updater.note_failure(m, reason, text, "mqtt")
        self._updater.emit(m.app, Kind.FAILED, sequence=m.sequence, reason=reason, reason_text=text)

    def _check_stalls(self, now: float) -> None:
        if not self.active and self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
            return
        if not self._fetcher.online():
            for dl in self.active.values():
                dl.last_progress = now  # no progress is possible offline: not a stall
            return
        for dl in list(self.active.values()):
            if now - dl.last_progress < self.stall_s:
                continue
            missing = sorted(dl.missing)
            if dl.retries < STALL_RETRIES:
                dl.retries += 1
                dl.last_progress = now
                log.warning("download %s %d stalled; retry %d", dl.m.app, dl.m.sequence, dl.retries)
                self._fetcher.drop(dl.m.artifact.sha256, missing)
                self._fetcher.want(dl.m.artifact.sha256, missing)
            else:
                self._abandon(dl)
                self._failed(
                    dl.m,
                    Reason.DOWNLOAD_STALLED,
                    f"no progress for {self.stall_s:.0f} s after {STALL_RETRIES} "
                    f"retries; {len(dl.missing)} chunk(s) missing (kept for resume)",
                )

    def resume_downloads(self) -> None:
        for m in self.store.pending():
            try:
                self._verifier.release(m.raw)
            except VerificationError:
                self.store.remove(m.artifact.sha256)  # superseded, committed or no longer valid
                continue
            log.info("resuming download of %s %s (sequence %d)", m.app, m.version, m.sequence)
            self.start_download(m)

    # -- what the updater decided --------------------------------------------------------

    def on_update_event(self, ev: Event) -> None:
        """Forget downloads the updater no longer needs (on this lane)."""
        seq = ev.get("sequence")
        offered = seq is not None and seq == self._offered.get(ev.app)
        if offered and ev.kind is Kind.REJECTED and ev.get("digest") != self._offered_digest.get(ev.app):
            offered = False  # another document with the same sequence was refused
        if offered and ev.kind in (Kind.FAILED, Kind.REJECTED):
            # Not staged (disk full, expired by the clock...): take it again when
            # redelivered; its chunks are kept.
            del self._offered[ev.app]
            self._offered_digest.pop(ev.app, None)
            if ev.kind is Kind.FAILED and ev.get("reason") == Reason.IO_ERROR and isinstance(seq, int):
                self._retry_staging_later(ev.app, seq)
        if ev.kind in (Kind.STAGED, Kind.REJECTED):
            self._stage_retry_s.pop(ev.app, None)
        if ev.kind in DONE_KINDS and isinstance(seq, int) and seq:
            for m in self.store.pending():
                if m.app == ev.app and m.sequence <= seq:
                    self.store.remove(m.artifact.sha256)

    def _retry_staging_later(self, app: str, sequence: int) -> None:
        """Offer a downloaded release again after a capped, doubling delay (its
        staging write failed, e.g. disk full); without this it waited for the
        broker to redeliver the release, i.e. for a reconnect."""
        held = [m for m in self.store.pending() if m.app == app and m.sequence == sequence]
        if not held:
            return
        delay = min(STAGE_RETRY_MAX_S, self._stage_retry_s.get(app, STAGE_RETRY_MIN_S / 2) * 2)
        self._stage_retry_s[app] = delay
        log.warning("staging %s sequence %d failed; offering it again in %.0f s", app, sequence, delay)
        self._lane.call_later(delay, lambda: self._retry_staging(held[0]))

    def _retry_staging(self, m: Manifest) -> None:
        if m.sequence <= self._offered.get(m.app, 0):
            return  # offered again meanwhile (redelivered)
        try:
            self._verifier.release(m.raw)  # still valid, still the newest for this app?
        except VerificationError as e:
            log.info("not offering %s sequence %d again: %s", m.app, m.sequence, e)
            return
        self.start_download(m)  # every chunk is held: completes and offers at once
