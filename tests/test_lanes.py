"""Lanes: ordered, never concurrent, fair, with timers; many MQTT connections
on one I/O loop. Real threads, real sockets, a real Mosquitto."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devicerunner.runtime.lanes import Executor
from devicerunner.runtime.process import Runtime
from devicerunner.transport.mqtt import Connection
from devicerunner.transport.settings import parse_url
from tests.brokers import Mosquitto
from tests.conftest import until


@pytest.fixture
def ex() -> Iterator[Executor]:
    e = Executor(3, "test")
    yield e
    e.shutdown()


def test_tasks_of_a_lane_run_in_order_and_never_two_at_once(ex: Executor) -> None:
    lanes = [ex.lane(f"l{i}") for i in range(8)]
    seen: dict[str, list[int]] = {lane.name: [] for lane in lanes}
    active = {lane.name: 0 for lane in lanes}
    overlaps = []
    guard = threading.Lock()

    def task(name: str, i: int) -> None:
        with guard:
            active[name] += 1
            if active[name] > 1:
                overlaps.append((name, i))
        time.sleep(0.0002)
        seen[name].append(i)
        with guard:
            active[name] -= 1

    for i in range(200):
        for lane in lanes:
            lane.post(lambda n=lane.name, i=i: task(n, i))  # type: ignore[misc]
    for lane in lanes:
        assert lane.drain(20)
    assert overlaps == []
    for name, xs in seen.items():
        assert xs == list(range(200)), name


def test_a_failing_task_is_logged_and_the_lane_goes_on(
    ex: Executor, caplog: pytest.LogCaptureFixture
) -> None:
    lane = ex.lane("l")
    out: list[int] = []
    lane.post(lambda: 1 / 0)
    lane.post(lambda: out.append(1))
    assert lane.drain(5)
    assert out == [1]
    assert "task on lane l failed" in caplog.text


def test_a_busy_lane_does_not_starve_the_others() -> None:
    ex = Executor(1, "one")  # one thread: fairness is all that lets the other lane run
    try:
        hog, other = ex.lane("hog"), ex.lane("other")
        stop = threading.Event()
        done = threading.Event()

        def spin() -> None:
            if not stop.is_set():
                time.sleep(0.001)
                hog.post(spin)

        hog.post(spin)
        other.post(done.set)
        assert done.wait(5)
        stop.set()
    finally:
        ex.shutdown()


def test_timers_fire_in_order_and_a_cancelled_one_never(ex: Executor) -> None:
    lane = ex.lane("t")
    fired: list[str] = []
    lane.call_later(0.06, lambda: fired.append("c"))
    lane.call_later(0.02, lambda: fired.append("a"))
    gone = lane.call_later(0.04, lambda: fired.append("cancelled"))
    lane.call_later(0.04, lambda: fired.append("b"))
    gone.cancel()
    assert until(lambda: len(fired) == 3, 5)
    time.sleep(0.05)
    assert fired == ["a", "b", "c"]


def test_a_periodic_timer_skips_periods_missed_while_the_lane_was_busy(ex: Executor) -> None:
    lane = ex.lane("p")
    ticks: list[float] = []
    t = lane.every(0.01, lambda: ticks.append(time.monotonic()))
    lane.post(lambda: time.sleep(0.2))  # ~20 periods missed
    time.sleep(0.35)
    t.cancel()
    n = len(ticks)
    time.sleep(0.05)
    assert len(ticks) == n  # cancelled: no more
    # Without skipping, the 20 missed periods would arrive as a burst right after the sleep.
    burst = sum(1 for a, b in itertools.pairwise(ticks) if b - a < 0.002)
    assert burst <= 2, ticks
    assert n >= 8  # and it kept going after the busy spell


def test_a_paused_lane_runs_nothing_until_resumed(ex: Executor) -> None:
    lane = ex.lane("p", paused=True)
    out: list[int] = []
    lane.post(lambda: out.append(1))
    time.sleep(0.05)
    assert out == []
    lane.resume()
    assert until(lambda: out == [1], 5)


def test_close_drops_queued_work_and_drain_waits_for_the_running_task(ex: Executor) -> None:
    lane = ex.lane("c")
    started, out = threading.Event(), []

    def slow() -> None:
        started.set()
        time.sleep(0.1)
        out.append("slow")

    lane.post(slow)
    lane.post(lambda: out.append("dropped"))
    assert started.wait(5)
    lane.close()
    assert lane.drain(5)
    assert out == ["slow"]
    lane.post(lambda: out.append("after close"))
    with pytest.raises(RuntimeError, match="closed"):
        lane.submit(lambda: 1).result(1)
    time.sleep(0.02)
    assert out == ["slow"]


def test_submit_from_the_lane_itself_runs_inline_instead_of_deadlocking(ex: Executor) -> None:
    lane = ex.lane("s")
    assert lane.submit(lambda: lane.submit(lambda: 41).result(1) + 1).result(5) == 42


def test_one_process_holds_more_mqtt_connections_than_select_can_watch(tmp_path: Path) -> None:
    """paho's own loop uses select(), blind past descriptor 1024 (~339 clients):
    these 1,100 share one I/O loop and a fixed handful of threads."""
    n = 1100
    broker = Mosquitto(tmp_path / "b").start()
    rt = Runtime(name="many")
    threads_before = threading.active_count()
    conns: list[Connection] = []
    got: list[str] = []
    try:
        settings = parse_url(broker.url, keepalive_s=30)
        for i in range(n):
            c = Connection(
                settings, f"c{i}", on_message=lambda t, p, r: got.append(t), runtime=rt, backoff_max_s=2.0
            )
            c.subscribe(["t/all"], qos=0)
            conns.append(c)
        for c in conns:
            c.start()
        assert until(lambda: all(c.connected.is_set() for c in conns), 60), sum(
            c.connected.is_set() for c in conns
        )
        assert max(c.client.socket().fileno() for c in conns) > 1024  # type: ignore[union-attr]
        assert (
            threading.active_count() - threads_before <= 2
        )  # the I/O loop and the connect thread, not 1,100
        # Every one of them is served: a message to all arrives at all (retained:
        # live or at subscription, whichever comes first, exactly once).
        conns[0].publish("t/all", b"x", qos=1, retain=True)
        assert until(lambda: len(got) == n, 30), len(got)
    finally:
        for c in conns:
            c.stop(timeout_s=1)
        rt.close()
        broker.stop()


def test_closing_a_lane_fails_the_futures_of_queued_submits_instead_of_leaving_them_unresolved() -> None:
    from devicerunner.runtime.lanes import LaneClosedError

    ex = Executor(2, "t")
    try:
        lane = ex.lane("l")
        gate = threading.Event()
        started = threading.Event()
        first = lane.submit(lambda: (started.set(), gate.wait(5)))
        assert started.wait(5)
        queued = [lane.submit(lambda i=i: i) for i in range(3)]  # behind the blocked task
        lane.close()
        for fut in queued:  # these used to never resolve: a caller waiting on one hung
            with pytest.raises(LaneClosedError):
                fut.result(timeout=2)
        with pytest.raises(LaneClosedError):
            lane.submit(lambda: 1).result(timeout=2)
        gate.set()
        assert first.result(timeout=5) == (None, True)  # the running task finishes
    finally:
        ex.shutdown()


def test_timers_with_slack_fire_in_due_order_and_never_early() -> None:
    ex = Executor(1, "slack", slack_s=0.05)
    try:
        lane = ex.lane("t")
        fired: list[tuple[str, float, float]] = []
        t0 = time.monotonic()
        for name, delay in (("d", 0.047), ("a", 0.012), ("c", 0.031), ("b", 0.02), ("e", 0.12)):
            due = t0 + delay
            lane.call_at(due, lambda n=name, d=due: fired.append((n, d, time.monotonic())))  # type: ignore[misc]
        assert until(lambda: len(fired) == 5, 5)
        assert [n for n, _, _ in fired] == ["a", "b", "c", "d", "e"]
        assert all(at >= due for _, due, at in fired), fired
    finally:
        ex.shutdown()


@pytest.fixture
def one() -> Iterator[Executor]:
    e = Executor(1, "one")
    yield e
    e.shutdown()


def test_call_to_a_lane_of_the_same_one_thread_executor_runs_in_the_caller_instead_of_deadlocking(
    one: Executor,
) -> None:
    work, sched = one.lane("work"), one.lane("sched")
    ran_on: list[bool] = []

    def job() -> int:
        ran_on.append(sched.current)
        return 41

    # submit().result() here would wait for the executor's only thread: this one
    assert work.submit(lambda: sched.call(job, 5) + 1).result(5) == 42
    assert ran_on == [True]


def test_call_runs_the_lane_s_queued_tasks_first_and_the_lane_goes_on_after(one: Executor) -> None:
    work, sched = one.lane("work"), one.lane("sched")
    order: list[str] = []

    def in_work() -> list[str]:
        sched.post(lambda: order.append("queued 1"))
        sched.post(lambda: order.append("queued 2"))
        return sched.call(lambda: [*order, "call"], 5)

    assert work.submit(in_work).result(5) == ["queued 1", "queued 2", "call"]
    sched.post(lambda: order.append("after"))
    assert sched.drain(5)
    assert order == ["queued 1", "queued 2", "after"]


def test_call_raises_the_task_s_exception_and_refuses_a_closed_lane(one: Executor) -> None:
    from devicerunner.runtime.lanes import LaneClosedError

    work, sched = one.lane("work"), one.lane("sched")

    def boom() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        work.submit(lambda: sched.call(boom, 5)).result(5)
    sched.close()
    with pytest.raises(LaneClosedError):
        work.submit(lambda: sched.call(lambda: 1, 5)).result(5)
    with pytest.raises(LaneClosedError):
        sched.call(lambda: 1, 5)  # from a thread of no executor: through submit


def test_call_waits_for_a_lane_running_on_another_thread_instead_of_running_it_twice() -> None:
    ex = Executor(2, "two")
    try:
        a, b = ex.lane("a"), ex.lane("b")
        inside, gate = threading.Event(), threading.Event()
        active, overlaps = [0], []

        def busy() -> None:
            active[0] += 1
            inside.set()
            gate.wait(5)
            active[0] -= 1

        def job() -> str:
            if active[0]:
                overlaps.append("b ran twice at once")
            return "done"

        b.post(busy)
        assert inside.wait(5)
        fut = a.submit(lambda: b.call(job, 5))
        assert until(lambda: len(b._tasks) == 1, 5)  # queued behind b's running task
        gate.set()
        assert fut.result(5) == "done"
        assert overlaps == []  # it waited for b's running task instead of running beside it
    finally:
        ex.shutdown()


def test_a_one_thread_runtime_serves_lanes_and_mqtt_io_on_that_thread(tmp_path: Path) -> None:
    """Runtime(one_thread=True): the I/O loop has no thread of its own; messages
    arrive, lane tasks publish, and timers fire, all on the work thread."""
    broker = Mosquitto(tmp_path / "b").start()
    rt = Runtime(name="one", one_thread=True, timer_slack_s=0.01)
    conns: list[Connection] = []
    got: list[tuple[str, str]] = []
    try:
        work = rt.work
        assert rt.ticks is work
        lane = work.lane("app")
        settings = parse_url(broker.url, keepalive_s=30)
        for i in range(20):
            c = Connection(
                settings,
                f"one{i}",
                on_message=lambda t, p, r: got.append((t, threading.current_thread().name)),
                runtime=rt,
                backoff_max_s=2.0,
            )
            c.subscribe([f"t/{i}"], qos=1)
            conns.append(c)
            c.start()
        assert until(lambda: all(c.connected.is_set() for c in conns), 30)
        assert not [t.name for t in threading.enumerate() if t.name.endswith("-io")]
        # a lane task of the same thread publishes: its packets go out without a loop thread
        ticks: list[float] = []
        lane.every(0.02, lambda: ticks.append(time.monotonic()))
        for i, c in enumerate(conns):
            lane.post(lambda c=c, i=i: c.publish(f"t/{i}", b"x", qos=1))  # type: ignore[misc]
        assert until(lambda: len(got) == 20, 30), got
        assert {name for _, name in got} == {"one-work-0"}
        assert until(lambda: len(ticks) >= 5, 5)
    finally:
        for c in conns:
            c.stop(timeout_s=2)
        rt.close()
        broker.stop()


def test_call_on_the_only_thread_refuses_a_busy_lane_at_once_instead_of_stalling_the_executor(
    one: Executor,
) -> None:
    a, b = one.lane("a"), one.lane("b")

    def nested() -> str:
        # b is running (further up this very stack): waiting for it could never end
        return a.call(lambda: b.call(lambda: "never", 30), 5)

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="busy or paused"):
        b.submit(nested).result(10)
    assert time.monotonic() - t0 < 5  # refused, not timed out (30 s)


class _Waiting:
    """A Poller that only waits to be woken: nothing but ``wake`` ends a poll."""

    def __init__(self) -> None:
        self.woken = threading.Event()
        self.polls = 0

    def poll(self, timeout_s: float | None) -> None:
        self.polls += 1
        self.woken.wait(timeout_s)
        self.woken.clear()

    def wake(self) -> None:
        self.woken.set()


def test_work_posted_while_the_executor_polls_wakes_the_poll_and_unhost_returns_it_to_waiting(
    one: Executor,
) -> None:
    poller = _Waiting()
    one.host(poller)
    lane = one.lane("l")
    assert until(lambda: poller.polls >= 1, 5)  # idle: in poll, with no timer to end it
    ran = threading.Event()
    lane.post(ran.set)
    assert ran.wait(5)  # only a wake-up ends that poll
    assert one.unhost(5)
    polls = poller.polls
    again = threading.Event()
    lane.post(again.set)
    assert again.wait(5)  # served by the condition wait again
    assert poller.polls == polls
