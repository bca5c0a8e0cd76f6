"""A fault-injecting TCP proxy for the ``flaky-network`` scenario.

Devices connect to the proxy; the proxy connects each of them to the real
broker and forwards bytes both ways, adding what a bad cellular or Wi-Fi
link does to an MQTT session:

- latency (with jitter) on every chunk of bytes, order preserved, and a
  bandwidth limit;
- disconnects: the connection is reset (RST) at random moments;
- stalls: the connection goes silent — bytes either way are swallowed —
  until an end gives up on it (MQTT keepalive), like a NAT that forgot it;
- refusals: a share of new connections is reset at once.

Faults are Poisson events per connection, from a seeded RNG, and can be
switched on and off while connections live (``set_faults``). The proxy
counts what it did (``stats``) so a report can say what the fleet went
through. Loopback only; it runs its own asyncio loop on a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    disconnects_per_min: float = 0.0
    """Per connection."""
    stalls_per_min: float = 0.0
    """Per connection."""
    refuse: float = 0.0
    """Share of new connections reset at once."""
    kib_per_s: float = 0.0
    """Bandwidth per connection and direction (0: unlimited)."""


CHAOS_STEP_S = 0.5


class _Conn:
    def __init__(self) -> None:
        self.stalled = False


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, seed: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.faults = Faults()
        self.stats: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults  # read by every connection at its next decision

    # -- the proxy's own thread --------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats["connections"] += 1
        if self._rng.random() < self.faults.refuse:
            self.stats["refused"] += 1
            _reset(writer)
            return
        try:
            ureader, uwriter = await asyncio.open_connection(*self.upstream)
        except OSError:
            self.stats["upstream_unreachable"] += 1
            _reset(writer)
            return
        for w in (writer, uwriter):
            sock = w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn()
        tasks = [
            asyncio.ensure_future(self._pump(reader, uwriter, conn, "up")),
            asyncio.ensure_future(self._pump(ureader, writer, conn, "down")),
            asyncio.ensure_future(self._chaos(conn)),
        ]
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        _reset(writer)
        _reset(uwriter)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn, way: str
    ) -> None:
        q: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await q.get()) is not None:
                at, data = item
                if (wait := at - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                if conn.stalled:
                    self.stats["bytes_swallowed"] += len(data)
                    continue
                writer.write(data)
                await writer.drain()
                self.stats[f"bytes_{way}"] += len(data)

        out = asyncio.ensure_future(deliver())
        last = 0.0
        try:
            while data := await reader.read(65536):
                if conn.stalled:
                    self.stats["bytes_swallowed"] += len(data)
                    continue
                f = self.faults
                delay = max(0.0, f.latency_ms + self._rng.uniform(-f.jitter_ms, f.jitter_ms)) / 1000
                last = max(last, time.monotonic() + delay)  # jitter never reorders a byte stream
                if f.kib_per_s > 0:
                    last += len(data) / (f.kib_per_s * 1024)
                q.put_nowait((last, data))
        except ConnectionError:
            pass  # a reset link (ours or theirs) ends the pump like EOF: nothing to report
        finally:
            q.put_nowait(None)
            with contextlib.suppress(Exception):
                await out

    async def _chaos(self, conn: _Conn) -> None:
        """Returns to reset the connection; stalls it otherwise. Faults are
        Poisson events: each step fires with probability 1 - exp(-rate * step)."""
        while True:
            await asyncio.sleep(CHAOS_STEP_S)
            f = self.faults
            if self._rng.random() < 1 - math.exp(-f.disconnects_per_min / 60 * CHAOS_STEP_S):
                self.stats["disconnects"] += 1
                return
            if not conn.stalled and self._rng.random() < 1 - math.exp(-f.stalls_per_min / 60 * CHAOS_STEP_S):
                conn.stalled = True
                self.stats["stalls"] += 1


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, as a dropped link looks to the peer (no FIN handshake)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        writer.transport.abort()
