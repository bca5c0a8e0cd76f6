"""Staged rollouts: raise a release's percent step by step, watch the fleet,
pause when failures cross the threshold (like AWS IoT Jobs' abort criteria
and hawkBit's error threshold).

``decide`` is pure. ``RolloutController`` does the I/O: it signs rollout
documents with the ``rollout`` key (the online role: it can move or pause a
release the offline release keys signed, nothing else), publishes them
retained on ``{p}/rollouts/{app}/{channel}``, and reads device status and
events from the broker.

Every device the step includes (by the stable hash of its id) is in exactly
one of: pending, committed, failed (REJECTED, ROLLED_BACK or FAILED for this
release, or its rollout document refused: an event with ``"document":
"rollout"``), timed out (no result within ``device_timeout_s`` of being
included). A step pauses the rollout when failed and timed out together are
above the threshold, or when no included device has taken the release within
``device_timeout_s``. The rollout is "completed" only when every included
device committed; otherwise it ends "incomplete" (exit non-zero).

Before the first step the release and every chunk (or the config), and
each rollout document, are read back from the broker: a broker may
acknowledge a publish its ACL refused (``operator.NotStoredError``). What
the broker already holds, identical, is not published again.

The same controller stages a signed app configuration (``data`` is then a
config document, not a bundle): its rollout documents have ``kind:
config`` and go to ``{p}/rollouts/{app}/{channel}/config``, the config is
published retained on ``{p}/configs/{app}/{channel}``, and a device counts
as committed when its status shows that ``config_version`` COMMITTED, as
failed on CONFIG_REJECTED / CONFIG_ROLLED_BACK / CONFIG_FAILED.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devicerunner.errors import DeviceRunnerError
from devicerunner.transport import operator, reports, topics
from devicerunner.transport.settings import BrokerSettings
from devicerunner.trust import bundle, manifest
from devicerunner.trust import verify as trust
from devicerunner.trust.appconfig import parse_config

FAILED_PHASES = ("REJECTED", "ROLLED_BACK", "FAILED")
CONFIG_FAILED_PHASES = ("CONFIG_REJECTED", "CONFIG_ROLLED_BACK", "CONFIG_FAILED")
log = logging.getLogger(__name__)


class RolloutError(DeviceRunnerError):
    pass


@dataclass(frozen=True)
class Policy:
    steps: tuple[int, ...]
    step_wait_s: float
    abort_failure_pct: float
    min_devices: int
    device_timeout_s: float


def decide(included: int, failed: int, policy: Policy) -> str:
    """'abort' when enough devices are in and the failure share is above the threshold."""
    if included >= policy.min_devices and included and failed * 100.0 / included > policy.abort_failure_pct:
        return "abort"
    return "continue"


@dataclass
class DeviceView:
    id: str
    hardware: str = "?"
    online: bool = True
    included_at: float | None = None
    taken: bool = False
    """Any sign the device acts on this release (an event for its sequence, a status naming it)."""
    result: str | None = None  # None (pending) | "committed" | "failed" | "timed_out"
    reason: str | None = None
    refused_document: bool = False


@dataclass
class FleetView:
    devices: dict[str, DeviceView] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def dev(self, d: str) -> DeviceView:
        v = self.devices.get(d)
        if v is None:
            v = self.devices[d] = DeviceView(d)
        return v


COUNT_KEYS = ("eligible", "pending", "committed", "failed", "timed_out")


@dataclass(frozen=True)
class Target:
    """What a rollout moves: a release (by sequence) or a config (by version)."""

    kind: str  # "release" | "config"
    app: str
    channel: str
    number: int
    """The release's sequence or the config's version."""
    label: str
    salt: str
    default_percent: int
    hardware: tuple[str, ...]
    devices: tuple[str, ...]

    @property
    def event_key(self) -> str:
        return "sequence" if self.kind == "release" else "config_version"

    def committed_in(self, app: reports.AppReport) -> bool:
        if self.kind == "release":
            return app.sequence == self.number and app.phase == "COMMITTED"
        return app.config_version == self.number and app.config_phase == "COMMITTED"

    def taken_in(self, app: reports.AppReport) -> bool:
        """The device acts on it (downloading, staged, on trial, or done)."""
        if self.kind == "release":
            return self.number in (app.sequence, app.pending_sequence)
        return self.number in (app.config_version, app.config_on_trial)

    def failed_in(self, app: reports.AppReport) -> str | None:
        """Why the device's status says it will never take this release, if it does."""
        if self.kind == "release" and app.last_error_sequence == self.number and app.phase in FAILED_PHASES:
            return f"{app.last_reason}: {app.last_error or ''}"
        return None

    def number_in(self, ev: reports.DeviceEvent) -> int | None:
        return ev.sequence if self.kind == "release" else ev.config_version

    def committed_phase(self) -> str:
        return "COMMITTED" if self.kind == "release" else "CONFIG_COMMITTED"

    def failed_phases(self) -> tuple[str, ...]:
        return FAILED_PHASES if self.kind == "release" else CONFIG_FAILED_PHASES


