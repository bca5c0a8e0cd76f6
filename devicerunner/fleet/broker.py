"""The embedded broker (amqtt) for the demo and small setups.

Production fleets use Mosquitto, EMQX, HiveMQ, VerneMQ or AWS IoT Core
(docs/operations.md). This one listens on loopback by default, allows
anonymous clients and keeps retained messages in memory only.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

from devicerunner.errors import DeviceRunnerError

log = logging.getLogger(__name__)


class BrokerError(DeviceRunnerError):
    pass


def _config(host: str, port: int) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}},
        "timeout_disconnect_delay": 0,
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _client_gone(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """amqtt leaves tasks failing when a client vanishes mid-exchange (a reset
    link, a PUBACK that never comes); asyncio would print each as a traceback.
    They are the client's problem, not the broker's: one log line each."""
    exc = context.get("exception")
    if isinstance(exc, (TimeoutError, ConnectionError, asyncio.IncompleteReadError)):
        log.info("broker: a client went away: %s: %s", type(exc).__name__, exc)
        return
    loop.default_exception_handler(context)


class _ClientGoneFilter(logging.Filter):
    """amqtt logs a delivery that failed because its client vanished (a PUBACK
    that never came over a stalled link, a reset) as an error with a
    traceback. It is the client's problem, not the broker's: one info line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (TimeoutError, ConnectionError, asyncio.IncompleteReadError)):
            log.info("broker: a delivery to a client that went away failed: %s: %s", type(exc).__name__, exc)
            return False
        return True


_CLIENT_GONE = _ClientGoneFilter()


def _broker_class() -> Any:
    """amqtt's Broker with two fixes a fleet on a flaky link needs (amqtt 0.12).

    1. Take-over [MQTT-3.1.4-2]: a client that connects with the id of a
       client still connected (its old link stalled; the broker has not noticed
       yet) replaces it. amqtt forgets the old session but leaves its
       connection open until keepalive expires, and then publishes the old
       connection's will: the retained "offline" status lands *after* the
       device reconnected and published its fresh status, and stays until the
       next heartbeat. On the flaky-network scenario 8 of 20 devices that had
       committed showed offline, with no version, at the end. Here the old
       connection is closed at once and its will not published (the client is
       alive: it just reconnected).
    2. At connect amqtt sends a new client the retained messages of *every*
       filter any client subscribed to (every device's status, every chunk of
       a release being downloaded), before it even reads the client's own
       SUBSCRIBE: on a 16 KiB/s link that is seconds of unsolicited traffic per
       reconnect. Here a client gets retained messages only for its own
       subscriptions (what MQTT specifies).
    """
    from amqtt.broker import Broker

    class FleetBroker(Broker):  # type: ignore[misc]
        async def _delete_session(self, client_id: str) -> None:
            old_session, old_handler = self._sessions.get(client_id, (None, None))
            if old_session is not None and old_session.transitions.is_connected():
                old_session.will_flag = False
                transport = getattr(getattr(old_handler, "writer", None), "_writer", None)
                transport = getattr(transport, "transport", None)
                if transport is not None:
                    log.info("broker: client %s connected again: closing its old connection", client_id)
                    transport.abort()  # never blocks on a stalled link
            await super()._delete_session(client_id)

        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Any
        ) -> None:
            subscribers = self._subscriptions.get(subscription[0], [])
            if any(s is session for s, _qos in subscribers):
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return FleetBroker


class EmbeddedBroker:
    """Runs amqtt on its own thread and event loop; ``start`` returns once it listens."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> None:
        try:
            from amqtt.broker import Broker  # noqa: F401 - fail early with a clear message
        except ImportError as e:
            raise BrokerError("the embedded broker needs amqtt: pip install 'devicerunner[broker]'") from e
        if not port_free(self.host, self.port):
            raise BrokerError(f"{self.host}:{self.port} is in use (another broker?); choose --port")
        amqtt_log = logging.getLogger("amqtt.broker")
        if _CLIENT_GONE not in amqtt_log.filters:
            amqtt_log.addFilter(_CLIENT_GONE)
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._error is not None:
            raise BrokerError(f"embedded broker did not start: {self._error}")

    def _run(self) -> None:
        Broker = _broker_class()

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(_client_gone)

        async def main() -> None:
            self._broker = Broker(_config(self.host, self.port))
            await self._broker.start()

        try:
            loop.run_until_complete(main())
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._broker is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop)
        try:
            fut.result(timeout=10)
        except Exception as e:
            log.debug("broker shutdown: %s", e)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
