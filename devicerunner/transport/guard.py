"""A bound on what the broker can make the device buffer, enforced under paho.

paho reads a whole packet into memory before any callback sees it
(FACTS.md), so a handler cannot refuse a 200 MB publish: by then it has been
read. ``PacketGuard`` sits between paho and the socket and parses each MQTT
fixed header (type byte, remaining length) *before* paho reads the body:

- a packet of at most ``max_packet_bytes`` passes through untouched, read
  straight from the socket in the sizes paho asks for;
- an over-long PUBLISH is cut down to its topic and packet id (an empty
  payload, properties dropped) and its body is read and thrown away in
  ``DISCARD_CHUNK`` pieces: paho still acknowledges it (QoS 1), so the
  broker's in-flight window is not used up, and the connection stays up, so
  a *retained* oversize message does not turn into a reconnect loop;
- any other over-long packet (no broker needs one) is a protocol violation:
  ``recv`` raises ``ConnectionAbortedError`` and paho drops the connection.

The guard never holds more than one fixed header plus one topic (<= 64 KiB)
of a packet, and never bytes of the *next* packet, so a level-triggered
selector on the socket still sees every byte it has not been given.

With MQTT 5 the device also announces the bound in CONNECT (Maximum Packet
Size) and a conforming broker never sends a larger packet; the guard is what
holds on MQTT 3.1.1 and against a broker that does not conform.

Only ``PacketGuard.recv`` parses; it runs on the I/O loop thread (the only
reader, see ioloop.py). ``on_oversize`` is called there: it must only hand over.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

log = logging.getLogger(__name__)

PUBLISH = 3
DISCARD_CHUNK = 64 * 1024
"""Bytes read (and dropped) at a time from an over-long publish's body."""
DISCARD_PER_CALL = 4 * 1024 * 1024
"""At most this much is discarded per ``recv`` call, so one huge message does
not hold the shared I/O loop; the rest waits for the socket's next turn."""
MIN_PACKET_BYTES = 4 * 1024

OversizeHandler = Callable[[str, int], None]
"""(topic, remaining length in bytes) of a publish that was cut."""


