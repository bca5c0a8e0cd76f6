"""The device's MQTT side: trust roots and releases in, chunks down, status,
events and telemetry out.

Lanes: the shared I/O loop only hands over what arrives; this module's
lane verifies, persists chunks and hands a complete, verified release to
the updater (which stages it exactly like a local install). Nothing here
runs Wasm or touches app slots. Periodic work (stall checks, heartbeat) is
timers on the lane; telemetry is drained when the outbox fills, not polled.

Downloads subscribe to each *missing* chunk's topic only, so a chunk held on
disk (devicerunner.update.downloads) is never fetched again after a reconnect or
a power cut. A download with no progress for ``download_stall_s`` while
connected is retried (re-subscribed) up to ``STALL_RETRIES`` times, then
reported FAILED; the next delivery of its release (e.g. after a reconnect)
resumes it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from devicerunner.errors import RollbackError, VerificationError
from devicerunner.runtime.lanes import Timer
from devicerunner.transport import topics
from devicerunner.transport.mqtt import Connection
from devicerunner.transport.settings import parse_url
from devicerunner.trust import manifest
from devicerunner.trust import verify as trust
from devicerunner.trust.manifest import Manifest
from devicerunner.update.downloads import DownloadStore

if TYPE_CHECKING:
    from devicerunner.device.daemon import Daemon

log = logging.getLogger(__name__)

STALL_RETRIES = 3
HEARTBEAT_S = 30.0
TELEMETRY_EVERY_S = 0.2
TELEMETRY_MAX_PER_DRAIN = 200


@dataclass
class Download:
    m: Manifest
    missing: set[int]
    resumed: int
    fetched: int = 0
    retries: int = 0
    started: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)


class DeviceTransport:
    def __init__(self, daemon: Daemon) -> None:
        cfg = daemon.cfg
        b = cfg.broker
        assert b is not None
        self.d = daemon
        self.p = b.prefix
        self.id = cfg.id
        self.stall_s = b.download_stall_s
        settings = parse_url(
            b.url,
            ca_file=b.ca_file,
            cert_file=b.cert_file,
            key_file=b.key_file,
            username=b.username,
            password=b.password,
            keepalive_s=b.keepalive_s,
        )
        offline = json.dumps({"device": self.id, "hardware": cfg.hardware, "online": False}).encode()
        self.conn = Connection(
            settings,
            f"dr-{self.id}",
            on_message=self._inbound,
            on_connect=self._on_connect,
            will=(topics.status(self.p, self.id), offline, 1, True),
            backoff_min_s=b.reconnect_min_s,
            backoff_max_s=b.reconnect_max_s,
            runtime=daemon.runtime,
        )
        self.store = DownloadStore(cfg.state_dir)
        self.active: dict[str, Download] = {}
        self._by_sha: dict[str, str] = {}
        self._roots: dict[int, bytes] = {}
        self._seen_rejects: set[str] = set()
        self._offered: dict[str, int] = {}
        """app -> the highest sequence handed to the updater (not fetched again)."""
        self._lane = daemon.runtime.work.lane(f"{self.id}/transport", paused=True)
        self._stall_timer: Timer | None = None
        """Armed while a download is active (idle devices do not wake up for it)."""
        self.stats = {"chunks_fetched": 0, "chunks_resumed": 0, "releases_seen": 0, "chunk_messages": 0}
        daemon.updater.listeners.append(lambda ev: self._post(self._on_update_event, ev))
        daemon.resources.outbox.on_first = self._telemetry_waiting

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        subs = [topics.root(self.p), topics.root_version(self.p, "+")]
        for app in self.d.cfg.apps.values():
            subs.append(topics.release(self.p, app.name, app.channel))
            subs.append(topics.rollout(self.p, app.name, app.channel))
        self.conn.subscribe(subs)
        self._post(self._resume_downloads)
        self._lane.every(HEARTBEAT_S, self._publish_status)
        self._lane.resume()
        self.conn.start()

    def stop(self) -> None:
        self._lane.close(5)
        if self.conn.connected.is_set():
            try:  # a clean stop says so; a crash leaves it to the last will
                info = self.conn.publish(
                    topics.status(self.p, self.id), self._status_payload(online=False), qos=1, retain=True
                )
                info.wait_for_publish(2)
            except (RuntimeError, ValueError):
                pass
        self.conn.stop()

    def lost_s(self) -> float:
        return self.conn.lost_s()

    # -- I/O loop and other lanes: hand over only ---------------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("transport: %s failed", getattr(fn, "__name__", fn))

        self._lane.post(run)

    def _inbound(self, topic: str, payload: bytes, retained: bool) -> None:
        self._post(self._dispatch, topic, payload)

    def _on_connect(self) -> None:
        self._post(self._publish_status)
        self._post(self._drain_telemetry)

    def _telemetry_waiting(self) -> None:
        """The outbox was empty and is not (called on the scheduler lane)."""
        self._lane.call_later(TELEMETRY_EVERY_S, self._drain_telemetry)

    # -- the transport lane ---------------------------------------------------------------

    def _dispatch(self, topic: str, payload: bytes) -> None:
        p = self.p
        if topic == topics.root(p) or topic.startswith(f"{p}/trust/roots/"):
            self._on_root(payload)
        elif topic.startswith(f"{p}/releases/"):
            self._on_release(payload)
        elif topic.startswith(f"{p}/artifacts/"):
            parsed = topics.parse_chunk(p, topic)
            if parsed is not None:
                self._on_chunk(parsed[0], parsed[1], payload)
        elif topic.startswith(f"{p}/rollouts/"):
            self.d.on_rollout_document(topic, payload)

    # -- trust roots ------------------------------------------------------------------

    def _on_root(self, payload: bytes) -> None:
        if not payload or self.d.trust.root is None:
            return
        try:
            version = manifest.parse_root(payload).version
        except VerificationError as e:
            log.warning("ignoring a malformed trust root: %s", e)
            return
        if version <= self.d.trust.root.version:
            return
        self._roots[version] = payload
        while (nxt := self.d.trust.root.version + 1) in self._roots:
            data = self._roots.pop(nxt)
            try:
                self.d.trust.rotate(data)
            except VerificationError as e:
                self.d.updater.emit("*", "REJECTED", reason=e.reason, reason_text=f"trust root v{nxt}: {e}")
                return
            self.d.updater.emit("*", "ROOT_ROTATED", root_version=nxt)

    # -- releases ------------------------------------------------------------------------

    def _verify(self, payload: bytes) -> Manifest:
        root = self.d.trust.root
        if root is None:
            raise VerificationError("no trust root is provisioned on this device")
        cfg = self.d.cfg
        app = _peek(payload)
        history = {}
        if app in self.d.updater.slots:
            st, _ = self.d.updater.slots[app].load()
            history[app] = trust.AppHistory(st.highest_sequence, st.bad)
        device = trust.DeviceIdentity(cfg.id, cfg.hardware, {n: a.policy for n, a in cfg.apps.items()})
        channel = cfg.apps[app].channel if app in cfg.apps else None
        return trust.verify_release(
            payload,
            root=root,
            device=device,
            history=history,
            time_floor=self.d.trust.time_floor,
            now=self.d.clock.wall_ms() // 1000,  # the device's clock: it may be off
            channel=channel,
        )

    def _on_release(self, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained release
        self.stats["releases_seen"] += 1
        try:
            m = self._verify(payload)
        except RollbackError:
            return  # we have it (or decided on it) already: redelivered on every reconnect
        except VerificationError as e:
            key = f"{_peek(payload)}:{hash(payload)}"
            if key not in self._seen_rejects:  # report once, not on every reconnect
                self._seen_rejects.add(key)
                self.d.updater.reject(payload, e, "mqtt")
            return
        if not self.d.eligible(m):
            log.info(
                "release %s %s (sequence %d) is not for this device yet (rollout)",
                m.app,
                m.version,
                m.sequence,
            )
            self.d.waiting[m.app] = m
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
            self._failed(m, "io_error", f"cannot start download: {e}")
            return
        dl = Download(m, set(range(len(m.artifact.chunks))) - held, resumed=len(held))
        self.active[m.app] = dl
        if self._stall_timer is None:
            self._stall_timer = self._lane.every(1.0, lambda: self._check_stalls(time.monotonic()))
        self._by_sha[m.artifact.sha256] = m.app
        self.stats["chunks_resumed"] += dl.resumed
        self.d.updater.note_downloading(m, resumed=dl.resumed)
        if not dl.missing:
            self._complete(dl)
        else:
            self.conn.subscribe([topics.chunk(self.p, m.artifact.sha256, i) for i in sorted(dl.missing)])

    def _abandon(self, dl: Download) -> None:
        self.conn.unsubscribe([topics.chunk(self.p, dl.m.artifact.sha256, i) for i in dl.missing])
        self.active.pop(dl.m.app, None)
        self._by_sha.pop(dl.m.artifact.sha256, None)

    def _on_chunk(self, sha: str, index: int, payload: bytes) -> None:
        self.stats["chunk_messages"] += 1
        app = self._by_sha.get(sha)
        dl = self.active.get(app) if app else None
        if dl is None or index not in dl.missing:
            return  # not ours, or a duplicate delivery
        try:
            self.store.put(dl.m, index, payload)
        except VerificationError as e:  # tampered or mixed-in chunk
            self._abandon(dl)
            self.store.remove(sha)
            self.d.updater.reject(dl.m.raw, e, "mqtt")
            return
        except OSError as e:
            self._abandon(dl)
            self._failed(dl.m, "io_error", f"cannot store chunk {index}: {e}")
            return
        dl.missing.discard(index)
        dl.fetched += 1
        dl.last_progress = time.monotonic()
        self.stats["chunks_fetched"] += 1
        self.conn.unsubscribe([topics.chunk(self.p, sha, index)])
        if not dl.missing:
            self._complete(dl)

    def _complete(self, dl: Download) -> None:
        self._abandon(dl)
        try:
            module = self.store.assemble(dl.m)
        except VerificationError as e:
            self.store.remove(dl.m.artifact.sha256)
            self.d.updater.reject(dl.m.raw, e, "mqtt")
            return
        self.d.updater.emit(
            dl.m.app,
            "DOWNLOADED",
            sequence=dl.m.sequence,
            version=dl.m.version,
            chunks_fetched=dl.fetched,
            chunks_resumed=dl.resumed,
            seconds=round(time.monotonic() - dl.started, 3),
        )
        self._offered[dl.m.app] = dl.m.sequence
        self.d.updater.offer(dl.m.raw, module, "mqtt")

    def _failed(self, m: Manifest, reason: str, text: str) -> None:
        self.d.updater.emit(m.app, "FAILED", sequence=m.sequence, reason=reason, reason_text=text)

    def _check_stalls(self, now: float) -> None:
        if not self.active and self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
            return
        if not self.conn.connected.is_set():
            for dl in self.active.values():
                dl.last_progress = now  # no progress is possible offline: not a stall
            return
        for dl in list(self.active.values()):
            if now - dl.last_progress < self.stall_s:
                continue
            topics_ = [topics.chunk(self.p, dl.m.artifact.sha256, i) for i in sorted(dl.missing)]
            if dl.retries < STALL_RETRIES:
                dl.retries += 1
                dl.last_progress = now
                log.warning("download %s %d stalled; retry %d", dl.m.app, dl.m.sequence, dl.retries)
                self.conn.unsubscribe(topics_)
                self.conn.subscribe(topics_)
            else:
                self._abandon(dl)
                self._failed(
                    dl.m,
                    "download_stalled",
                    f"no progress for {self.stall_s:.0f} s after {STALL_RETRIES} "
                    f"retries; {len(dl.missing)} chunk(s) missing (kept for resume)",
                )

    def _resume_downloads(self) -> None:
        for m in self.store.pending():
            try:
                self._verify(m.raw)
            except VerificationError:
                self.store.remove(m.artifact.sha256)  # superseded, committed or no longer valid
                continue
            log.info("resuming download of %s %s (sequence %d)", m.app, m.version, m.sequence)
            self.start_download(m)

    # -- outbound ------------------------------------------------------------------------

    def _on_update_event(self, ev: dict[str, Any]) -> None:
        self.conn.publish(topics.events(self.p, self.id), json.dumps(ev, default=str).encode(), qos=1)
        if ev.get("phase") == "FAILED" and ev.get("sequence") == self._offered.get(str(ev.get("app"))):
            del self._offered[str(ev["app"])]  # not staged (e.g. disk full): take it again when redelivered
        if ev.get("phase") in ("STAGED", "REJECTED", "COMMITTED", "ROLLED_BACK") and ev.get("sequence"):
            for m in self.store.pending():
                if m.app == ev.get("app") and m.sequence <= int(ev["sequence"]):
                    self.store.remove(m.artifact.sha256)
        self._publish_status()

    def _status_payload(self, online: bool = True) -> bytes:
        full = self.d.status()
        apps = {}
        for name, a in full["apps"].items():
            st = a["state"]
            apps[name] = {
                "version": a.get("version") or st.get("active_version"),
                "sequence": st["active_sequence"],
                "phase": st["phase"],
                "pending_sequence": st.get("pending_sequence"),
                "last_error": st.get("last_error") or a.get("last_error"),
                "last_reason": st.get("last_reason"),
                "running": a.get("running", False),
                "trial": a.get("trial"),
            }
        return json.dumps(
            {
                "device": self.id,
                "hardware": self.d.cfg.hardware,
                "online": online,
                "ts": round(time.time(), 3),
                "root_version": full["root_version"],
                "apps": apps,
            }
        ).encode()

    def _publish_status(self) -> None:
        if self.conn.connected.is_set():
            self.conn.publish(topics.status(self.p, self.id), self._status_payload(), qos=1, retain=True)

    def _drain_telemetry(self) -> None:
        """Batches of up to TELEMETRY_MAX_PER_DRAIN every TELEMETRY_EVERY_S
        until the outbox is empty; offline, the (bounded) outbox waits for
        the next connection."""
        outbox = self.d.resources.outbox
        if not self.conn.connected.is_set():
            return
        for msg in outbox.drain(TELEMETRY_MAX_PER_DRAIN):
            self.conn.publish(topics.telemetry(self.p, self.id, msg.app, msg.name), msg.payload, qos=0)
        if len(outbox):
            self._lane.call_later(TELEMETRY_EVERY_S, self._drain_telemetry)


def _peek(payload: bytes) -> str:
    try:
        return manifest.parse_manifest(payload).app
    except (VerificationError, ValueError):
        return "unknown"
