"""The update state machine: IDLE -> (DOWNLOADING) -> STAGED -> TRIAL -> COMMITTED,
with REJECTED and ROLLED_BACK.

Decisions (update.decisions, update.trial) are pure functions of the app
state; the ``Updater`` carries them out through ``AppSlots`` on its own
lane, and asks the device (an ``AppHost``) for anything that runs Wasm.

Order of writes for one update (each a crash-safe write; see slots.py):

0. (a download) DOWNLOADING is shown but not written; an error left by an
   earlier refusal is cleared on disk first, so a restart cannot bring it back;
1. clear a superseded ``pending`` (state.json), remove the target slot's
   ``committed`` marker, write module + manifest into the *inactive* slot;
2.-3. state.json, one write: pending = that slot, TRIAL, trial_attempts = 1
   -- before the new code is compiled, linked or run, so a crash from here
   on counts as an attempt (STAGED is announced, not written: the trial
   starts at once; with ``trial_attempts = 1`` a power cut anywhere from
   here rolls the release back);
4. compile, instantiate + ``dr_init`` the new version on the updater lane while the
   old one keeps ticking (separate Stores), then switch on the scheduler
   thread between two ticks, keeping the old one warm;
5. on a pass: ``committed`` marker in the new slot, then state.json:
   COMMITTED, active = new slot, highest_sequence = N;
   on a failure: (scheduler) switch back at once, then state.json:
   ROLLED_BACK, sequence N marked bad, reason recorded.

A power cut between any two steps leaves ``active`` on a verified slot;
at boot a TRIAL with ``trial_attempts >= attempts`` reverts (the crash counts
as a failed attempt), a STAGED slot (written by earlier versions, or a retrial
after a superseded one) is verified again before its trial.

A sequence is marked bad only by a rollback: this device ran the trial of
that exact signed manifest and it failed (or a crash interrupted it). Every
other refusal -- unsigned, artifact mismatch, wrong target, expired, issued
in the future, I/O error -- is remembered by the manifest's digest
(update/rejections.py: bounded, in memory, for status and events) and a
later delivery of the same sequence is processed afresh: whoever can publish
on the broker must not be able to block a genuine release.

Size: over 400 lines on purpose -- the order of writes above is one
sequence, read in one place; the decisions it carries out are in
update/decisions.py and the device side of a trial in device/trials.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from devicerunner.errors import (
    BadSignatureError,
    DeviceRunnerError,
    MalformedError,
    NoTrustRootError,
    RollbackError,
    ThresholdError,
    TooLargeError,
    VerificationError,
)
from devicerunner.runtime.fsutil import DirListing, atomic_write, makedirs
from devicerunner.runtime.lanes import Lane
from devicerunner.runtime.ratelimit import RateLimitedLog
from devicerunner.trust import bundle
from devicerunner.trust.manifest import Manifest, parse_manifest
from devicerunner.trust.store import TrustStore
from devicerunner.update.decisions import (
    clear_pending,
    plan_boot,
    plan_commit,
    plan_rollback,
    plan_stage,
    plan_trial,
)
from devicerunner.update.events import WARNING_KINDS, Event, EventListener, Kind, Phase, Reason
from devicerunner.update.host import AppHost, Clock, UpdateSettings
from devicerunner.update.rejections import Rejections, digest
from devicerunner.update.rollouts import claimed_version
from devicerunner.update.slots import AppSlots
from devicerunner.update.state import AppState
from devicerunner.update.trial import PASSED
from devicerunner.update.verification import Verifier, peek_app, peek_sequence
from hostfuncs.logsafe import LogLimiter

log = logging.getLogger(__name__)

UNAUTHENTICATED = (NoTrustRootError, BadSignatureError, ThresholdError, MalformedError, TooLargeError)
MAX_RETRY_S = 60.0
MAX_REMEMBERED = 1024
"""Inbox files refused but not removable (read-only state dir) that are skipped
while unchanged; past this the oldest are forgotten (and looked at again)."""
INBOX_LOG_EVERY_S = 60.0


# -- the I/O edge -----------------------------------------------------------------------


@dataclass
class _Release:
    manifest: bytes
    module: bytes
    source: str
    inbox_path: Path | None = None


@dataclass(frozen=True)
class Installed:
    """What an app runs at boot: its verified active slot."""

    manifest: Manifest
    module: bytes


class Updater:
    """Carries out the update state machine of every app of one device on its lane.

    Sees the device only through ``AppHost`` (run a candidate, watch its
    trial) and ``UpdateSettings``; every file it writes goes through AppSlots.
    """

    def __init__(
        self,
        settings: UpdateSettings,
        host: AppHost,
        trust_store: TrustStore,
        clock: Clock,
        lane: Lane,
    ) -> None:
        self.settings = settings
        self.host = host
        self.trust = trust_store
        self.clock = clock
        self.device_id = settings.identity.device_id
        self.inbox = settings.state_dir / "inbox"
        self.inbox_listing = DirListing(self.inbox)
        """The inbox's entries, for every scanner of it (config updates too)."""
        self.slots = {name: AppSlots(settings.state_dir, name) for name in settings.channels}
        self.verifier = Verifier(settings, trust_store, self.slots, clock)
        self._lane = lane
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._outstanding = 0
        self._retry_at: dict[str, float] = {}
        self._retry_delay: dict[str, float] = {}
        self._refused: dict[str, tuple[int, int]] = {}
        """inbox file name -> (size, mtime_ns) of a refused file that could be
        neither removed nor set aside: not processed again while unchanged."""
        self._inbox_log = LogLimiter(log, INBOX_LOG_EVERY_S)
        self._deferred: dict[str, _Release] = {}
        """app -> the newest release that arrived while that app was on trial."""
        self.listeners: list[EventListener] = []
        self.inbox_scanners: list[Callable[[], None]] = []
        """Other documents' local channels (config_updates), run on this lane with
        every inbox scan; each handles its own files in ``inbox/``."""
        self.inbox_suffixes: set[str] = {".bundle"}
        """Inbox files that mean work is pending (``idle`` stays clear)."""
        self.rejections = Rejections()
        """Refusals by manifest digest (never a reason to refuse the next delivery)."""
        self._unauthenticated = RateLimitedLog(log, rate_per_s=1.0, burst=10)
        """Events (and log lines) about unsigned input: anyone can make thousands."""
        self.idle = threading.Event()
        """Set whenever the updater has nothing left to do: no job queued, no
        bundle waiting in the inbox, no trial running (``run --once`` waits on it)."""

    # -- events -------------------------------------------------------------

    def emit(self, app: str, kind: Kind, **fields: Any) -> None:
        ev = Event(self.device_id, app, kind, fields)
        lvl = logging.WARNING if kind in WARNING_KINDS else logging.INFO
        log.log(lvl, "update %s %s: %s", app, kind, fields.get("reason_text") or fields.get("version") or "")
        for listener in self.listeners:
            try:
                listener(ev)
            except Exception:
                log.exception("event listener failed")

    # -- boot ------------------------------------------------------------------

    def boot_app(self, app: str) -> Installed | None:
        """Recover one app from its state.json; returns its verified active
        version (None: nothing installed). Runs before the scheduler starts."""
        s = self.slots[app]
        st, why = s.load()
        active = s.read_slot(st.active) if st.active else None
        if st.active and active is None:
            log.error("app %s: active slot %s fails its integrity check", app, st.active)
            other = st.other_slot()
            seq = s.committed_sequence(other)
            alt = s.read_slot(other) if seq is not None else None
            if alt is not None:
                st = replace(
                    st,
                    active=other,
                    active_sequence=seq or 0,
                    active_version=alt.parsed.version,
                    pending=None,
                    pending_sequence=None,
                    pending_version=None,
                    phase=Phase.COMMITTED,
                    last_error=f"slot {st.active} corrupt; fell back to committed slot {other}",
                    last_error_sequence=None,
                )
                active = alt
                why = why or st.last_error  # persisted below: status and the next boot agree
        plan = plan_boot(st, self.settings.trial_attempts)
        if plan.state != st or why:
            s.save(plan.state)
        if plan.note:
            log.warning("app %s: %s", app, plan.note)
            if plan.state.phase == Phase.ROLLED_BACK and st.phase == Phase.TRIAL:
                self.emit(
                    app,
                    Kind.ROLLED_BACK,
                    sequence=st.pending_sequence,
                    reason=Reason.TRIAL_INTERRUPTED,
                    reason_text=plan.state.last_error,
                )
        if plan.retrial:
            self.submit(lambda: self._retrial(app))
        if active is None:
            return None
        return Installed(parse_manifest(active.manifest), active.module)

    # -- the updater lane ---------------------------------------------------------------

    def start(self) -> None:
        makedirs(self.inbox)
        self.submit(lambda: None)  # a first inbox scan, and ``idle`` once it is done
        self._lane.every(self.settings.inbox_scan_s, lambda: self.submit(lambda: None))
        self._lane.resume()

    def stop(self) -> None:
        self._stop.set()
        self._lane.close(10)

    def submit(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the updater lane (any thread), then scan the inbox."""
        with self._lock:
            self._outstanding += 1
            self.idle.clear()
        self._lane.post(lambda: self._run(fn))

    def offer(self, manifest: bytes, module: bytes, source: str) -> None:
        """Hand a release to the updater (any thread); verified there."""
        self.submit(lambda: self._process(_Release(manifest, module, source)))

    def reject(self, manifest: bytes, error: VerificationError, source: str) -> None:
        """Record a release another channel refused (any thread). Remembered by
        digest and reported once; never blocks a later delivery."""
        self._rejected_as(peek_app(manifest), peek_sequence(manifest), digest(manifest), error, source)

    def unauthenticated_report(self) -> int | None:
        """May an event about unsigned input be sent now? None: no (counted);
        else how many were held back before it (the shared rate limit)."""
        return self._unauthenticated.allow(time.monotonic())

    def reject_document(self, app: str, document: bytes, error: VerificationError, what: str) -> None:
        """A refused document that is not a release (a rollout document): the same
        memory, the same once-per-digest report and rate limit; no sequence."""
        # The operator's rollout controller counts these (``document``), by the
        # version it published (as claimed by the unverified document).
        self._rejected_as(
            app,
            None,
            digest(document),
            error,
            "mqtt",
            prefix=f"{what}: ",
            document="rollout",
            rollout_version=claimed_version(document),
        )

    def note_failure(self, m: Manifest, reason: str, text: str, source: str) -> None:
        """A verified release that could not be taken (I/O error, stalled download):
        remembered by digest for status; its FAILED event is the caller's."""
        self.rejections.note(
            digest(m.raw),
            app=m.app,
            sequence=m.sequence,
            reason=reason,
            text=text,
            source=source,
            now=time.time(),
        )

    def note_downloading(self, m: Manifest, resumed: int) -> None:
        """A verified release's download started (any thread)."""

        def note() -> None:
            s = self.slots[m.app]
            st, _ = s.load()
            if st.phase != Phase.TRIAL and st.pending is None:
                cleared = replace(st, last_error=None, last_reason=None, last_error_sequence=None)
                if cleared != st or st.phase not in (Phase.IDLE, Phase.COMMITTED, Phase.DOWNLOADING):
                    # An earlier refusal (REJECTED with its sequence, ROLLED_BACK...) is
                    # cleared on disk: a restart must not bring it back and let a
                    # rollout count this device as failed for a release it takes.
                    s.save(replace(cleared, phase=Phase.DOWNLOADING))
                else:
                    # nothing to clear: after a power cut the download store resumes the download
                    s.note(replace(cleared, phase=Phase.DOWNLOADING))
            self.emit(
                m.app,
                Kind.DOWNLOADING,
                sequence=m.sequence,
                version=m.version,
                chunks=len(m.artifact.chunks),
                chunks_held=resumed,
            )

        self.submit(note)

    def _run(self, job: Callable[[], object]) -> None:
        try:
            if not self._stop.is_set():
                job()
                self._scan_inbox()
        except Exception:
            log.exception("updater job failed")
        finally:
            busy = self._pending_work()
            with self._lock:
                self._outstanding -= 1
                if self._outstanding == 0 and not busy:
                    self.idle.set()

    def _pending_work(self) -> bool:
        if self._deferred or any(self.host.on_trial(app) for app in self.slots):
            return True
        try:
            return any(
                p.suffix in self.inbox_suffixes and not self._still_refused(p)
                for p in map(self.inbox.joinpath, self.inbox_listing.names())
            )
        except OSError:
            return False

    # -- inbox (local channel) --------------------------------------------------------

    def _scan_inbox(self) -> None:
        for scan in self.inbox_scanners:
            scan()
        try:
            entries = self.inbox_listing.paths(".bundle")
        except OSError:
            return
        now = time.monotonic()
        for path in entries:
            if self._retry_at.get(path.name, 0) > now or self._still_refused(path):
                continue
            try:
                data = read_bundle(path)  # the size is checked before a byte is read
                man, module = bundle.unpack(data)
            except FileNotFoundError:
                continue  # gone since it was listed (taken or removed): nothing to refuse
            except (OSError, VerificationError) as e:
                self.emit(
                    "unknown",
                    Kind.REJECTED,
                    source=f"inbox:{path.name}",
                    reason=getattr(e, "reason", "unreadable"),
                    reason_text=f"{e} (moved to inbox/failed/)",
                )
                self._set_aside(path)
                continue
            try:
                done = self._process(_Release(man, module, f"inbox:{path.name}", path))
            except Exception as e:  # a bug must not wedge the inbox: set the bundle aside
                log.exception("processing %s failed", path.name)
                self.emit(
                    peek_app(man),
                    Kind.FAILED,
                    source=f"inbox:{path.name}",
                    reason=Reason.INTERNAL_ERROR,
                    reason_text=f"{type(e).__name__}: {e} (bundle moved to inbox/failed/)",
                )
                self._set_aside(path)
                continue
            if not done:
                return  # deferred (trial running): look again later

    def _discard(self, path: Path | None) -> None:
        if path is None:
            return
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            self._remember_refused(path, f"cannot remove {path.name}: {e}")
        self._retry_at.pop(path.name, None)
        self._retry_delay.pop(path.name, None)

    def _set_aside(self, path: Path) -> None:
        """Move a refused inbox file to inbox/failed/ (kept for the operator)."""
        try:
            makedirs(self.inbox / "failed")
            path.replace(self.inbox / "failed" / path.name)
        except FileNotFoundError:
            pass
        except OSError as e:
            self._remember_refused(path, f"cannot move {path.name} to inbox/failed/: {e}")
        self._retry_at.pop(path.name, None)
        self._retry_delay.pop(path.name, None)

    def _remember_refused(self, path: Path, why: str) -> None:
        """A refused file that cannot leave the inbox (read-only state dir) is not
        processed again, and not logged again, while it is unchanged."""
        self._inbox_log.log(logging.ERROR, "stuck", "inbox: %s; skipping it while it is unchanged", why)
        try:
            st = path.stat()
        except OSError:
            return
        self._refused[path.name] = (st.st_size, st.st_mtime_ns)
        while len(self._refused) > MAX_REMEMBERED:
            del self._refused[next(iter(self._refused))]

    def _still_refused(self, path: Path) -> bool:
        seen = self._refused.get(path.name)
        if seen is None:
            return False
        try:
            st = path.stat()
        except OSError:
            return True
        if (st.st_size, st.st_mtime_ns) == seen:
            return True
        del self._refused[path.name]  # replaced by a new file of the same name
        return False

    def _retry_later(self, path: Path | None) -> None:
        if path is None:
            return
        delay = min(MAX_RETRY_S, self._retry_delay.get(path.name, 0.5) * 2)
        self._retry_delay[path.name] = delay
        self._retry_at[path.name] = time.monotonic() + delay

    # -- one release ---------------------------------------------------------------------

    def _process(self, rel: _Release) -> bool:
        """Verify and start the trial of ``rel``. False if deferred."""
        app_name = peek_app(rel.manifest)
        if app_name in self.slots and self.host.on_trial(app_name):
            if rel.inbox_path is None:
                self._deferred[app_name] = rel
            return False
        try:
            m = self.verifier.release(rel.manifest, rel.module)
        except VerificationError as e:
            self._rejected(app_name, rel, e)
            self._discard(rel.inbox_path)
            return True
        try:
            self._stage(m, rel)
        except OSError as e:
            reason = f"staging failed: {e.strerror or e}; will retry"
            self.note_failure(m, Reason.IO_ERROR, reason, rel.source)
            self.emit(
                m.app,
                Kind.FAILED,
                sequence=m.sequence,
                version=m.version,
                reason=Reason.IO_ERROR,
                reason_text=reason,
                source=rel.source,
            )
            self._note_error(m.app, reason)
            self._retry_later(rel.inbox_path)
            return True
        self._discard(rel.inbox_path)
        return True

    def _rejected(self, app: str, rel: _Release, e: VerificationError) -> None:
        self._rejected_as(app, peek_sequence(rel.manifest), digest(rel.manifest), e, rel.source)

    def _rejected_as(
        self,
        app: str,
        seq: int | None,
        doc: str,
        e: VerificationError,
        source: str,
        prefix: str = "",
        **extra: Any,
    ) -> None:
        """Any thread. Never marks a sequence bad (only ``_rollback`` does)."""
        text = prefix + str(e)
        now = time.time()
        if not self.rejections.note(
            doc, app=app, sequence=seq, reason=e.reason, text=text, source=source, now=now
        ):
            return  # the same document refused for the same reason: said already
        fields: dict[str, Any] = dict(extra)
        unauthenticated = isinstance(e, UNAUTHENTICATED)
        if unauthenticated:
            held = self.unauthenticated_report()
            if held is None:
                return  # counted in ``suppressed`` of the next event let through
            fields["suppressed"] = held
        self.emit(
            app,
            Kind.REJECTED,
            sequence=seq,
            reason=e.reason,
            reason_text=text,
            source=source,
            digest=doc,
            **fields,
        )
        if app not in self.slots or seq is None or unauthenticated or isinstance(e, RollbackError):
            # Unauthenticated input changes nothing on the device; a replay of a
            # sequence already decided (committed, rolled back) changes nothing either.
            return
        self.submit(lambda: self._note_rejected(app, e, seq))

    def _note_rejected(self, app: str, e: VerificationError, seq: int | None = None) -> None:
        """Shown in status; an update under way keeps its phase (a refused
        replay must not make a crash mid-trial look like anything else)."""
        s = self.slots[app]
        st, _ = s.load()
        new = replace(st, last_error=str(e), last_reason=e.reason, last_error_sequence=seq)
        if st.pending is None:
            new = replace(new, phase=Phase.REJECTED)
        if new != st:
            s.save(new)

    def _note_error(self, app: str, text: str) -> None:
        s = self.slots[app]
        st, _ = s.load()
        s.save(replace(st, last_error=text, last_reason=Reason.IO_ERROR, last_error_sequence=None))

    def _stage(self, m: Manifest, rel: _Release) -> None:
        s = self.slots[m.app]
        st, _ = s.load()
        if st.pending is not None:  # a staged update superseded by a newer one
            st = clear_pending(st, Phase.IDLE)
            s.save(st)
        slot = st.other_slot()
        s.write_slot(slot, rel.module, rel.manifest)
        self.trust.raise_floor(m.issued, now=self.verifier.now())
        # STAGED and the trial's first attempt are one write: the trial starts at
        # once, and a power cut before any of its code ran counts as an attempt
        # all the same (there are ``trial_attempts``, 2 by default).
        st = plan_trial(plan_stage(st, slot, m))
        s.save(st)
        # Announced only once written: whoever holds the release's bytes (the
        # downloaded chunks, update.delivery) lets go of them on this event.
        self.emit(m.app, Kind.STAGED, sequence=m.sequence, version=m.version, slot=slot, source=rel.source)
        self._start_trial(m, rel.module, st)

    def _retrial(self, app: str) -> None:
        s = self.slots[app]
        st, _ = s.load()
        if st.pending is None:
            return
        content = s.read_slot(st.pending)
        try:
            if content is None:
                raise MalformedError(f"staged slot {st.pending} is incomplete or corrupt")
            m = self.verifier.release(content.manifest, content.module)
        except VerificationError as e:
            self.emit(
                app,
                Kind.REJECTED,
                sequence=st.pending_sequence,
                reason=e.reason,
                reason_text=f"staged update no longer verifies: {e}",
            )
            new = replace(
                clear_pending(st, Phase.REJECTED),
                last_error=str(e),
                last_reason=e.reason,
                last_error_sequence=st.pending_sequence,
            )
            s.save(new)  # not marked bad: it never ran; a genuine redelivery is taken afresh
            return
        st = plan_trial(st)
        s.save(st)  # persisted before any of the new code is compiled or run
        self._start_trial(m, content.module, st)

    def _start_trial(self, m: Manifest, module: bytes, st: AppState) -> None:
        """``st``: the trial's state (TRIAL, the attempt counted), written already
        by the caller -- before any of the new code is compiled or run."""
        # Make: compile, instantiate and run dr_init here, on the updater lane,
        # while the old version keeps ticking on the scheduler lane.
        try:
            candidate = self.host.prepare(m.app, m, module)
        except DeviceRunnerError as e:
            self._rollback(m, str(e))
            return
        # Break: one switch between two ticks; the host watches the trial.
        try:
            self.host.begin_trial(m.app, m, candidate, lambda verdict: self._on_verdict(m, verdict))
        except Exception as e:
            text = str(e) if isinstance(e, DeviceRunnerError) else f"{type(e).__name__}: {e}"
            self._rollback(m, text)
            return
        # the event means: the new version is running, on trial
        self.emit(m.app, Kind.TRIAL, sequence=m.sequence, version=m.version, attempt=st.trial_attempts)

    def _on_verdict(self, m: Manifest, verdict: str) -> None:
        """From the host (its scheduler lane): carry the verdict out here."""
        if verdict == PASSED:
            self.submit(lambda: self._commit(m))
        else:
            self.submit(lambda: self._rollback(m, verdict))

    # -- back on the updater lane -----------------------------------------------------

    def _commit(self, m: Manifest) -> None:
        s = self.slots[m.app]
        st, _ = s.load()
        if st.pending is None or st.pending_sequence != m.sequence:
            return
        s.mark_committed(st.pending, m.sequence)
        s.save(plan_commit(st, m))
        self.host.end_trial(m.app)  # release the warm old instance before announcing
        self.emit(m.app, Kind.COMMITTED, sequence=m.sequence, version=m.version)
        self._resume_deferred(m.app)

    def _rollback(self, m: Manifest, reason: str) -> None:
        s = self.slots[m.app]
        st, _ = s.load()
        s.save(plan_rollback(st, m.sequence, reason))
        self.emit(
            m.app,
            Kind.ROLLED_BACK,
            sequence=m.sequence,
            version=m.version,
            reason=Reason.TRIAL_FAILED,
            reason_text=reason,
        )
        self._resume_deferred(m.app)

    def resume_deferred(self, app: str) -> None:
        """A trial of ``app`` ended (a config trial, too): a release that waited goes now."""
        self._resume_deferred(app)

    def _resume_deferred(self, app: str) -> None:
        rel = self._deferred.pop(app, None)
        if rel is not None:
            self.submit(lambda: self._process(rel))


# -- install (any process) ---------------------------------------------------------------


def read_bundle(path: Path, max_bytes: int = bundle.MAX_BUNDLE_BYTES) -> bytes:
    """A bundle file's bytes; TooLargeError before reading one larger than
    ``max_bytes`` (a 1.5 GB file must not cost 1.5 GB of RAM to refuse)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise TooLargeError(f"bundle {path.name} is {size} bytes, the limit is {max_bytes}")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TooLargeError(f"bundle {path.name} grew past {max_bytes} bytes while being read")
    return data


def install_bundle(state_dir: Path, data: bytes) -> Path:
    """Drop a bundle into the inbox atomically (the local channel)."""
    man, _ = bundle.unpack(data)  # refuse what is not even a bundle, early and clearly
    parse_manifest(man)
    inbox = Path(state_dir) / "inbox"
    makedirs(inbox)
    path = inbox / f"{int(time.time() * 1000):015d}-{hashlib.sha256(data).hexdigest()[:16]}.bundle"
    atomic_write(path, data)
    return path
