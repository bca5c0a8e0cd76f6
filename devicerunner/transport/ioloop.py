"""One ``selectors`` loop (on a thread of its own, or hosted), the network I/O of many paho clients.

paho's own loops (``loop_start``/``loop``) cost a thread per client and use
``select()``, which cannot watch a descriptor >= 1024: past ~339 clients a
process silently stops connecting (paho 2.x; seen in the 1,000-device
benchmark, docs/benchmarks.md). Here every client's socket is
registered with one epoll selector through paho's socket callbacks and
served with ``loop_read``/``loop_write``/``loop_misc``.

Invariants:
- Only the loop thread reads, writes or ``loop_misc``-es a registered
  client, and only the loop thread touches the selector: other threads
  hand changes over as commands (and wake the loop through a socketpair).
- A socket is unregistered *before* paho closes it (``on_socket_close``
  waits for the loop when called from another thread), so a descriptor
  number reused by the next connection can never be confused with it.
- Connecting (DNS, TCP, TLS handshake) never happens here: it blocks. The
  owner connects on its own lane; the socket arrives via ``on_socket_open``.
- A client whose I/O fails is reported once to its ``IoOwner`` (on the loop
  thread); reconnecting is the owner's business.

Hosted (``IoLoop(host=executor)``): no thread of its own; the executor's one
thread polls the selector where it would wait for work, and between tasks
(lanes.Executor.host). The "loop thread" above is then that thread, and a
lane task on it that publishes writes at once (it is not inside a read).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import paho.mqtt.client as paho

from devicerunner.runtime.lanes import Executor

log = logging.getLogger(__name__)

MISC_MAX_S = 5.0
MISC_MIN_S = 0.25
MISC_PER_KEEPALIVE = 5
"""Keepalive (PINGREQ, dead-peer detection) is checked for every client each
fifth of the shortest keepalive registered, within these bounds: a PINGREQ
then goes out at most 20% late (brokers allow 50%), and a thousand idle
clients with a 30 s keepalive cost a sweep every 6 s, not every second (the
sweep was a sixth of an idle simulated device's CPU at a tenth)."""


class IoOwner(Protocol):
    client: paho.Client

    def socket_state(self, is_open: bool) -> None:
        """Told (on the opening or closing thread) when paho opens or closes the socket."""

    def io_failed(self, rc: int) -> None:
        """The connection's I/O failed (paho has closed the socket)."""


class IoLoop:
    def __init__(self, name: str = "mqtt-io", host: Executor | None = None) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._cmds: deque[Callable[[], None]] = deque()
        self._woken = False
        """A wake-up byte is on its way and the loop has not taken the commands
        yet: another command needs no byte of its own (under ``_lock``)."""
        self._writing: set[int] = set()
        """Descriptors watched for EVENT_WRITE (loop thread): no ``epoll_ctl`` to
        set what is set already."""
        self._stopping = False
        self._serving = False
        """The loop thread is inside a client's read, write or keepalive check."""
        self._misc_every = MISC_MAX_S
        self._next_misc = time.monotonic() + self._misc_every
        self._closed = False
        """Closed: commands are dropped (the selector is gone), never queued for nobody."""
        self._host = host
        if host is None:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()
        else:
            self._thread = host.sole_thread()  # before host(): the executor may call wake() at once
            host.host(self)

    # -- attaching a client (any thread, before it connects) ------------------------------

    def attach(self, owner: IoOwner) -> None:
        c = owner.client

        def opened(_c: paho.Client, _u: object, sock: paho.SocketLike) -> None:
            owner.socket_state(True)
            self._call(lambda: self._register(sock, owner))

        def closing(_c: paho.Client, _u: object, sock: paho.SocketLike) -> None:
            self._call(lambda: self._unregister(sock), wait=True)
            owner.socket_state(False)

        c.on_socket_open = opened
        c.on_socket_close = closing

        def writing(_c: paho.Client, _u: object, sock: paho.SocketLike) -> None:
            if self._serving and threading.current_thread() is self._thread:
                # queued while the loop serves this client (a PUBACK during a
                # read): wait for the socket, never write from inside a read
                self._want_write(sock, owner, True)
            else:
                self._call(lambda: self._flush(sock, owner))

        def written(_c: paho.Client, _u: object, sock: paho.SocketLike) -> None:
            self._call(lambda: self._want_write(sock, owner, False))

        c.on_socket_register_write = writing
        c.on_socket_unregister_write = written

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop serving. Hosted, the executor's thread lives on (it runs lanes until
        the runtime shuts it down): from here on every command is dropped, so
        no two threads ever touch the selector, and no caller waits for a loop
        that is gone."""
        self._stopping = True
        if self._host is not None:
            self._host.unhost(timeout_s)
            with self._lock:
                self._closed = True
                self._cmds.clear()
        else:
            self._wake()
            if self._thread is not threading.current_thread():
                self._thread.join(timeout_s)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def drop(self, sock: socket.socket) -> None:
        """Stop watching ``sock`` (the owner is about to close it itself)."""
        self._call(lambda: self._unregister(sock), wait=True)

    def call(self, fn: Callable[[], None], timeout_s: float = 5.0) -> bool:
        """Run ``fn`` on the loop thread and wait for it; False on timeout."""
        return self._call(fn, wait=True, timeout_s=timeout_s)

    # -- plumbing ---------------------------------------------------------------------------

    def _call(self, fn: Callable[[], None], wait: bool = False, timeout_s: float = 5.0) -> bool:
        if self._closed:
            return True
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            fn()
            return True
        done = threading.Event() if wait else None

        def run() -> None:
            try:
                fn()
            finally:
                if done is not None:
                    done.set()

        with self._lock:
            self._cmds.append(run)
        self._wake_once()
        return done.wait(timeout_s) if done is not None else True

    def _wake_once(self) -> None:
        """Wake the loop, unless a wake-up byte is on its way already (``_woken``)."""
        with self._lock:
            wake, self._woken = not self._woken, True
        if wake:
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"x")

    # -- lanes.Poller (hosted) -------------------------------------------------------------

    def poll(self, timeout_s: float | None) -> None:
        if not self._stopping:
            self._step(timeout_s)

    def wake(self) -> None:
        if threading.current_thread() is not self._thread:  # the loop thread is not in select
            self._wake_once()

    def _register(self, sock: paho.SocketLike, owner: IoOwner) -> None:
        fd = sock.fileno()
        if fd < 0:
            return
        stale = self._sel.get_map().get(fd)
        if stale is not None:  # a descriptor reused before its old socket was let go
            self._sel.unregister(stale.fileobj)
        self._sel.register(sock, selectors.EVENT_READ, owner)
        self._writing.discard(fd)
        if owner.client.want_write():
            # asked for before the socket was registered (a hosted loop's lane
            # published in between): paho asks only once, so write it now
            self._flush(sock, owner)
        keepalive = getattr(owner.client, "keepalive", 0) or MISC_MAX_S * 10
        self._misc_every = min(self._misc_every, max(MISC_MIN_S, keepalive / MISC_PER_KEEPALIVE))

    def _unregister(self, sock: paho.SocketLike) -> None:
        with contextlib.suppress(KeyError, ValueError):
            key = self._sel.unregister(sock)
            self._writing.discard(key.fd)

    def _want_write(self, sock: paho.SocketLike, owner: IoOwner, on: bool) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            fd = sock.fileno()
            if (fd in self._writing) == on:
                return
            self._sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0), owner)
            if on:
                self._writing.add(fd)
            else:
                self._writing.discard(fd)

    def _flush(self, sock: paho.SocketLike, owner: IoOwner) -> None:
        """Write what another thread queued now: the socket can nearly always take
        it, and waiting for EVENT_WRITE costs two ``epoll_ctl`` and a wake-up."""
        try:
            key = self._sel.get_key(sock)
        except (KeyError, ValueError, RuntimeError):
            return  # closed meanwhile (RuntimeError: the selector itself)
        if key.data is not owner:
            return
        c = owner.client
        rc = c.loop_write()
        if rc == paho.MQTT_ERR_SUCCESS and c.want_write():
            self._want_write(sock, owner, True)  # the socket is full: wait for it
        self._check(owner, rc)

    # -- the loop thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._step(None)
        self._run_commands()

    def _step(self, timeout_s: float | None) -> None:
        """Wait for I/O (at most ``timeout_s``, and never past the next keepalive
        sweep), serve it, run the commands handed over, sweep when due."""
        wait = max(0.0, self._next_misc - time.monotonic())
        if timeout_s is not None:
            wait = min(wait, max(0.0, timeout_s))
        try:
            events = self._sel.select(wait)
        except OSError as e:  # a socket closed under us: drop it and go on
            log.debug("select failed: %s", e)
            events = []
        self._serving = True
        try:
            for key, mask in events:
                owner = key.data
                if owner is None:
                    with contextlib.suppress(BlockingIOError, OSError):
                        self._wake_r.recv(4096)
                    continue
                self._serve(owner, mask)
        finally:
            self._serving = False
        self._run_commands()
        if time.monotonic() >= self._next_misc:
            self._next_misc = time.monotonic() + self._misc_every
            self._serving = True
            try:
                self._sweep()
            finally:
                self._serving = False

    def _sweep(self) -> None:
        for key in list(self._sel.get_map().values()):
            owner = key.data
            if owner is None:
                continue
            c = owner.client
            rc = c.loop_misc()
            if rc == paho.MQTT_ERR_SUCCESS and key.fd not in self._writing and c.want_write():
                # paho's "want write" flag and its queue are not updated under
                # one lock: a packet queued just as the queue ran empty can
                # miss its callback; it goes out here at the latest
                rc = c.loop_write()
            self._check(owner, rc)

    def _run_commands(self) -> None:
        with self._lock:
            self._woken = False  # commands queued from now on wake the loop again
        while True:
            with self._lock:
                if not self._cmds:
                    return
                cmd = self._cmds.popleft()
            try:
                cmd()
            except Exception:
                log.exception("I/O loop command failed")

    def _serve(self, owner: IoOwner, mask: int) -> None:
        c = owner.client
        rc = paho.MQTT_ERR_SUCCESS
        if mask & selectors.EVENT_READ:
            rc = c.loop_read()
            # TLS (or the packet guard) may hold bytes the socket will not signal again.
            for _ in range(64):
                sock = c.socket()
                pending = getattr(sock, "pending", None)
                if rc != paho.MQTT_ERR_SUCCESS or pending is None or not pending():
                    break
                rc = c.loop_read()
        if rc == paho.MQTT_ERR_SUCCESS and mask & selectors.EVENT_WRITE:
            rc = c.loop_write()
        self._check(owner, rc)

    def _check(self, owner: IoOwner, rc: int) -> None:
        if rc == paho.MQTT_ERR_SUCCESS:
            return
        try:
            owner.io_failed(rc)
        except Exception:
            log.exception("I/O failure handler failed")
