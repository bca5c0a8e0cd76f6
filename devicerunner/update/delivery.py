"""Releases, rollout documents and trust roots delivered over the network:
verify, download the artifact chunk by chunk, hand a complete release to the
updater (which stages it exactly like a local install).

Runs on the device channel's lane: the transport hands over the documents
that arrive (``Inbound``); the artifact bytes come from the transport's
artifact sources (transport/sources), and which chunks are fetched, reused
or resumed, from which source and in what order, is update.downloads'
business. Nothing here runs Wasm or touches app slots.

Whoever can publish on the broker reaches this module (docs/threat-model.md):
a root is kept only if it verifies against the current root on arrival, the
next version is asked for by exact topic (``want_root``), nothing unsigned
is kept; a release must arrive on the topic of the (app, channel) it was
signed for; a retained chunk that does not match is dropped and the download
keeps waiting for the genuine one (a mirror or server that sends one is
dropped for that download instead: update.downloads). A refusal is reported once per document (the
updater's refusal memory) and never blocks a later delivery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from devicerunner.errors import RollbackError, VerificationError, WrongTargetError
from devicerunner.runtime.lanes import Lane
from devicerunner.runtime.ratelimit import RateLimitedLog
from devicerunner.transport.sources.base import ArtifactSource
from devicerunner.trust import manifest
from devicerunner.trust.manifest import Manifest
from devicerunner.trust.store import TrustStore
from devicerunner.update.downloads import DONE_KINDS, Downloads, DownloadStore
from devicerunner.update.events import Event, Kind, Reason
from devicerunner.update.rollouts import RolloutGate
from devicerunner.update.updater import Updater

log = logging.getLogger(__name__)

STAGE_RETRY_MIN_S = 1.0
STAGE_RETRY_MAX_S = 60.0


class RootFetcher(Protocol):
    """How the next trust root is asked for (the channel)."""

    def online(self) -> bool: ...

    def want_root(self, version: int) -> None:
        """Ask for trust root ``version`` (by its exact topic), instead of the one asked for before."""


class Delivery:
    def __init__(
        self,
        *,
        state_dir: Path,
        updater: Updater,
        trust_store: TrustStore,
        rollouts: RolloutGate,
        fetcher: RootFetcher,
        sources: Sequence[ArtifactSource],
        lane: Lane,
        stall_s: float,
    ) -> None:
        """``sources``: where chunks come from, tried in this order."""
        self._updater = updater
        self._verifier = updater.verifier
        self._trust = trust_store
        self._rollouts = rollouts
        self._fetcher = fetcher
        self._lane = lane
        self.downloads = Downloads(
            DownloadStore(state_dir), sources, lane, updater, stall_s=stall_s, connected=fetcher.online
        )
        self.store = self.downloads.store
        self._refused = RateLimitedLog(log, rate_per_s=0.5, burst=10)
        """Log lines (and root REJECTED events) about refused broker input."""
        self._stage_retry_s: dict[str, float] = {}
        """app -> the last delay before offering a release whose staging failed again."""
        self.stats = self.downloads.stats
        self.stats.update(releases_seen=0, roots_refused=0, roots_ahead=0)

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
        self.downloads.start(m)

    def resume_downloads(self) -> None:
        def still_valid(m: Manifest) -> bool:
            try:
                self._verifier.release(m.raw)
            except VerificationError:
                return False
            return True

        self.downloads.resume_pending(still_valid)

    # -- what the updater decided --------------------------------------------------------

    def on_update_event(self, ev: Event) -> None:
        """Forget downloads the updater no longer needs (on this lane)."""
        seq = ev.get("sequence")
        dls = self.downloads
        offered = seq is not None and seq == dls.offered.get(ev.app)
        if offered and ev.kind is Kind.REJECTED and ev.get("digest") != dls.offered_digest.get(ev.app):
            offered = False  # another document with the same sequence was refused
        if offered and ev.kind in (Kind.FAILED, Kind.REJECTED):
            # Not staged (disk full, expired by the clock...): take it again when
            # redelivered; its chunks are kept.
            del dls.offered[ev.app]
            dls.offered_digest.pop(ev.app, None)
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
        if m.sequence <= self.downloads.offered.get(m.app, 0):
            return  # offered again meanwhile (redelivered)
        try:
            self._verifier.release(m.raw)  # still valid, still the newest for this app?
        except VerificationError as e:
            log.info("not offering %s sequence %d again: %s", m.app, m.sequence, e)
            return
        self.start_download(m)  # every chunk is held: completes and offers at once
