"""The device's MQTT channel: what arrives is handed over, what the device
says goes out (status, events, telemetry).

It speaks MQTT only. Messages are routed by topic to an ``Inbound`` (the
update layer's delivery) on this channel's lane, never on the I/O loop;
chunks are subscribed to on request (``want``/``drop``). It never
verifies, stores or decides anything about a release. Periodic work
(heartbeat) is a timer on the lane; telemetry is drained when the outbox
fills, not polled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from devicerunner.runtime.lanes import Lane
from devicerunner.runtime.process import Runtime
from devicerunner.transport import topics
from devicerunner.transport.mqtt import Connection
from devicerunner.transport.settings import BrokerSettings
from hostfuncs.telemetry import Outbox

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
TELEMETRY_EVERY_S = 0.2
TELEMETRY_MAX_PER_DRAIN = 200
STATUS_COALESCE_S = 0.2


class Inbound(Protocol):
    """What the channel hands over, on its lane."""

    def on_root(self, payload: bytes) -> None: ...

    def on_release(self, payload: bytes) -> None: ...

    def on_rollout(self, app: str, payload: bytes) -> None: ...

    def on_chunk(self, sha256: str, index: int, payload: bytes) -> None: ...


class ConfigInbound(Protocol):
    """Where signed app configurations go (update.config_updates), on the lane."""

    def on_config(self, app: str, payload: bytes) -> None: ...

    def on_config_rollout(self, app: str, payload: bytes) -> None: ...


MessageSink = Callable[[str, str, bytes, bool], "str | None"]
"""``(app, topic suffix, payload, broadcast)`` -> None, or why it was dropped.
Called on the I/O loop: it must only queue (bounded) and never wait."""


@dataclass(frozen=True)
class Subscription:
    """One app the device runs, and the channel it follows."""

    app: str
    channel: str
    messages: bool = False
    """Subscribe to the app's message topics (its grant has ``messages``)."""


