"""The threads a process runs its devices on.

A standalone daemon owns one ``Runtime``; the fleet simulator shares one
between all the devices of a worker process, so a device costs lanes and
timers, not threads: a thousand devices fit on a 2-core machine.

- ``ticks``: the executor every scheduler lane runs on (Wasm ticks and
  swaps). Its tasks never wait for anything else.
- ``work``: updater, transport, kv flushing, status files: file I/O,
  signature checks, compiling. Its tasks may wait for a scheduler lane
  (never the other way round: see lanes.py). One thread by default, so a
  device's file operations happen in one thread, in order (the crash
  harness counts them per thread).
- ``connect``: MQTT (re)connecting, which blocks (DNS, TCP, TLS handshake,
  up to paho's connect timeout): one thread, so an unreachable broker never
  holds up the updater.
- shared services: one per process and key, created on first use by the
  layer that needs it (``shared``) and closed with the runtime -- e.g. the
  transport's one selector loop for every MQTT socket (transport/ioloop.py),
  on a thread of its own, or hosted by ``hosts_io``.
  The runtime knows only that they can be closed, so no arrow runs up to
  the layers that define them.

``one_thread=True`` (the simulator's workers): ``ticks`` is ``work``, and the
I/O loop runs on that thread too; only ``connect`` (and the wasmtime engine's
epoch ticker) keep threads of their own. ``tick_threads`` is then unused.

Each is created on first use, so a device without a broker has no I/O thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol, TypeVar

from devicerunner.runtime.lanes import Executor


class Service(Protocol):
    def close(self, timeout_s: float) -> None: ...


S = TypeVar("S", bound=Service)


class Runtime:
    def __init__(
        self,
        tick_threads: int = 1,
        work_threads: int = 1,
        name: str = "dr",
        timer_slack_s: float = 0.0,
        one_thread: bool = False,
    ) -> None:
        """``timer_slack_s``: how late a timer may fire so that timers due close
        together share a wake-up (lanes.Executor); 0 for a device on its own.
        ``one_thread``: ticks, update work and the MQTT I/O loop share the one
        ``work`` thread (``ticks`` is ``work``; the transport hosts its loop on
        it: ``hosts_io``). Where every thread but one only queues for the GIL,
        they gain nothing from threads of their own and lose a hand-off of the
        GIL around every system call; a tick then waits for the task running
        before it, as it waits for the GIL anyway. For many devices in one
        process (the simulator); a device on its own keeps its tick thread."""
        if one_thread and work_threads != 1:
            raise ValueError("one_thread needs work_threads=1")
        self.one_thread = one_thread
        self.tick_threads = tick_threads
        self.work_threads = work_threads
        self.timer_slack_s = timer_slack_s
        self.name = name
        self._lock = threading.Lock()
        self._executors: dict[str, Executor] = {}
        self._services: dict[str, Service] = {}

    def _executor(self, role: str, threads: int, slack_s: float) -> Executor:
        with self._lock:
            ex = self._executors.get(role)
            if ex is None:
                ex = self._executors[role] = Executor(threads, f"{self.name}-{role}", slack_s)
            return ex

    @property
    def ticks(self) -> Executor:
        if self.one_thread:
            return self.work
        return self._executor("ticks", self.tick_threads, self.timer_slack_s)

    @property
    def work(self) -> Executor:
        return self._executor("work", self.work_threads, self.timer_slack_s)

    @property
    def hosts_io(self) -> Executor | None:
        """The executor a network I/O loop should run on instead of a thread of its own."""
        return self.work if self.one_thread else None

    @property
    def connect(self) -> Executor:
        return self._executor("connect", 1, 0.0)

    def shared(self, key: str, factory: Callable[[str], S], kind: type[S]) -> S:
        """The process's one ``kind`` service under ``key``, made by
        ``factory(thread_name)`` on first use and closed by ``close``."""
        with self._lock:
            svc = self._services.get(key)
            if svc is None:
                svc = self._services[key] = factory(f"{self.name}-{key}")
            if not isinstance(svc, kind):
                raise TypeError(f"runtime service {key!r} is a {type(svc).__name__}, not {kind.__name__}")
            return svc

    def close(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            services, executors = list(self._services.values()), list(self._executors.values())
        for svc in services:
            svc.close(timeout_s)
        for ex in reversed(executors):
            ex.shutdown(timeout_s)
