"""The device's MQTT channel: what arrives is handed over, what the device
says goes out (status, events, telemetry).

It speaks MQTT only. Messages are routed by topic to an ``Inbound`` (the
update layer's delivery) on this channel's lane, never on the I/O loop;
chunks are subscribed to on request (``want``/``drop``). It never
verifies, stores or decides anything about a release. Periodic work
(heartbeat) is a timer on the lane; telemetry is drained when the outbox
fills, not polled.

The broker is untrusted (docs/threat-model.md): anyone may publish anything
on it. So what arrives is bounded before it is read (``max_packet_bytes``,
transport/guard.py), only topics this channel subscribed to are taken, and
they wait in a newest-wins ``Mailbox`` (one slot per topic: one pending
release and rollout document per (app, channel), one per root topic, one per
chunk) instead of a queue. Trust roots are subscribed by exact topic
(``trust/root`` and the one version asked for, ``want_root``), so retained
garbage under other versions is never even delivered. A document topic
whose waiting message was replaced is subscribed again once the flood has
drained, so the broker re-sends the genuine retained copy. Log lines about
refused input are rate-limited with a count of what was held back.

Chunk messages go to the MQTT artifact sources it owns (``retained``,
``requests``: transport/sources), which hand them to the download that asked
(update.downloads). On brokers without retained messages it asks the artifact
servers for the current documents on every connect (``request_documents``);
the replies arrive on the device's own topics (``{p}/devices/{id}/artifacts/``
and ``documents/``, parsed strictly here: the broker's wildcard matching is
not trusted) and take the same mailbox and ``Inbound`` as retained ones. It
answers fleet-wide status requests after a random delay within the asked
spread, from a small token bucket (``STATUS_REPLY_BURST`` at once, then one
per ``STATUS_REPLY_EVERY_S``), so a flood of requests cannot make the fleet
flood the broker.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from devicerunner.runtime.lanes import Lane, Timer
from devicerunner.runtime.process import Runtime
from devicerunner.runtime.ratelimit import RateLimitedLog
from devicerunner.transport import topics
from devicerunner.transport.mailbox import Mailbox
from devicerunner.transport.mqtt import Connection
from devicerunner.transport.settings import BrokerSettings
from devicerunner.transport.sources.reqresp import DEFAULT_WINDOW, RequestSource
from devicerunner.transport.sources.retained import RetainedSource
from hostfuncs.telemetry import Outbox

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
"""A status is published at least this often: HEARTBEAT_S after the last one,
whatever published that (an update's statuses put the heartbeat off: 10,000
devices sent ~20,000 statuses nobody needed during one rollout)."""
DOCUMENTS_ASK_FIRST_S = 5.0
DOCUMENTS_ASK_MAX_S = 300.0
"""Without retained messages, the current documents are asked for on connect
and again with these doubling delays until one comes back."""
TELEMETRY_EVERY_S = 0.2
TELEMETRY_MAX_PER_DRAIN = 200
STATUS_COALESCE_S = 0.2
MAILBOX_MAX_TOPICS = 4096
"""Topics with a message waiting for the lane (each holds only its newest)."""
REFRESH_AFTER_DROPS_S = 30.0
STATUS_REPLY_BURST = 3
STATUS_REPLY_EVERY_S = 10.0
"""Fleet-wide status requests answered: a few back to back (an operator's
`fleet status` then `rollout`), then one per 10 s, so a flood of requests
makes a 10,000-device fleet send at most ~1,000 statuses a second."""
MAX_STATUS_SPREAD_S = 120.0
"""A document topic whose waiting message was replaced is subscribed again
(the broker re-sends its retained copy) at most this often."""


class Inbound(Protocol):
    """What the channel hands over, on its lane."""

    def on_root(self, payload: bytes) -> None: ...

    def on_release(self, app: str, channel: str, payload: bytes) -> None:
        """A release delivered on the topic of (``app``, ``channel``)."""

    def on_rollout(self, app: str, payload: bytes) -> None: ...


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
        retain: bool = True,
        request_chunks: bool = False,
        request_window: int = DEFAULT_WINDOW,
        request_documents: bool = False,
        status_requests: bool = True,
    ) -> None:
        """``status(online)``: the device's status document, built on demand.
        ``messages``: where operators' messages to apps go. ``retain``: the
        broker keeps retained messages (status and last will are retained);
        ``request_chunks``: subscribe to the replies of the ``requests``
        source; ``request_documents``: ask for the current documents on every
        connect; ``status_requests``: answer them."""
        self.retain = retain
        self.request_chunks = request_chunks
        self.request_documents = request_documents
        self._asking = 0
        """Connections that started asking for documents (a newer one ends the older's retries)."""
        self._docs_answered = False
        self.status_requests = status_requests
        self._reply_tokens = float(STATUS_REPLY_BURST)
        self._reply_tokens_at = time.monotonic()
        self.p = prefix
        self.id = device_id
        self._apps = tuple(apps)
        self._lane = lane
        self._status = status
        self._outbox = outbox
        self.inbound: Inbound | None = None
        self._status_due = False
        self._heartbeat: Timer | None = None
        self.configs: ConfigInbound | None = None
        self._messages = messages
        self.messages_refused = 0
        """App messages not queued: retained, for another device, or refused by the sink."""
        self._max_packet_bytes = settings.max_packet_bytes
        self._next_root: str | None = None
        """The exact topic of the trust root version asked for (subscribed)."""
        self.stats = {
            "unexpected_topics": 0,
            "oversize_packets": 0,
            "chunk_messages": 0,
            "status_requests": 0,
            "status_replies": 0,
        }
        self.mailbox = Mailbox(lane.post, self._handle, max_keys=MAILBOX_MAX_TOPICS)
        self._refused = RateLimitedLog(log, rate_per_s=0.5, burst=10)
        self._refreshed: dict[str, float] = {}
        """document topic -> when it was last subscribed again (one per subscribed topic)."""
        self._refresh_due: set[str] = set()
        offline = json.dumps({"device": device_id, "hardware": hardware, "online": False}).encode()
        self.conn = Connection(
            settings,
            f"dr-{device_id}",
            on_message=self._arrived,
            on_connect=self._on_connect,
            will=(topics.status(prefix, device_id), offline, 1, retain),
            backoff_min_s=backoff_min_s,
            backoff_max_s=backoff_max_s,
            runtime=runtime,
            on_oversize=self._oversize,
        )
        outbox.on_first = self._telemetry_waiting
        self.retained = RetainedSource(self.conn, prefix)
        self.requests = RequestSource(self.conn, prefix, device_id, request_window)

    # -- lifecycle ------------------------------------------------------------------

    def start(self, inbound: Inbound, configs: ConfigInbound | None = None) -> None:
        self.inbound = inbound
        self.configs = configs
        subs = [topics.root(self.p)]
        for s in self._apps:
            subs.append(topics.release(self.p, s.app, s.channel))
            subs.append(topics.rollout(self.p, s.app, s.channel))
            if configs is not None:
                subs.append(topics.config(self.p, s.app, s.channel))
                subs.append(topics.config_rollout(self.p, s.app, s.channel))
            if s.messages and self._messages is not None:
                subs.append(topics.app_inbox(self.p, s.app, self.id) + "/#")
                subs.append(topics.app_inbox(self.p, s.app) + "/#")
        if self.request_chunks:
            subs.append(self.requests.subscription())
        if self.request_documents:
            subs.append(topics.document_response(self.p, self.id, "#"))
        if self.status_requests:
            subs.append(topics.status_request(self.p))
        self.conn.subscribe(subs)
        self._lane.post(self._arm_heartbeat)
        self._lane.resume()
        self.conn.start()

    def stop(self) -> None:
        self._lane.close(5)
        if self.conn.connected.is_set():
            try:  # a clean stop says so; a crash leaves it to the last will
                info = self.conn.publish(
                    topics.status(self.p, self.id), self._status_payload(False), 1, self.retain
                )
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

    # -- RootFetcher (update.delivery) -------------------------------------------------

    def online(self) -> bool:
        return self.conn.connected.is_set()

    def want_root(self, version: int) -> None:
        """Subscribe to exactly ``trust/roots/{version}`` (never a wildcard: retained
        garbage under other versions is then never delivered)."""
        nxt = topics.root_version(self.p, version)
        if nxt == self._next_root:
            return
        if self._next_root is not None:
            self.conn.unsubscribe([self._next_root])
        self._next_root = nxt
        self.conn.subscribe([nxt])

    # -- inbound: I/O loop -> lane ---------------------------------------------------------

    def _arrived(self, topic: str, payload: bytes, retained: bool) -> None:
        """I/O loop: app messages to their (bounded) inboxes; documents and chunks
        only on topics subscribed to, newest per topic, bounded."""
        own = topics.parse_response(self.p, self.id, topic)
        if own is not None:  # an artifact server's reply to this device (strictly parsed)
            wanted = self.request_chunks if own[0] == "artifacts" else self.request_documents
            if not wanted:
                self.stats["unexpected_topics"] += 1
            elif not self.mailbox.put(topic, payload):
                self._refused.log(
                    logging.WARNING, time.monotonic(), "dropped a message on %s: too many waiting", topic
                )
            return
        if topic.startswith((f"{self.p}/apps/", f"{self.p}/devices/")):
            # a message for an app: queued at once (bounded, never waits), no lane hop
            self._app_message(topic, payload, retained)
            return
        if not self.conn.wants(topic):
            self.stats["unexpected_topics"] += 1
            self._refused.log(
                logging.INFO, time.monotonic(), "ignoring a message on %s: not subscribed", topic
            )
            return
        if not self.mailbox.put(topic, payload):
            self._refused.log(
                logging.WARNING, time.monotonic(), "dropped a message on %s: too many waiting", topic
            )

    def _oversize(self, topic: str, length: int) -> None:
        """I/O loop: a publish over ``max_packet_bytes`` was cut (its payload never read)."""
        self.stats["oversize_packets"] += 1
        self._refused.log(
            logging.WARNING,
            time.monotonic(),
            "refused a %d-byte message on %s: over max_packet_bytes (%d); not read",
            length,
            topic,
            self._max_packet_bytes,
        )

    def _handle(self, topic: str, payload: bytes) -> None:
        """On the lane, one message at a time from the mailbox."""
        try:
            self._dispatch(topic, payload)
        finally:
            if not self.mailbox.waiting():  # the flood (if any) has drained
                self._refresh_replaced()

    def _refresh_replaced(self) -> None:
        """After a flood replaced waiting documents, ask for the retained copies again
        (at most every REFRESH_AFTER_DROPS_S per topic) so the genuine one is not
        lost to garbage. Chunks come back with the download's stall retry."""
        due = self._refresh_due | {
            t for t in self.mailbox.take_replaced() if not t.startswith(f"{self.p}/artifacts/")
        }
        now = time.monotonic()
        later: set[str] = set()
        for topic in due:
            if now - self._refreshed.get(topic, -REFRESH_AFTER_DROPS_S) < REFRESH_AFTER_DROPS_S:
                later.add(topic)
                continue
            self._refreshed[topic] = now
            log.info("messages on %s were replaced while waiting; asking for its retained copy again", topic)
            self.conn.refresh([topic])
        if later and not self._refresh_due:
            self._lane.call_later(REFRESH_AFTER_DROPS_S, self._refresh_later)
        self._refresh_due = later

    def _refresh_later(self) -> None:
        if self.mailbox.waiting():
            self._lane.call_later(1.0, self._refresh_later)  # still flooded: once it drains
            return
        self._refresh_replaced()
        if self._refresh_due:
            self._lane.call_later(REFRESH_AFTER_DROPS_S, self._refresh_later)

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
        if self.request_documents:
            self.post(self._start_asking)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        inbound, p = self.inbound, self.p
        if inbound is None:
            return
        if topic == topics.root(p) or topic.startswith(f"{p}/trust/roots/"):
            inbound.on_root(payload)
        elif topic.startswith(f"{p}/releases/"):
            parts = topic[len(p) + 1 :].split("/")
            if len(parts) == 3:
                inbound.on_release(parts[1], parts[2], payload)
        elif topic.startswith(f"{p}/artifacts/"):
            self.stats["chunk_messages"] += 1
            self.retained.on_message(topic, payload)
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
        elif topic == topics.status_request(p):
            self._on_status_request(payload)
        elif (own := topics.parse_response(p, self.id, topic)) is not None:
            kind, rest = own
            if kind == "artifacts" and len(rest) == 2:
                self.stats["chunk_messages"] += 1
                self.requests.on_message(rest[0], rest[1], payload)
            elif kind == "documents":
                self._docs_answered = True
                if rest == ["root"] or (len(rest) == 2 and rest[0] == "roots"):
                    inbound.on_root(payload)  # the version is the signed document's, not the topic's
                elif len(rest) == 3 and rest[0] == "releases":
                    inbound.on_release(rest[1], rest[2], payload)
                elif len(rest) == 3 and rest[0] == "rollouts":
                    inbound.on_rollout(rest[1], payload)

    # -- brokers without retained messages ---------------------------------------------

    def _start_asking(self) -> None:
        """On the lane, after each connect: ask for the current documents, and
        again after 5, 10, 20 ... (at most 300) s until a document comes back:
        without retained messages a request that reached the broker before any
        server subscribed (a server starting or restarting) is simply gone."""
        self._asking += 1
        self._docs_answered = False
        self._ask_again(self._asking, DOCUMENTS_ASK_FIRST_S)

    def _ask_again(self, round_: int, delay_s: float) -> None:
        if round_ != self._asking or self._docs_answered or not self.conn.connected.is_set():
            return  # answered, or a newer connection asks for itself
        self._ask_for_documents()
        nxt = min(DOCUMENTS_ASK_MAX_S, delay_s * 2)
        self._lane.call_later(delay_s, lambda: self._ask_again(round_, nxt))

    def _ask_for_documents(self) -> None:
        body: dict[str, Any] = {"apps": [{"app": s.app, "channel": s.channel} for s in self._apps]}
        version = self._root_version()
        if version is not None:
            body["root_version"] = version
        self.conn.publish(topics.documents_request(self.p, self.id), json.dumps(body).encode(), qos=1)

    def _root_version(self) -> int | None:
        v = self._status(True).get("root_version")
        return v if isinstance(v, int) else None

    def _on_status_request(self, payload: bytes) -> None:
        """Answer after a random delay within the asked spread, while tokens last."""
        self.stats["status_requests"] += 1
        now = time.monotonic()
        refill = (now - self._reply_tokens_at) / STATUS_REPLY_EVERY_S
        self._reply_tokens = min(float(STATUS_REPLY_BURST), self._reply_tokens + refill)
        self._reply_tokens_at = now
        if self._reply_tokens < 1.0:
            return
        try:
            spread = float(json.loads(payload[:256]).get("spread_s", 1.0))
        except (ValueError, AttributeError, TypeError):
            return
        if not 0.0 <= spread <= MAX_STATUS_SPREAD_S:  # also refuses nan
            spread = MAX_STATUS_SPREAD_S
        self._reply_tokens -= 1.0
        self.stats["status_replies"] += 1
        self._lane.call_later(random.uniform(0.0, spread), self.publish_status)

    # -- outbound ------------------------------------------------------------------------

    def publish_event(self, ev: dict[str, Any]) -> None:
        """On the lane: one update event, and soon the status it changed. An
        update makes ~6 events in a second; their statuses are coalesced into
        one publish STATUS_COALESCE_S after the first (the last state wins)."""
        self.conn.publish(topics.events(self.p, self.id), json.dumps(ev, default=str).encode(), qos=1)
        if not self._status_due:
            self._status_due = True
            self._lane.call_later(STATUS_COALESCE_S, self.publish_status)

    def _arm_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self._heartbeat = self._lane.call_later(HEARTBEAT_S, self.publish_status)

    def publish_status(self) -> None:
        self._status_due = False
        self._arm_heartbeat()
        if self.conn.connected.is_set():
            self.conn.publish(
                topics.status(self.p, self.id), self._status_payload(True), qos=1, retain=self.retain
            )

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