def target_of(data: bytes) -> Target:
    """A release bundle or a config document (MalformedError if neither)."""
    if data[:1] == b"{":
        c = parse_config(data)
        t = c.targets
        return Target(
            "config", c.app, c.channel, c.version, f"config v{c.version}", t.rollout_salt,
            t.rollout_percent, t.hardware, t.devices,
        )  # fmt: skip
    man, _ = bundle.unpack(data)
    m = manifest.parse_manifest(man)
    t = m.targets
    return Target(
        "release", m.app, m.channel, m.sequence, m.version, t.rollout_salt, t.rollout_percent,
        t.hardware, t.devices,
    )  # fmt: skip


class RolloutController:
    def __init__(
        self,
        s: BrokerSettings,
        prefix: str,
        data: bytes,
        key: Ed25519PrivateKey,
        policy: Policy,
        emit: Callable[[dict[str, Any]], None],
        *,
        retain: bool = True,
        artifact_dir: Path | None = None,
    ) -> None:
        """``retain=False``: a broker without retained messages; ``artifact_dir``:
        also keep the release and rollout documents where serve-artifacts reads them."""
        self.s, self.p, self.key, self.policy, self._emit = s, prefix, key, policy, emit
        self.retain = retain
        self.artifact_dir = artifact_dir
        self.data = data
        self.t = target_of(data)
        if self.t.default_percent > policy.steps[0]:
            raise RolloutError(
                f"the {self.t.kind}'s default rollout is {self.t.default_percent}%, above the first step "
                f"({policy.steps[0]}%): devices would take it before the rollout starts. Sign it with "
                "--rollout-percent 0 for a staged rollout."
            )
        self.fleet = FleetView()
        self.reader = reports.Reader(prefix, log)
        self.version = int(time.time() * 1000)
        self.versions: set[int] = set()
        """Versions of the rollout documents this controller published."""
        self.published_percent: int | None = None
        self.paused = False
        self.step: int | None = None
        self.last_counts: dict[str, Any] = {}

    def emit(self, ev: dict[str, Any]) -> None:
        self._emit({"ts": round(time.time(), 3), **ev})

    # -- broker callbacks (paho thread) -------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            msg = self.reader.read(topic, payload)
            if isinstance(msg, reports.DeviceStatus):
                self._on_status(msg)
            elif isinstance(msg, reports.DeviceEvent):
                self._on_event(msg)
        except Exception:  # never lose paho's thread to one message
            log.exception("rollout: message on %s not handled", topic)

    def _on_status(self, st: reports.DeviceStatus) -> None:
        t = self.t
        app = st.apps.get(t.app)
        with self.fleet.lock:
            known = self.fleet.devices.get(st.device)
            if known is not None:
                known.online = st.online  # a last will has no apps
            if app is None or st.hardware not in t.hardware:
                return
            if t.devices and st.device not in t.devices:
                return
            v = self.fleet.dev(st.device)
            v.hardware, v.online = st.hardware, st.online
            if t.taken_in(app):
                v.taken = True
            failed = t.failed_in(app)
            if t.committed_in(app):
                v.result, v.reason = "committed", None
            elif failed is not None and v.result in (None, "timed_out"):
                # decided before this run (a rollout resumed after Ctrl-C): it will
                # never take this sequence again, so it is not left pending
                v.taken = True
                v.result, v.reason = "failed", failed[:300]

    def _on_event(self, ev: reports.DeviceEvent) -> None:
        t = self.t
        if ev.app != t.app:
            return
        with self.fleet.lock:
            if ev.document == "rollout":
                if ev.phase not in ("REJECTED", "CONFIG_REJECTED") or (
                    ev.rollout_version is not None and ev.rollout_version not in self.versions
                ):
                    return
                v = self.fleet.dev(ev.device)
                v.refused_document = True
                if v.result in (None, "timed_out"):
                    v.result = "failed"
                    v.reason = f"rollout document refused: {ev.reason}: {ev.reason_text or ''}"[:300]
                return
            if t.number_in(ev) != t.number:
                return
            v = self.fleet.dev(ev.device)
            v.taken = True
            if ev.phase == t.committed_phase():
                v.result, v.reason = "committed", None
            elif ev.phase in t.failed_phases() and v.result in (None, "timed_out"):
                v.result, v.reason = "failed", f"{ev.reason}: {ev.reason_text or ''}"[:300]

    # -- the rollout -----------------------------------------------------------------

    def _publish_doc(self, sess: operator.Session, percent: int, paused: bool) -> None:
        self.version += 1
        now = int(time.time())
        t = self.t
        signed = manifest.rollout_signed(
            app=t.app,
            channel=t.channel,
            sequence=t.number,
            percent=percent,
            salt=t.salt,
            paused=paused,
            version=self.version,
            issued=now,
            expires=now + 7 * 86_400,
            kind=t.kind,
        )
        doc = manifest.sign_envelope(signed, [self.key])
        topic = (topics.rollout if t.kind == "release" else topics.config_rollout)(self.p, t.app, t.channel)
        self.versions.add(self.version)
        if self.artifact_dir is not None and t.kind == "release":
            from devicerunner.fleet.artifacts import ArtifactDir

            ArtifactDir(self.artifact_dir).put_document(f"rollouts/{t.app}/{t.channel}", doc)
        sess.publish_many([(topic, doc)], retain=self.retain)
        if self.retain:
            sess.check_stored({topic: doc}, [topic], "the rollout document")
        self.published_percent, self.paused = percent, paused

    def _counts(self, now: float) -> dict[str, Any]:
        with self.fleet.lock:
            inc = [v for v in self.fleet.devices.values() if v.included_at is not None]
            for v in inc:
                if v.result is None and now - (v.included_at or now) > self.policy.device_timeout_s:
                    v.result = "timed_out"
                    v.reason = f"timed_out: no result within {self.policy.device_timeout_s:g} s" + (
                        "" if v.online else " (offline)"
                    )
            bad = [v for v in inc if v.result in ("failed", "timed_out")]
            c = {
                "fleet": len(self.fleet.devices),
                "eligible": len(inc),
                "pending": sum(1 for v in inc if v.result is None),
                "committed": sum(1 for v in inc if v.result == "committed"),
                "failed": sum(1 for v in inc if v.result == "failed"),
                "timed_out": sum(1 for v in inc if v.result == "timed_out"),
                "refused_document": sum(1 for v in inc if v.refused_document),
                "taken": sum(1 for v in inc if v.taken or v.result == "committed"),
                "offline": sum(1 for v in inc if not v.online),
                "failed_by": dict(Counter(f"{v.hardware}: {(v.reason or '').split(':')[0]}" for v in bad)),
            }
        self.last_counts = c
        return c

    def standing(self) -> dict[str, Any]:
        """Where the rollout stands (for an interrupted run)."""
        c = self.last_counts or self._counts(time.monotonic())
        return {
            "kind": self.t.kind,
            "app": self.t.app,
            "version": self.t.label,
            self.t.event_key: self.t.number,
            "step": self.step,
            "percent": self.published_percent,
            "paused": self.paused,
            **{k: c.get(k, 0) for k in COUNT_KEYS},
        }

    def _pause_reason(self, c: dict[str, Any], pct: int, since_step: float) -> str | None:
        pol = self.policy
        if c["eligible"] and not c["taken"] and since_step >= pol.device_timeout_s:
            causes = [f"{c['offline']} offline"] if c["offline"] else []
            if c["refused_document"]:
                causes.append(f"{c['refused_document']} refused the rollout document")
            return (
                f"no eligible device took the release within {pol.device_timeout_s:g} s of the {pct}% step"
                + (f" ({', '.join(causes)})" if causes else "")
            )
        bad = c["failed"] + c["timed_out"]
        if decide(c["eligible"], bad, pol) == "abort":
            what = "failed or timed out" if c["timed_out"] else "failed"
            why = (
                f"{bad} of {c['eligible']} devices {what} "
                f"({100 * bad / c['eligible']:.0f}% > {pol.abort_failure_pct:g}%)"
            )
            if c["refused_document"]:
                why += (
                    f"; {c['refused_document']} refused the rollout document (is the rollout key "
                    "in their trust root?)"
                )
            return why
        return None

    def pause(self, percent: int) -> None:
        """Publish (and read back) a paused document at ``percent``: devices not
        yet in the release stay out of it, whatever document came before."""
        with operator.Session(self.s) as sess:
            self._publish_doc(sess, percent, paused=True)

    def run(self, discover_s: float = 1.0) -> dict[str, Any]:
        t, pol = self.t, self.policy
        with operator.Session(self.s) as sess:

            def on_message(_c: Any, _u: Any, msg: Any) -> None:
                sess._on_message(_c, _u, msg)  # read-backs
                self._on_message(msg.topic, bytes(msg.payload))

            sess.client.on_message = on_message
            info = sess.client.subscribe(
                [(f"{self.p}/devices/+/status", 1), (f"{self.p}/devices/+/events", 1)]
            )
            sess.wait_subscribed(info)
            # retained statuses, and answers to a status request where a broker
            # never delivers retained messages on a wildcard (RabbitMQ, AWS IoT Core)
            operator.request_status(sess, self.p, spread_s=discover_s)
            time.sleep(discover_s + 0.5)
            # An operator may have published the release already (the rollout
            # controller's identity need not write releases or artifacts).
            if t.kind == "release":
                if self.artifact_dir is not None:
                    from devicerunner.fleet.artifacts import ArtifactDir

                    ArtifactDir(self.artifact_dir).add_bundle_file(io.BytesIO(self.data))
                stored = self.retain and operator.release_stored(self.s, self.data, self.p)
                if not stored:
                    operator.publish_bundle(self.s, self.data, self.p, retain=self.retain)  # read back
            else:
                topic = topics.config(self.p, t.app, t.channel)
                stored = self.retain and not sess.read_back({topic: self.data}, [topic], max_s=1.0)
                if not stored:
                    sess.publish_many([(topic, self.data)], retain=self.retain)
                    if self.retain:
                        sess.check_stored({topic: self.data}, [topic], "the config")
            self.emit(
                {
                    "event": "published",
                    "kind": t.kind,
                    "app": t.app,
                    "version": t.label,
                    t.event_key: t.number,
                    "devices": len(self.fleet.devices),
                    "already_stored": stored,
                }
            )
            last: tuple[Any, ...] | None = None
            c: dict[str, Any] = {}
            for pct in pol.steps:
                self._publish_doc(sess, pct, paused=False)
                self.step = pct
                t_step = time.monotonic()
                with self.fleet.lock:
                    for v in self.fleet.devices.values():
                        if v.included_at is None and trust.in_rollout(v.id, t.salt, pct):
                            v.included_at = t_step
                c = self._counts(t_step)
                self.emit({"event": "step", "step": pct, **c})
                while True:
                    now = time.monotonic()
                    c = self._counts(now)
                    key = (pct, *(c[k] for k in COUNT_KEYS))
                    if key != last:
                        last = key
                        self.emit({"event": "progress", "step": pct, **c})
                    why = self._pause_reason(c, pct, now - t_step)
                    if why is not None:
                        self._publish_doc(sess, pct, paused=True)
                        self.emit({"event": "paused", "step": pct, "reason": why, **c})
                        return {"result": "paused", "step": pct, "reason": why, **c}
                    if c["pending"] == 0 or now - t_step >= pol.step_wait_s:
                        break
                    time.sleep(0.25)
                self.emit({"event": "step_done", "step": pct, **c})
            c = self._counts(time.monotonic())
            if c["eligible"] and c["committed"] == c["eligible"]:
                self.emit({"event": "completed", "step": pol.steps[-1], **c})
                return {"result": "completed", "step": pol.steps[-1], **c}
            why = (
                f"{c['committed']} of {c['eligible']} committed ({c['pending']} pending, "
                f"{c['failed']} failed, {c['timed_out']} timed out) "
                f"when the last step's {pol.step_wait_s:g} s ran out"
                if c["eligible"]
                else "no device that runs this app on the targeted hardware has reported status"
            )
            self.emit({"event": "incomplete", "step": pol.steps[-1], "reason": why, **c})
            return {"result": "incomplete", "step": pol.steps[-1], "reason": why, **c}
