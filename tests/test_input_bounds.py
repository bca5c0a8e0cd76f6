"""Every structure that holds what someone else sent has a bound and a counter
(docs/threat-model.md): the refusal memory, the lane's mailbox, log lines."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from devicerunner.runtime.ratelimit import RateLimitedLog
from devicerunner.transport.mailbox import Mailbox
from devicerunner.update.rejections import Rejections, digest


def test_refusal_memory_is_bounded_and_says_a_repeat_once() -> None:
    r = Rejections(max_entries=8)
    kw = {"app": "app", "sequence": 3, "text": "t", "source": "mqtt", "now": 1.0}
    assert r.note(digest(b"a"), reason="expired", **kw) is True
    assert r.note(digest(b"a"), reason="expired", **kw) is False  # said already
    assert r.note(digest(b"a"), reason="wrong_target", **kw) is True  # a new reason is news
    for i in range(100):  # a flood of distinct documents
        r.note(digest(str(i).encode()), reason="malformed", **kw)
    assert r.stats()["remembered"] == 8 and r.stats()["evicted"] == 93
    assert len(r.recent(20)) == 8


def test_log_lines_about_refused_input_are_rate_limited_with_a_suppressed_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lim = RateLimitedLog(logging.getLogger("test.ratelimit"), rate_per_s=1.0, burst=3)
    with caplog.at_level(logging.WARNING, "test.ratelimit"):
        let_through = [lim.log(logging.WARNING, 100.0, "refused %d", i) for i in range(50)]
        assert let_through.count(True) == 3
        assert lim.log(logging.WARNING, 102.0, "refused %d", 50)  # tokens came back with time
    assert len(caplog.records) == 4
    assert caplog.records[-1].getMessage() == "refused 50 (47 similar line(s) suppressed)"


def test_mailbox_keeps_only_the_newest_per_topic_and_bounds_the_topics() -> None:
    posted: list[Callable[[], None]] = []
    handled: list[tuple[str, bytes]] = []
    box = Mailbox(posted.append, lambda k, p: handled.append((k, p)), max_keys=3)
    for i in range(1000):  # a flood on one topic while the lane is busy
        box.put("releases/app/stable", b"%d" % i)
    assert box.put("rollouts/app/stable", b"r")
    assert box.put("trust/root", b"t")
    assert not box.put("trust/roots/9", b"x")  # a fourth topic: dropped, counted
    assert len(posted) == 1  # one task on the lane, however many messages
    posted.pop()()
    assert handled == [("releases/app/stable", b"999"), ("rollouts/app/stable", b"r"), ("trust/root", b"t")]
    st = box.stats()
    assert (st["replaced"], st["dropped"], st["peak_waiting"], st["waiting"]) == (999, 1, 3, 0)


def test_mailbox_survives_a_handler_that_raises() -> None:
    posted: list[Callable[[], None]] = []

    def handle(_k: str, p: bytes) -> None:
        if p == b"bad":
            raise ValueError("boom")

    box = Mailbox(posted.append, handle)
    box.put("a", b"bad")
    posted.pop()()
    box.put("a", b"good")  # still scheduled afresh
    assert len(posted) == 1
