"""Staged rollouts: raise a release's percent step by step, watch the fleet,
pause when failures cross the threshold (like AWS IoT Jobs' abort criteria
and hawkBit's error threshold).

``decide`` is pure. ``RolloutController`` does the I/O: it signs rollout
documents with the ``rollout`` key (the online role: it can move or pause a
release the offline release keys signed, nothing else), publishes them
retained on ``{p}/rollouts/{app}/{channel}``, and reads device status and
events from the broker.

Failures counted: REJECTED, ROLLED_BACK, FAILED events for this release,
and devices in the rollout that have not reported a result within
``device_timeout_s`` of being included (timed out).

The same controller stages a signed app configuration (``data`` is then a
config document, not a bundle): its rollout documents have ``kind:
config`` and go to ``{p}/rollouts/{app}/{channel}/config``, the config is
published retained on ``{p}/configs/{app}/{channel}``, and a device counts
as committed when its status shows that ``config_version`` COMMITTED, as
failed on CONFIG_REJECTED / CONFIG_ROLLED_BACK / CONFIG_FAILED.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devicerunner.errors import DeviceRunnerError
from devicerunner.transport import operator, topics
from devicerunner.transport.settings import BrokerSettings
from devicerunner.trust import bundle, manifest
from devicerunner.trust import verify as trust
from devicerunner.trust.appconfig import parse_config

FAILED_PHASES = ("REJECTED", "ROLLED_BACK", "FAILED")
CONFIG_FAILED_PHASES = ("CONFIG_REJECTED", "CONFIG_ROLLED_BACK", "CONFIG_FAILED")


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
    included_at: float | None = None
    result: str | None = None  # "committed" | "failed"
    reason: str | None = None
    phase: str | None = None


@dataclass
class FleetView:
    devices: dict[str, DeviceView] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def dev(self, d: str) -> DeviceView:
        v = self.devices.get(d)
        if v is None:
            v = self.devices[d] = DeviceView(d)
        return v


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

    def committed_in(self, app_status: dict[str, Any]) -> bool:
        if self.kind == "release":
            return app_status.get("sequence") == self.number and app_status.get("phase") == "COMMITTED"
        return (
            app_status.get("config_version") == self.number and app_status.get("config_phase") == "COMMITTED"
        )

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
        self.s, self.p, self.key, self.policy, self.emit = s, prefix, key, policy, emit
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
        self.version = int(time.time() * 1000)

    # -- broker callbacks (paho thread) -------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        msg = topics.parse_device_message(self.p, topic, payload)
        if msg is None:
            return
        device, kind, doc = msg
        t = self.t
        with self.fleet.lock:
            if kind == "status":
                app = (doc.get("apps") or {}).get(t.app)
                if not isinstance(app, dict) or doc.get("hardware") not in t.hardware:
                    return
                if t.devices and device not in t.devices:
                    return
                v = self.fleet.dev(device)
                v.hardware = doc.get("hardware", "?")
                if t.committed_in(app):
                    v.result = v.result or "committed"
            else:
                if doc.get("app") != t.app or doc.get(t.event_key) != t.number:
                    return
                v = self.fleet.dev(device)
                v.phase = doc.get("phase")
                if v.phase == t.committed_phase():
                    v.result = "committed"
                elif v.phase in t.failed_phases() and v.result is None:
                    v.result, v.reason = "failed", f"{doc.get('reason')}: {doc.get('reason_text', '')}"[:200]

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
        if self.artifact_dir is not None and t.kind == "release":
            from devicerunner.fleet.artifacts import ArtifactDir

            ArtifactDir(self.artifact_dir).put_document(f"rollouts/{t.app}/{t.channel}", doc)
        sess.publish_many([(topic, doc)], retain=self.retain)

    def _counts(self, now: float) -> dict[str, Any]:
        with self.fleet.lock:
            inc = [v for v in self.fleet.devices.values() if v.included_at is not None]
            for v in inc:
                if v.result is None and now - (v.included_at or now) > self.policy.device_timeout_s:
                    v.result, v.reason = (
                        "failed",
                        f"timed_out: no result within {self.policy.device_timeout_s:.0f} s",
                    )
            failed = [v for v in inc if v.result == "failed"]
            return {
                "fleet": len(self.fleet.devices),
                "eligible": len(inc),
                "updated": sum(1 for v in inc if v.phase is not None or v.result is not None),
                "committed": sum(1 for v in inc if v.result == "committed"),
                "failed": len(failed),
                "pending": sum(1 for v in inc if v.result is None),
                "failed_by": dict(Counter(f"{v.hardware}: {(v.reason or '').split(':')[0]}" for v in failed)),
            }

    def run(self, discover_s: float = 1.0) -> dict[str, Any]:
        t, pol = self.t, self.policy
        with operator.Session(self.s) as sess:
            sess.client.on_message = lambda _c, _u, msg: self._on_message(msg.topic, bytes(msg.payload))
            info = sess.client.subscribe(
                [(f"{self.p}/devices/+/status", 1), (f"{self.p}/devices/+/events", 1)]
            )
            sess.wait_subscribed(info)
            # retained statuses, and answers to a status request where a broker
            # never delivers retained messages on a wildcard (RabbitMQ, AWS IoT Core)
            operator.request_status(sess, self.p, spread_s=discover_s)
            time.sleep(discover_s + 0.5)
            self._publish_doc(sess, pol.steps[0], paused=False)
            if t.kind == "release":
                if self.artifact_dir is not None:
                    from devicerunner.fleet.artifacts import ArtifactDir

                    ArtifactDir(self.artifact_dir).add_bundle_file(io.BytesIO(self.data))
                operator.publish_bundle(self.s, self.data, self.p, retain=self.retain)
            else:
                sess.publish_many([(topics.config(self.p, t.app, t.channel), self.data)], retain=self.retain)
            self.emit(
                {
                    "event": "published",
                    "kind": t.kind,
                    "app": t.app,
                    "version": t.label,
                    t.event_key: t.number,
                    "devices": len(self.fleet.devices),
                }
            )
            for i, pct in enumerate(pol.steps):
                if i:
                    self._publish_doc(sess, pct, paused=False)
                t_step = time.monotonic()
                with self.fleet.lock:
                    for v in self.fleet.devices.values():
                        if v.included_at is None and trust.in_rollout(v.id, t.salt, pct):
                            v.included_at = t_step
                while True:
                    now = time.monotonic()
                    c = self._counts(now)
                    self.emit({"event": "progress", "step": pct, **c})
                    if decide(c["eligible"], c["failed"], pol) == "abort":
                        self._publish_doc(sess, pct, paused=True)
                        why = (
                            f"{c['failed']} of {c['eligible']} devices failed "
                            f"({100 * c['failed'] / c['eligible']:.0f}% > {pol.abort_failure_pct:g}%)"
                        )
                        self.emit({"event": "paused", "step": pct, "reason": why, **c})
                        return {"result": "paused", "step": pct, "reason": why, **c}
                    if c["pending"] == 0 or now - t_step >= pol.step_wait_s:
                        break
                    time.sleep(0.25)
                self.emit({"event": "step_done", "step": pct, **c})
            c = self._counts(time.monotonic())
            self.emit({"event": "completed", **c})
            return {"result": "completed", "step": pol.steps[-1], **c}
