"""Signed app configuration on the device: verify, stage, trial, commit or roll back.

What this module owns: ``apps/<app>/config/`` (config documents by version,
``state.json``, the last config rollout document) and the config flow. It
runs every step on the *updater lane* (``Updater.submit``), so a module
update and a config update are ordered, never mixed: while either kind of
trial runs (``ConfigHost.on_trial``), the other waits — a release goes to
the updater's deferred slot, a config to ``pending`` here — and starts when
the trial ends. It sees the device only through ``ConfigHost`` (implemented
by device.trials.TrialHost) and never runs Wasm itself.

A config trial is the module update's trial with a new config instead of a
new module (devicerunner.trial rules; ``health`` from the config document,
else from the running release): make-before-break, the candidate instance
(same module, new settings) is instantiated and its ``dr_init`` run on the
updater lane while the old one ticks; the scheduler switches between two
ticks and keeps the old one warm until the verdict; a failure switches back
at once and refuses that config version for ever.

Order of writes (each crash-safe; ``config/state.json`` is the commit point):

1. ``config/v<N>.json`` (the verified envelope), then state: STAGED, candidate N;
2. state: TRIAL, trial_attempts += 1 — before the app runs with it;
3. pass: state COMMITTED, active N (its sha256 pinned); older documents removed;
   fail: state ROLLED_BACK, N refused, reason recorded; v<N>.json removed.

At boot a TRIAL with ``trial_attempts >= device.trial_attempts`` rolls back
(the crash counts as a failed attempt); a STAGED or TRIAL config is verified
again and tried again. The active document is read back and must match the
sha256 in the state; a file that does not is not used (the app starts with
no config and the state says why) — never a half-written one.

The decisions (what each step changes in the state) are pure, in
update.config_state; this module carries them out.

Rejections: only a version trialled here and rolled back is refused for
ever. Any other failure is remembered by the document's digest (bounded;
on disk only when the document was authentically signed, so forged traffic
cannot wear the flash) so that it is reported once; a remembered document
is still verified again when it comes back (the root or the time floor may
have changed), and a genuine document is processed afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

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
from devicerunner.runtime.fsutil import atomic_write, makedirs
from devicerunner.runtime.statefile import StateFileError, read_bounded
from devicerunner.trust.appconfig import (
    MAX_CONFIG_BYTES,
    ConfigDoc,
    digest_of,
    parse_config,
    verify_config,
)
from devicerunner.trust.manifest import MAX_ROLLOUT_BYTES, Health, RolloutDoc, parse_manifest
from devicerunner.trust.store import TrustStore
from devicerunner.update.config_state import (
    COMMITTED,
    FAILED,
    IDLE,
    REJECTED,
    ROLLED_BACK,
    STAGED,
    TRIAL,
    ConfigState,
    eligible,
    plan_boot,
    plan_commit,
    plan_reject,
    plan_rollback,
    plan_stage,
    settings_of,
)
from devicerunner.update.events import Event, Kind, Reason
from devicerunner.update.host import Candidate, UpdateSettings, Verdict
from devicerunner.update.rollouts import claimed_version
from devicerunner.update.trial import PASSED
from devicerunner.update.updater import Updater
from hostfuncs.config import AppSettings


class ConfigHost(Protocol):
    """What the config flow may ask of the device that runs the apps."""

    def prepare_config(self, app: str, settings: AppSettings) -> Candidate:
        """Start the module ``app`` runs now again with ``settings`` (instantiate,
        ``dr_init``) while the current instance keeps ticking. Raises
        DeviceRunnerError (SandboxError...)."""
        ...

    def begin_config_trial(self, app: str, health: Health, candidate: Candidate, on_verdict: Verdict) -> None:
        """Switch the candidate in between two ticks (the old instance stays
        warm) and watch it under ``health``; on a failure the host has switched
        back before ``on_verdict`` runs."""
        ...

    def end_trial(self, app: str) -> None: ...

    def on_trial(self, app: str) -> bool: ...

    def running(self, app: str) -> bool:
        """Is ``app`` running (something to try a config with)?"""
        ...

    def commit_config(self, app: str, settings: AppSettings) -> None:
        """From now on every new instance of ``app`` (an update, a restart of the
        daemon's apps) starts with ``settings``."""
        ...


log = logging.getLogger(__name__)

MAX_STATE_BYTES = 1024 * 1024
"""config/state.json is a few hundred bytes; anything larger is not ours."""

EVENT = {
    STAGED: Kind.CONFIG_STAGED,
    TRIAL: Kind.CONFIG_TRIAL,
    COMMITTED: Kind.CONFIG_COMMITTED,
    ROLLED_BACK: Kind.CONFIG_ROLLED_BACK,
    REJECTED: Kind.CONFIG_REJECTED,
    FAILED: Kind.CONFIG_FAILED,
}
"""Event kinds (``CONFIG_COMMITTED``...): distinct from a release's, so no
consumer of release events mistakes one for the other."""
MAX_SEEN = 256
"""Digests kept in memory (any refused document, signed or not)."""
DEFAULT_HEALTH = Health(trial_ticks=50, trial_seconds=5, max_traps=0, max_overruns=0, max_broker_loss_s=60)
INBOX_SUFFIX = ".config"
UNAUTHENTICATED = (NoTrustRootError, BadSignatureError, ThresholdError, MalformedError, TooLargeError)
ROLLOUT_FILE = "rollout.json"


# -- files -----------------------------------------------------------------------------


class ConfigFiles:
    """``apps/<app>/config/``: the only writer of config files."""

    def __init__(self, state_dir: Path, app: str) -> None:
        self.app = app
        self.dir = Path(state_dir) / "apps" / app / "config"
        self.state_path = self.dir / "state.json"

    def load(self) -> ConfigState:
        try:
            data = read_bounded(self.state_path, MAX_STATE_BYTES)  # size checked before reading
            if data is None:
                return ConfigState()
            return ConfigState.from_json(data)
        except (OSError, ValueError, TypeError, RecursionError) as e:
            # No config is a safe state: the app runs as its release has it.
            log.error("app %s: config state unreadable (%s); starting without a config", self.app, e)
            return ConfigState(last_error=f"config state unreadable: {e}", last_reason=Reason.STATE_CORRUPT)

    def save(self, st: ConfigState) -> None:
        makedirs(self.dir)
        atomic_write(self.state_path, st.to_json())

    def doc_path(self, version: int) -> Path:
        return self.dir / f"v{version}.json"

    def write_doc(self, doc: ConfigDoc) -> None:
        makedirs(self.dir)
        atomic_write(self.doc_path(doc.version), doc.raw)

    def read_doc(self, version: int, sha256: str | None) -> bytes | None:
        """The stored document, if it is exactly the one the state pins."""
        try:
            data = read_bounded(self.doc_path(version), MAX_CONFIG_BYTES)
        except (OSError, StateFileError):
            return None
        return (
            data
            if data is not None and sha256 is not None and hashlib.sha256(data).hexdigest() == sha256
            else None
        )

    def keep_only(self, *versions: int | None) -> None:
        keep = {f"v{v}.json" for v in versions if v}
        with contextlib.suppress(OSError):
            for p in self.dir.iterdir():
                if p.name.startswith("v") and p.suffix == ".json" and p.name not in keep:
                    p.unlink()


# -- the flow (updater lane) -------------------------------------------------------------


class ConfigUpdates:
    """The device's config flow. Public methods may be called from any thread;
    the work runs on the updater lane (and, for the switch, the scheduler lane)."""

    def __init__(
        self, settings: UpdateSettings, host: ConfigHost, trust_store: TrustStore, updater: Updater
    ) -> None:
        self.settings = settings
        self.host = host
        self.trust = trust_store
        self.updater = updater
        self.device_id = settings.identity.device_id
        self.files = {name: ConfigFiles(settings.state_dir, name) for name in settings.channels}
        self.rollouts: dict[str, RolloutDoc] = {}
        self.waiting: dict[str, ConfigDoc] = {}
        """app -> a verified config this device is not (yet) in the rollout of."""
        self.pending: dict[str, bytes] = {}
        """app -> the newest config that arrived while a trial was running."""
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._trials: dict[str, ConfigDoc] = {}
        self.inbox = updater.inbox
        self._listing = updater.inbox_listing
        updater.listeners.append(self._on_update_event)
        updater.inbox_scanners.append(self._scan_inbox)
        updater.inbox_suffixes.add(INBOX_SUFFIX)

    # -- boot (before the apps start) ---------------------------------------------------

    def boot(self) -> None:
        """Restore each app's committed config (so its first instance starts with
        it) and queue an interrupted trial to run again once the device runs."""
        for name, files in self.files.items():
            st = files.load()
            new, retry, note = plan_boot(st, self.settings.trial_attempts)
            if note:
                log.warning("app %s: %s", name, note)
            if new != st:
                files.save(new)
                if new.phase == ROLLED_BACK:
                    self._emit(
                        name, ROLLED_BACK, st.candidate_version, Reason.TRIAL_INTERRUPTED, new.last_error
                    )
            if new.active_version:
                data = files.read_doc(new.active_version, new.active_sha256)
                try:
                    if data is None:
                        raise MalformedError(f"config v{new.active_version} is missing or does not match")
                    self.host.commit_config(name, settings_of(parse_config(data)))
                except VerificationError as e:
                    log.error("app %s: active config unusable: %s", name, e)
                    files.save(replace(new, last_error=str(e), last_reason=Reason.CONFIG_CORRUPT))
            if retry and new.candidate_version is not None:
                data = files.read_doc(new.candidate_version, new.candidate_sha256)
                if data is not None:
                    self.pending[name] = data
                else:  # not a trial failure: nothing is refused, a redelivery is taken afresh
                    log.error("app %s: staged config v%d is missing or corrupt", name, new.candidate_version)
                    files.save(
                        replace(
                            new,
                            phase=IDLE,
                            candidate_version=None,
                            candidate_sha256=None,
                            trial_attempts=0,
                            last_error="staged config file missing or corrupt",
                            last_reason=Reason.CONFIG_CORRUPT,
                        )
                    )
            self._restore_rollout(name)

    def start(self) -> None:
        """The device runs: try what boot queued."""
        for name in list(self.pending):
            self._retry(name)

    # -- inbound (any thread; the channel's ConfigInbound) ---------------------------------

    def offer(self, data: bytes, source: str) -> None:
        """A config document arrived (MQTT, a test, a local tool)."""
        if data:
            self.updater.submit(lambda: self._process(data, source))

    def on_rollout(self, data: bytes) -> None:
        """A config rollout document (signed by the rollout role) arrived."""
        if data:
            self.updater.submit(lambda: self._rollout(data))

    def on_config(self, app: str, payload: bytes) -> None:
        self.offer(payload, "mqtt")

    def on_config_rollout(self, app: str, payload: bytes) -> None:
        self.on_rollout(payload)

    # -- status ------------------------------------------------------------------------

    def status(self, app: str) -> dict[str, Any]:
        st = self.files[app].load()
        trial = self._trials.get(app)
        return {
            "version": st.active_version,
            "phase": st.phase,
            "candidate_version": st.candidate_version,
            "on_trial": trial.version if trial else None,
            "refused_versions": sorted(st.bad),
            "last_error": st.last_error,
            "last_reason": st.last_reason,
        }

    # -- on the updater lane ---------------------------------------------------------------

    def _emit(
        self,
        app: str,
        phase: str,
        version: int | None,
        reason: str | None = None,
        text: Any = None,
        **kw: Any,
    ) -> None:
        fields: dict[str, Any] = {"config_version": version, **kw}
        if reason:
            fields.update(reason=reason, reason_text=text)
        self.updater.emit(app, EVENT[phase], **fields)

    def _remember(self, digest: str) -> None:
        self._seen[digest] = None
        while len(self._seen) > MAX_SEEN:
            self._seen.popitem(last=False)

    def _verify(self, data: bytes, st: ConfigState, app: str | None) -> ConfigDoc:
        return verify_config(
            data,
            root=self.updater.verifier.root(),
            device=self.settings.identity,
            channel=self.settings.channels.get(app) if app is not None else None,
            history=st.history(),
            time_floor=self.trust.time_floor,
            now=self.updater.verifier.now(),  # the device's clock: it may be off
        )

    def _process(self, data: bytes, source: str) -> None:
        digest = digest_of(data)
        app = _peek_app(data)
        files = self.files.get(app) if app else None
        st = files.load() if files else ConfigState()
        known = digest in self._seen or digest in st.rejected
        try:
            doc = self._verify(data, st, app)
        except RollbackError as e:
            log.info("config for %s not taken: %s", app, e)  # decided before: not news
            return
        except VerificationError as e:
            if known:
                # Refused before and reported then (a retained document comes back on
                # every reconnect). It was verified again all the same: what made it
                # fail (the root, the time floor) may have changed since.
                log.debug("config for %s still refused: %s", app, e)
                return
            self._remember(digest)
            extra: dict[str, Any] = {}
            if isinstance(e, UNAUTHENTICATED):  # anyone can publish thousands: rate-limited
                held = self.updater.unauthenticated_report()
                if held is None:
                    return
                extra["suppressed"] = held
            self._emit(
                app or "unknown", REJECTED, _peek_version(data), e.reason, str(e), source=source, **extra
            )
            if files is not None and not isinstance(e, UNAUTHENTICATED):
                files.save(plan_reject(st, digest, e))
            return
        self._seen.pop(digest, None)
        if not eligible(self.device_id, doc, self.rollouts.get(doc.app)):
            log.info("config %s v%d is not for this device yet (rollout)", doc.app, doc.version)
            self.waiting[doc.app] = doc
            return
        self._take(doc, data)

    def _rollout(self, data: bytes) -> None:
        if len(data) > MAX_ROLLOUT_BYTES:
            return
        try:
            app = str(json.loads(data)["signed"]["app"])
        except (ValueError, KeyError, TypeError):
            return
        if app not in self.files:
            return
        current = self.rollouts.get(app)
        try:
            doc = self.updater.verifier.rollout(data, current.version if current else 0)
        except RollbackError:
            return
        except VerificationError as e:
            self._emit(
                app,
                REJECTED,
                None,
                e.reason,
                f"config rollout document: {e}",
                document="rollout",  # counted by the rollout controller (by version)
                rollout_version=claimed_version(data),
            )
            return
        if doc.kind != "config" or doc.app != app:
            return
        self.rollouts[app] = doc
        try:  # kept across reboots: a replayed older document stays refused
            makedirs(self.files[app].dir)
            atomic_write(self.files[app].dir / ROLLOUT_FILE, data)
        except OSError as e:
            log.warning("config rollout document for %s not persisted: %s", app, e)
        waiting = self.waiting.get(app)
        if waiting is not None and eligible(self.device_id, waiting, doc):
            del self.waiting[app]
            self._process(waiting.raw, "rollout")

    def _restore_rollout(self, app: str) -> None:
        try:
            data = read_bounded(self.files[app].dir / ROLLOUT_FILE, MAX_ROLLOUT_BYTES)
        except (OSError, StateFileError):
            return
        if data is None:
            return
        try:
            doc = self.updater.verifier.rollout(data, last_version=0)
        except VerificationError as e:
            log.info("stored config rollout document for %s no longer applies: %s", app, e)
            return
        if doc.kind == "config" and doc.app == app:
            self.rollouts[app] = doc

    def _scan_inbox(self) -> None:
        """The local channel (``config install``): each ``inbox/*.config`` is taken
        like a message on the config topic, then removed; one whose app is on
        trial now stays for a later scan (so a stop loses nothing)."""
        try:
            entries = self._listing.paths(INBOX_SUFFIX)
        except OSError:
            return
        for path in entries:
            try:
                if path.stat().st_size > MAX_CONFIG_BYTES:
                    raise TooLargeError(f"{path.name}: larger than {MAX_CONFIG_BYTES} bytes")
                data = path.read_bytes()
            except FileNotFoundError:
                continue  # gone since it was listed: nothing to refuse
            except (OSError, TooLargeError) as e:
                self._emit("unknown", REJECTED, None, getattr(e, "reason", "unreadable"), str(e))
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            app = _peek_app(data)
            if app in self.files and self._busy(app):
                continue  # a trial runs: look again later
            self._process(data, f"inbox:{path.name}")
            with contextlib.suppress(OSError):
                path.unlink()

    def _busy(self, app: str) -> bool:
        return not self.host.running(app) or self.host.on_trial(app)

    def _take(self, doc: ConfigDoc, data: bytes) -> None:
        if self._busy(doc.app):
            # a trial (module or config) is running, or the app is not: wait, newest only
            self.pending[doc.app] = data
            log.info("config %s v%d waits: the app is on trial or not running", doc.app, doc.version)
            return
        self.waiting.pop(doc.app, None)
        files = self.files[doc.app]
        st = files.load()
        try:
            files.write_doc(doc)
            st = plan_stage(st, doc)
            files.save(st)
        except OSError as e:
            self._emit(doc.app, FAILED, doc.version, Reason.IO_ERROR, f"staging failed: {e}; will retry")
            self.pending[doc.app] = data
            return
        self.trust.raise_floor(doc.issued, now=self.updater.verifier.now())
        self._emit(doc.app, STAGED, doc.version)
        self._start_trial(doc, st)

    def _health(self, app: str, doc: ConfigDoc) -> Health:
        if doc.health is not None:
            return doc.health
        slots = self.updater.slots[app]
        st, _ = slots.load()
        content = slots.read_slot(st.active) if st.active else None
        if content is not None:
            with contextlib.suppress(VerificationError):
                return parse_manifest(content.manifest).health
        return DEFAULT_HEALTH

    def _start_trial(self, doc: ConfigDoc, st: ConfigState) -> None:
        files = self.files[doc.app]
        st = replace(st, phase=TRIAL, trial_attempts=st.trial_attempts + 1)
        files.save(st)  # persisted before the app runs with the new config
        self._trials[doc.app] = doc
        try:
            candidate = self.host.prepare_config(doc.app, settings_of(doc))
        except DeviceRunnerError as e:
            self._rollback(doc, f"with config v{doc.version}: {e}")
            return
        try:
            self.host.begin_config_trial(
                doc.app, self._health(doc.app, doc), candidate, lambda verdict: self._on_verdict(doc, verdict)
            )
        except Exception as e:
            text = str(e) if isinstance(e, DeviceRunnerError) else f"{type(e).__name__}: {e}"
            self._rollback(doc, text)
            return
        self._emit(doc.app, TRIAL, doc.version, attempt=st.trial_attempts)

    def _on_verdict(self, doc: ConfigDoc, verdict: str) -> None:
        """From the host (its scheduler lane): carry the verdict out on the updater lane."""
        if verdict == PASSED:
            self.updater.submit(lambda: self._commit(doc))
        else:
            self.updater.submit(lambda: self._rollback(doc, f"with config v{doc.version}: {verdict}"))

    # -- back on the updater lane ------------------------------------------------------------

    def _commit(self, doc: ConfigDoc) -> None:
        files = self.files[doc.app]
        st = files.load()
        if st.candidate_version != doc.version:
            return
        st = plan_commit(st)
        files.save(st)  # the commit point
        self.host.commit_config(doc.app, settings_of(doc))
        self.host.end_trial(doc.app)  # free the warm old instance before announcing
        self._trials.pop(doc.app, None)
        files.keep_only(st.active_version)
        self._emit(doc.app, COMMITTED, doc.version)
        self._after_trial(doc.app)

    def _rollback(self, doc: ConfigDoc, reason: str) -> None:
        files = self.files[doc.app]
        st = files.load()
        if st.candidate_version == doc.version:
            st = plan_rollback(st, reason)
            files.save(st)
        self._trials.pop(doc.app, None)
        files.keep_only(st.active_version)
        self._emit(doc.app, ROLLED_BACK, doc.version, Reason.TRIAL_FAILED, reason)
        self._after_trial(doc.app)

    def _after_trial(self, app: str) -> None:
        """A trial ended: a release that waited for it goes first, then a newer config."""
        self.updater.resume_deferred(app)
        self._retry(app)

    def _retry(self, app: str) -> None:
        data = self.pending.pop(app, None)
        if data is not None:
            self.updater.submit(lambda: self._process(data, "pending"))

    def _on_update_event(self, ev: Event) -> None:
        """A release's trial ended (or the app started): a waiting config may go."""
        if ev.kind in (Kind.COMMITTED, Kind.ROLLED_BACK, Kind.REJECTED) and ev.app in self.pending:
            self._retry(ev.app)


def install_config(state_dir: Path, data: bytes) -> Path:
    """Drop a config document into the inbox atomically (the local channel)."""
    parse_config(data)  # refuse what is not even a config document, early and clearly
    inbox = Path(state_dir) / "inbox"
    makedirs(inbox)
    path = inbox / f"{int(time.time() * 1000):015d}-{digest_of(data)[:16]}{INBOX_SUFFIX}"
    atomic_write(path, data)
    return path


def _peek_app(data: bytes) -> str | None:
    if len(data) > MAX_CONFIG_BYTES:
        return None
    try:
        app = json.loads(data)["signed"]["app"]
    except (ValueError, KeyError, TypeError):
        return None
    return app if isinstance(app, str) and len(app) <= 64 else None


def _peek_version(data: bytes) -> int | None:
    if len(data) > MAX_CONFIG_BYTES:
        return None
    try:
        v = json.loads(data)["signed"]["version"]
    except (ValueError, KeyError, TypeError):
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) else None
