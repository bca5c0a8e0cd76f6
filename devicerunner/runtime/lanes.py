"""Serial lanes on a small shared pool of threads, with timers.

A device's scheduler, updater and transport each need a thread of their own
in one sense only: their work must run one thing at a time, in order. A
thousand simulated devices in one process cannot have five thousand OS
threads, so each of those components owns a ``Lane`` on an ``Executor``
that a whole process (or one device, standalone) shares.

Invariants:
- The tasks of one lane run one at a time, in the order they were posted
  (a timer's task is posted when it is due), never two at once; the lane
  may move between pool threads from one task to the next.
- A lane holds a pool thread only while it has tasks to run, and yields it
  after ``BATCH`` tasks so a busy lane cannot starve the others.
- An exception escaping a task is logged against its lane; it never kills
  a pool thread or the lane.
- A paused lane queues but runs nothing until ``resume()``; a closed lane
  drops what is queued and refuses new work (silently: closing is a stop),
  but every ``submit()`` Future resolves: one whose task was dropped or
  refused gets LaneClosedError, so no caller waits on it forever.
- A task may block waiting on a lane of *another* executor (the updater
  waits for the scheduler) with ``submit``; on a lane of its own executor,
  whose threads could all be taken by such waiters, only with ``call``:
  when that lane is idle, ``call`` runs its queued tasks and then the one
  asked for in the calling thread, as that lane (so one thread can serve
  both the updater's lanes and the schedulers': a simulator worker's does);
  when it is busy or paused and no other thread exists, ``call`` refuses.
- An executor of one thread may host a ``Poller`` (an I/O loop): the thread
  polls where it would wait for work, and at least every POLL_EVERY_S while
  lanes keep it busy; work queued while it polls wakes the poll.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
Task = Callable[[], object]

BATCH = 16
"""Tasks a lane runs before it goes to the back of the ready queue."""
POLL_EVERY_S = 0.002
"""An executor hosting a Poller serves its I/O at least this often while lanes keep it busy."""


class Poller(Protocol):
    """I/O an executor's one thread serves between tasks (``Executor.host``)."""

    def poll(self, timeout_s: float | None) -> None:
        """Wait up to ``timeout_s`` (None: no limit) for I/O, serve it, return;
        return early when ``wake`` is called."""

    def wake(self) -> None:
        """Make a ``poll`` in progress (or the next one) return soon (any thread)."""


_local = threading.local()


def _due(timer: Timer) -> float:
    return timer.when


class LaneClosedError(RuntimeError):
    """The lane was closed before the submitted task could run."""


class _Submitted:
    """A ``submit()``-ted task: the lane fails its Future if it drops it."""

    __slots__ = ("fn", "fut")

    def __init__(self, fn: Callable[[], object], fut: Future[object]) -> None:
        self.fn = fn
        self.fut = fut

    def __call__(self) -> None:
        if not self.fut.set_running_or_notify_cancel():
            return
        try:
            self.fut.set_result(self.fn())
        except BaseException as e:
            self.fut.set_exception(e)

    def drop(self, lane: str) -> None:
        if self.fut.set_running_or_notify_cancel():
            self.fut.set_exception(LaneClosedError(f"lane {lane} closed before the task ran"))


class Timer:
    """A pending ``call_at``/``every``; ``cancel()`` is safe from any thread."""

    __slots__ = ("cancelled", "fn", "lane", "period", "queued", "when")

    def __init__(self, lane: Lane, fn: Task, when: float, period: float | None) -> None:
        self.lane = lane
        self.fn = fn
        self.when = when
        self.period = period
        self.cancelled = False
        self.queued = False

    def cancel(self) -> None:
        self.cancelled = True  # dropped lazily when its slot fires

    def _run_periodic(self) -> None:
        self.queued = False
        if not self.cancelled:
            self.fn()