class DeviceChannel:
    def __init__(
        self,
        settings: BrokerSettings,
        *,
        prefix: str,
        device_id: str,
        hardware: str,
        apps: Iterable[Subscription],
        lane: Lane,
        runtime: Runtime,
        status: Callable[[bool], dict[str, Any]],
        outbox: Outbox,
        backoff_min_s: float,
        backoff_max_s: float,
        messages: MessageSink | None = None,
    ) -> None:
        """``status(online)``: the device's status document, built on demand.
        ``messages``: where operators' messages to apps go."""
        self.p = prefix
        self.id = device_id
        self._apps = tuple(apps)
        self._lane = lane
        self._status = status
        self._outbox = outbox
        self.inbound: Inbound | None = None
        self._status_due = False
        self.configs: ConfigInbound | None = None
        self._messages = messages
        self.messages_refused = 0
        """App messages not queued: retained, for another device, or refused by the sink."""
        offline = json.dumps({"device": device_id, "hardware": hardware, "online": False}).encode()
        self.conn = Connection(
            settings,
            f"dr-{device_id}",
            on_message=self._arrived,
            on_connect=self._on_connect,
            will=(topics.status(prefix, device_id), offline, 1, True),
            backoff_min_s=backoff_min_s,
            backoff_max_s=backoff_max_s,
            runtime=runtime,
        )
        outbox.on_first = self._telemetry_waiting

    # -- lifecycle ------------------------------------------------------------------

    def start(self, inbound: Inbound, configs: ConfigInbound | None = None) -> None:
        self.inbound = inbound
        self.configs = configs
        subs = [topics.root(self.p), topics.root_version(self.p, "+")]
        for s in self._apps:
            subs.append(topics.release(self.p, s.app, s.channel))
            subs.append(topics.rollout(self.p, s.app, s.channel))
            if configs is not None:
                subs.append(topics.config(self.p, s.app, s.channel))
                subs.append(topics.config_rollout(self.p, s.app, s.channel))
            if s.messages and self._messages is not None:
                subs.append(topics.app_inbox(self.p, s.app, self.id) + "/#")
                subs.append(topics.app_inbox(self.p, s.app) + "/#")
        self.conn.subscribe(subs)
        self._lane.every(HEARTBEAT_S, self.publish_status)
        self._lane.resume()
        self.conn.start()

    def stop(self) -> None:
        self._lane.close(5)
        if self.conn.connected.is_set():
            try:  # a clean stop says so; a crash leaves it to the last will
                info = self.conn.publish(topics.status(self.p, self.id), self._status_payload(False), 1, True)
                info.wait_for_publish(2)
            except (RuntimeError, ValueError):
                pass
        self.conn.stop()

    def lost_s(self) -> float:
        return self.conn.lost_s()

    def connected(self) -> bool:
        return self.conn.connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self.conn.connected.wait(timeout_s)

    def connections(self) -> list[float]:
        """Wall-clock times of the latest (re)connections (bounded)."""
        return list(self.conn.connects)

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on the channel's lane (any thread); a failure is logged."""

        def run() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("channel: %s failed", getattr(fn, "__name__", fn))

        self._lane.post(run)

    # -- ChunkFetcher (update.delivery) -------------------------------------------------

    def want(self, sha256: str, indices: list[int]) -> None:
        self.conn.subscribe([topics.chunk(self.p, sha256, i) for i in indices])

    def drop(self, sha256: str, indices: list[int]) -> None:
        self.conn.unsubscribe([topics.chunk(self.p, sha256, i) for i in indices])

    def online(self) -> bool:
        return self.conn.connected.is_set()

    # -- inbound: I/O loop -> lane ---------------------------------------------------------

    def _arrived(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic.startswith((f"{self.p}/apps/", f"{self.p}/devices/")):
            # a message for an app: queued at once (bounded, never waits), no lane hop
            self._app_message(topic, payload, retained)
            return
        self.post(self._dispatch, topic, payload)

    def _app_message(self, topic: str, payload: bytes, retained: bool) -> None:
        parsed = topics.parse_app_message(self.p, self.id, topic)
        if parsed is None or retained or self._messages is None:
            # retained: it would replay on every reconnect; another device's: loose matching
            self.messages_refused += 1
            return
        app, suffix, broadcast = parsed
        why = self._messages(app, suffix, payload, broadcast)
        if why is not None:
            self.messages_refused += 1
            log.debug("message for %s on %s dropped: %s", app, topic, why)

    def _on_connect(self) -> None:
        self.post(self.publish_status)
        self.post(self._drain_telemetry)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        inbound, p = self.inbound, self.p
        if inbound is None:
            return
        if topic == topics.root(p) or topic.startswith(f"{p}/trust/roots/"):
            inbound.on_root(payload)
        elif topic.startswith(f"{p}/releases/"):
            inbound.on_release(payload)
        elif topic.startswith(f"{p}/artifacts/"):
            parsed = topics.parse_chunk(p, topic)
            if parsed is not None:
                inbound.on_chunk(parsed[0], parsed[1], payload)
        elif topic.startswith(f"{p}/rollouts/"):
            parts = topic[len(p) + 1 :].split("/")
            if len(parts) == 3:
                inbound.on_rollout(parts[1], payload)
            elif len(parts) == 4 and parts[3] == "config" and self.configs is not None:
                self.configs.on_config_rollout(parts[1], payload)
        elif topic.startswith(f"{p}/configs/") and self.configs is not None:
            parts = topic[len(p) + 1 :].split("/")
            if len(parts) == 3:
                self.configs.on_config(parts[1], payload)

    # -- outbound ------------------------------------------------------------------------

    def publish_event(self, ev: dict[str, Any]) -> None:
        """On the lane: one update event, and soon the status it changed. An
        update makes ~6 events in a second; their statuses are coalesced into
        one publish STATUS_COALESCE_S after the first (the last state wins)."""
        self.conn.publish(topics.events(self.p, self.id), json.dumps(ev, default=str).encode(), qos=1)
        if not self._status_due:
            self._status_due = True
            self._lane.call_later(STATUS_COALESCE_S, self.publish_status)

    def publish_status(self) -> None:
        self._status_due = False
        if self.conn.connected.is_set():
            self.conn.publish(topics.status(self.p, self.id), self._status_payload(True), qos=1, retain=True)

    def _status_payload(self, online: bool) -> bytes:
        return json.dumps(self._status(online), default=str).encode()

    def _telemetry_waiting(self) -> None:
        """The outbox was empty and is not (called on the scheduler lane)."""
        self._lane.call_later(TELEMETRY_EVERY_S, self._drain_telemetry)

    def _drain_telemetry(self) -> None:
        """Batches of up to TELEMETRY_MAX_PER_DRAIN every TELEMETRY_EVERY_S
        until the outbox is empty; offline, the (bounded) outbox waits for
        the next connection."""
        if not self.conn.connected.is_set():
            return
        for msg in self._outbox.drain(TELEMETRY_MAX_PER_DRAIN):
            self.conn.publish(topics.telemetry(self.p, self.id, msg.app, msg.name), msg.payload, qos=0)
        if len(self._outbox):
            self._lane.call_later(TELEMETRY_EVERY_S, self._drain_telemetry)