def encode_length(n: int) -> bytes:
    """MQTT variable byte integer (remaining length)."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class PacketGuard:
    """A socket-like object paho reads from; see the module docstring."""

    def __init__(
        self, sock: Any, max_packet_bytes: int, on_oversize: OversizeHandler, mqtt5: bool = False
    ) -> None:
        if max_packet_bytes < MIN_PACKET_BYTES:
            raise ValueError(f"max_packet_bytes must be at least {MIN_PACKET_BYTES}")
        self._sock = sock
        self.max_packet_bytes = max_packet_bytes
        self._on_oversize = on_oversize
        self._mqtt5 = mqtt5
        self._out = bytearray()
        """Bytes of the current packet's header for paho (<= 5 + 64 KiB + 4)."""
        self._head = bytearray()
        """A fixed header (or a cut publish's variable header) being read."""
        self._pass = 0
        """Body bytes of an accepted packet still to pass through."""
        self._discard = 0
        """Body bytes of a cut publish still to throw away."""
        self._cut: tuple[int, int] | None = None
        """(first byte, remaining length) of a publish being cut."""
        self.cut_packets = 0
        self.cut_bytes = 0

    # -- what paho and the I/O loop use --------------------------------------------------

    def recv(self, bufsize: int) -> bytes:
        while not self._out:
            if self._pass:
                data = bytes(self._sock.recv(min(bufsize, self._pass)))
                self._pass -= len(data)
                return data  # b"" (EOF) included: paho sees the connection close
            if self._discard:
                self._drop_body()
                continue
            if self._cut is not None:
                self._read_cut_header()
                continue
            self._read_fixed_header()
        n = min(bufsize, len(self._out))
        data = bytes(self._out[:n])
        del self._out[:n]
        return data

    def pending(self) -> int:
        """Bytes readable without waiting for the socket (TLS records decrypted already)."""
        inner = self._sock.pending() if isinstance(self._sock, ssl.SSLSocket) else 0
        return len(self._out) + inner

    def send(self, data: bytes | bytearray) -> int:
        return int(self._sock.send(data))

    def fileno(self) -> int:
        return int(self._sock.fileno())

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def close(self) -> None:
        self._sock.close()

    @property
    def inner(self) -> Any:
        return self._sock

    def __getattr__(self, name: str) -> Any:  # setsockopt, getpeercert, ...
        return getattr(self._sock, name)

    # -- parsing -------------------------------------------------------------------------

    def _more(self, n: int) -> bytes:
        data = self._sock.recv(n)
        if not data:
            raise ConnectionResetError("broker closed the connection")
        return bytes(data)

    def _read_fixed_header(self) -> None:
        """One byte at a time, like paho: never a byte of what follows."""
        while True:
            self._head += self._more(1)
            if len(self._head) >= 2 and not self._head[-1] & 0x80:
                break
            if len(self._head) > 5:
                raise ConnectionAbortedError("malformed remaining length from the broker")
        first = self._head[0]
        length = 0
        for i, b in enumerate(self._head[1:]):
            length += (b & 0x7F) << (7 * i)
        header = bytes(self._head)
        self._head.clear()
        if len(header) + length <= self.max_packet_bytes:
            self._out += header
            self._pass = length
            return
        if first >> 4 != PUBLISH:
            raise ConnectionAbortedError(
                f"broker sent a packet of type {first >> 4} of {length} bytes "
                f"(limit {self.max_packet_bytes}); dropping the connection"
            )
        self._cut = (first, length)

    def _read_cut_header(self) -> None:
        assert self._cut is not None
        first, length = self._cut
        qos = (first >> 1) & 3
        while len(self._head) < 2:
            self._head += self._more(2 - len(self._head))
        need = 2 + int.from_bytes(self._head[:2], "big") + (2 if qos else 0)
        if need > length:
            raise ConnectionAbortedError("malformed publish header from the broker")
        while len(self._head) < need:
            self._head += self._more(need - len(self._head))
        var = bytes(self._head)
        self._head.clear()
        self._cut = None
        topic = var[2 : 2 + int.from_bytes(var[:2], "big")].decode("utf-8", "replace")
        body = var + (b"\x00" if self._mqtt5 else b"")  # MQTT 5: an empty property list
        self._out += bytes([first]) + encode_length(len(body)) + body
        self._discard = length - len(var)
        self.cut_packets += 1
        self.cut_bytes += length
        try:
            self._on_oversize(topic, length)
        except Exception:
            log.exception("oversize handler failed")

    def _drop_body(self) -> None:
        dropped = 0
        while self._discard and dropped < DISCARD_PER_CALL:
            data = self._more(min(DISCARD_CHUNK, self._discard))
            self._discard -= len(data)
            dropped += len(data)
        if self._discard:
            raise BlockingIOError("rest of an over-long publish later")


class GuardedClient(paho.Client):
    """paho's client reading through a ``PacketGuard``.

    paho has no public hook for the socket it reads from, so this overrides
    its ``_create_socket`` (present and unchanged through paho 2.x, which
    pyproject pins); ``tests/test_hostile_broker.py`` fails if that breaks.
    """

    max_packet_bytes: int = 0
    on_oversize: OversizeHandler | None = None

    def _create_socket(self) -> Any:
        sock = super()._create_socket()
        if not self.max_packet_bytes:
            return sock
        handler = self.on_oversize or (lambda _t, _n: None)
        return PacketGuard(sock, self.max_packet_bytes, handler, mqtt5=self._protocol == paho.MQTTv5)


def raw_socket(sock: object) -> socket.socket | None:
    """The OS socket under a guard (or the socket itself)."""
    if isinstance(sock, PacketGuard):
        sock = sock.inner
    return sock if isinstance(sock, socket.socket) else None