class Lane:
    """Tasks in order, one at a time, on its executor's threads."""

    def __init__(self, executor: Executor, name: str, paused: bool) -> None:
        self.executor = executor
        self.name = name
        self._tasks: deque[Task] = deque()
        self._paused = paused
        self._closed = False
        self._running = False
        self._ready = False  # in the executor's ready queue
        self._drainers = 0

    # -- any thread --------------------------------------------------------------

    @property
    def current(self) -> bool:
        """Is the calling code running as a task of this lane?"""
        return getattr(_local, "lane", None) is self

    def post(self, fn: Task) -> bool:
        """Queue ``fn``; False (and nothing queued) if the lane is closed."""
        ex = self.executor
        with ex._lock:
            if self._closed:
                return False
            self._tasks.append(fn)
            ex._make_ready(self)
            return True

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on this lane; its result or exception via the Future,
        LaneClosedError if the lane is closed before it runs. Called from the
        lane itself it runs at once (waiting would deadlock)."""
        fut: Future[T] = Future()
        task = _Submitted(fn, fut)  # type: ignore[arg-type]
        if self.current:
            task()
        elif not self.post(task):
            task.drop(self.name)
        return fut

    def call(self, fn: Callable[[], T], timeout_s: float) -> T:
        """Run ``fn`` on this lane and return its result (or raise its exception;
        TimeoutError after ``timeout_s``, LaneClosedError if the lane closes
        first). Called on a thread of this lane's executor (a task of another
        lane, a poller's callback) while this lane is idle, it runs here and
        now, after every task queued on this lane (their order holds; no
        timeout applies then), instead of waiting for a pool thread that may be
        this very one; if this lane is busy or paused and the executor has no
        other thread, it raises RuntimeError at once rather than stall it."""
        if self.current:
            return fn()
        ex = self.executor
        if threading.current_thread() in ex._threads:
            if self._take():
                return self._run_here(fn, getattr(_local, "lane", None))
            if self._closed:
                raise LaneClosedError(f"lane {self.name} closed before the task ran")
            if len(ex._threads) == 1:
                # waiting would hold the only thread that could run it for the whole timeout
                raise RuntimeError(f"lane {self.name} is busy or paused; its executor has no other thread")
        return self.submit(fn).result(timeout_s)

    def _take(self) -> bool:
        """Mark this lane running for the calling thread, if it is idle."""
        with self.executor._lock:
            if self._running or self._closed or self._paused:
                return False
            self._running = True  # a pool thread that pops it from the ready queue skips it
            return True

    def _run_here(self, fn: Callable[[], T], caller: Lane | None) -> T:
        ex = self.executor
        _local.lane = self
        try:
            while True:
                with ex._lock:
                    if self._closed:
                        raise LaneClosedError(f"lane {self.name} closed before the task ran")
                    if not self._tasks:
                        break
                    task = self._tasks.popleft()
                try:
                    task()
                except BaseException:
                    log.exception("task on lane %s failed", self.name)
            return fn()
        finally:
            _local.lane = caller
            with ex._lock:
                ex._release(self)

    def call_later(self, delay_s: float, fn: Task) -> Timer:
        return self.call_at(time.monotonic() + max(0.0, delay_s), fn)

    def call_at(self, when: float, fn: Task) -> Timer:
        """``fn`` posted to this lane at ``when`` (``time.monotonic()`` seconds)."""
        return self.executor._add_timer(Timer(self, fn, when, None))

    def every(self, period_s: float, fn: Task, first_s: float | None = None) -> Timer:
        """``fn`` every ``period_s`` from its due times (no drift); periods
        missed while the lane was busy are skipped, not run in a burst."""
        if period_s <= 0:
            raise ValueError("period must be positive")
        first = period_s if first_s is None else first_s
        return self.executor._add_timer(Timer(self, fn, time.monotonic() + first, period_s))

    def resume(self) -> None:
        ex = self.executor
        with ex._lock:
            self._paused = False
            if self._tasks:
                ex._make_ready(self)

    def close(self, wait_s: float = 0.0) -> None:
        """Drop queued tasks and timers (their ``cancel()`` is not needed); a
        task already running finishes, and ``wait_s`` > 0 waits that long for
        it (unless called from the lane itself)."""
        with self.executor._lock:
            self._closed = True
            dropped = list(self._tasks)
            self._tasks.clear()
        for task in dropped:  # outside the lock: a Future's callbacks run here
            if isinstance(task, _Submitted):
                task.drop(self.name)
        if wait_s > 0 and not self.current:
            self.drain(wait_s)

    def drain(self, timeout_s: float) -> bool:
        """Wait (from another lane or thread) until nothing is queued or
        running here; False on timeout."""
        if self.current:
            raise RuntimeError(f"lane {self.name} cannot wait for itself")
        ex = self.executor
        deadline = time.monotonic() + timeout_s
        with ex._lock:
            self._drainers += 1
            try:
                while self._running or (self._tasks and not self._paused):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    ex._idle.wait(left)
                return True
            finally:
                self._drainers -= 1


class Executor:
    """``threads`` pool threads running lanes; one set of timers for all of them.

    ``slack_s``: a timer may fire up to this much late (never early), so that
    timers due close together fire in one wake-up. A wake-up costs 15-30 us of
    CPU on these machines; a thousand devices ticking at 10 Hz each would
    otherwise spend most of the CPU going to sleep and waking up.

    Timers wait in buckets, one per ``slack_s`` slot (the first slot time at or
    after the timer is due; with no slack, the due time itself), and a heap
    holds the slot times only. A heap of every timer made each tick of 10,000
    simulated devices pay ~14 tuple comparisons, each a cache miss into a
    different corner of the heap (py-spy: 13% of an idle fleet's CPU); a slot
    is found with one dict lookup, and a bucket is sorted by due time when it
    fires, so timers still fire in due order (ties in the order they were set)."""

    def __init__(self, threads: int, name: str, slack_s: float = 0.0) -> None:
        if threads < 1:
            raise ValueError("an executor needs at least one thread")
        self.name = name
        self.slack_s = slack_s
        self._lock = threading.Lock()
        """Guards lanes, the ready queue and the timers. Taken directly in ``with``
        (not through the Condition: a Python-level __enter__ per acquisition)."""
        self._cond = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._ready: deque[Lane] = deque()
        self._slots: list[float] = []
        """Heap of the slot times that have a bucket."""
        self._buckets: dict[float, list[Timer]] = {}
        self._stopping = False
        self._poller: Poller | None = None
        self._polling = False
        """The pool thread is in ``poll`` (outside the lock): waking it takes ``Poller.wake``."""
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def lane(self, name: str, *, paused: bool = False) -> Lane:
        return Lane(self, name, paused)

    def alive(self) -> bool:
        return not self._stopping and all(t.is_alive() for t in self._threads)

    def sole_thread(self) -> threading.Thread:
        """The executor's thread; ValueError if it has several."""
        if len(self._threads) != 1:
            raise ValueError(f"executor {self.name} has {len(self._threads)} threads, not one")
        return self._threads[0]

    def host(self, poller: Poller) -> None:
        """Serve ``poller`` on this executor's one thread: where it waited for
        work it polls, and while lanes keep it busy it polls (without waiting) at
        least every POLL_EVERY_S. One thread can then run a process's lanes and
        its network I/O: no GIL hand-off between the two."""
        self.sole_thread()
        with self._lock:
            if self._poller is not None:
                raise ValueError(f"executor {self.name} already hosts a poller")
            self._poller = poller
            self._cond.notify_all()  # a thread waiting for work polls from now on

    def unhost(self, timeout_s: float = 5.0) -> bool:
        """Stop serving the poller; returns once no ``poll`` runs (False on timeout)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            poller, self._poller = self._poller, None
            if poller is not None and self._polling:
                poller.wake()
            while self._polling:
                left = deadline - time.monotonic()
                if left <= 0 or threading.current_thread() in self._threads:
                    return False
                self._idle.wait(left)
        return True

    def shutdown(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            self._notify_all()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    # -- under self._lock --------------------------------------------------------------

    def _notify(self, n: int = 1) -> None:
        self._cond.notify(n)
        self._wake_poll()

    def _notify_all(self) -> None:
        self._cond.notify_all()
        self._wake_poll()

    def _wake_poll(self) -> None:
        if self._polling and self._poller is not None:
            self._poller.wake()

    def _make_ready(self, lane: Lane, wake: bool = True) -> bool:
        """Queue ``lane`` to run; True if it was queued now. ``wake=False``: the
        caller wakes pool threads itself (``_fire_due``, once per batch)."""
        if lane._ready or lane._running or lane._paused or lane._closed:
            return False
        lane._ready = True
        self._ready.append(lane)
        if wake:
            self._notify()
        return True

    def _add_timer(self, timer: Timer) -> Timer:
        with self._lock:
            if timer.lane._closed:
                timer.cancelled = True
                return timer
            self._insert(timer)
        return timer

    def _slot(self, when: float) -> float:
        """The time ``when``'s bucket fires: at or after it, by at most ``slack_s``."""
        slack = self.slack_s
        return (when // slack + 1) * slack if slack > 0 else when

    def _insert(self, timer: Timer, wake: bool = True) -> None:
        """``wake=False``: the caller is a pool thread that works out its wait next."""
        slot = self._slot(timer.when)
        bucket = self._buckets.get(slot)
        if bucket is not None:
            bucket.append(timer)
            return
        self._buckets[slot] = [timer]
        slots = self._slots
        if wake and (not slots or slot < slots[0]):
            self._notify()  # a waiting thread must shorten its wait
        heapq.heappush(slots, slot)

    def _fire_due(self, now: float) -> None:
        """Called by a pool thread about to look for a lane: it takes one of the
        lanes made ready here itself, so only the others need a thread woken
        (one ``notify`` per batch instead of one per timer)."""
        slots, buckets = self._slots, self._buckets
        queued = 0
        while slots and slots[0] <= now:
            bucket = buckets.pop(heapq.heappop(slots))
            if len(bucket) > 1:
                bucket.sort(key=_due)  # stable: equal due times keep the order they were set in
            for timer in bucket:
                lane = timer.lane
                if timer.cancelled or lane._closed:
                    continue
                if timer.period is None:
                    lane._tasks.append(timer.fn)
                elif not timer.queued:  # still waiting in a busy lane: this period is skipped
                    timer.queued = True
                    lane._tasks.append(timer._run_periodic)
                queued += self._make_ready(lane, wake=False)
                if timer.period is not None:
                    nxt = timer.when + timer.period
                    if nxt <= now:  # skip missed periods instead of bursting
                        nxt += ((now - nxt) // timer.period + 1) * timer.period
                    timer.when = nxt
                    self._insert(timer, wake=False)  # its slot is after ``now``: not this loop's again
        if queued > 1:
            self._notify(queued - 1)

    # -- pool threads ------------------------------------------------------------------

    def _work(self) -> None:
        polled_at = time.monotonic()
        while True:
            lane: Lane | None = None
            with self._lock:
                while True:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    self._fire_due(now)
                    if self._ready:
                        ready = self._ready.popleft()
                        ready._ready = False
                        if ready._running or ready._closed or ready._paused or not ready._tasks:
                            continue  # running: taken by Lane.call, which queues it again after
                        lane = ready
                        lane._running = True
                        fn = lane._tasks.popleft()  # taken here: one lock round trip less per run
                        break
                    wait = self._slots[0] - now if self._slots else None
                    poller = self._poller
                    if poller is None:
                        self._cond.wait(wait)
                        continue
                    # Set in the same critical section that found nothing to run:
                    # work queued from now on wakes the poll (no lost wake-up).
                    self._polling = True
                    break
            if lane is None:
                assert poller is not None  # set with _polling above
                self._poll(poller, wait)
                polled_at = time.monotonic()
                continue
            self._run(lane, fn)
            if self._poller is not None and time.monotonic() - polled_at >= POLL_EVERY_S:
                with self._lock:
                    poller = self._poller
                    self._polling = poller is not None
                if poller is not None:
                    self._poll(poller, 0.0)
                polled_at = time.monotonic()

    def _poll(self, poller: Poller, timeout_s: float | None) -> None:
        """Called with ``_polling`` set; clears it."""
        try:
            poller.poll(timeout_s)
        except Exception:
            log.exception("poller of executor %s failed", self.name)
        finally:
            with self._lock:
                self._polling = False
                self._idle.notify_all()  # unhost() waits for this

    def _run(self, lane: Lane, fn: Task) -> None:
        """Run ``fn`` and up to BATCH - 1 more of ``lane``'s tasks; each next task
        is taken in the same critical section that would otherwise end the run."""
        _local.lane = lane
        released = False
        try:
            ran = 0
            while True:
                try:
                    fn()
                except BaseException:
                    log.exception("task on lane %s failed", lane.name)
                ran += 1
                with self._lock:
                    if ran < BATCH and not lane._closed and not lane._paused and lane._tasks:
                        fn = lane._tasks.popleft()
                        continue
                    self._release(lane)
                    released = True
                    return
        finally:
            _local.lane = None
            if not released:
                with self._lock:
                    self._release(lane)

    def _release(self, lane: Lane) -> None:
        """Under the lock: ``lane`` no longer runs; back in the queue if it has work."""
        lane._running = False
        if lane._tasks:
            self._make_ready(lane)
        if lane._drainers:
            self._idle.notify_all()
