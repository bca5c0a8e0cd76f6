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


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 60_000,
        b'{"signed": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b', "signatures": []}',
    ],
    ids=["bracket-flood", "nested-objects"],
)
def test_deeply_nested_document_is_refused_before_the_json_decoder_recurses(
    payload: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A document nested thousands deep made json.loads recurse to Python's
    limit; code that ran at that depth (a finalizer the garbage collector
    called) failed with RecursionError of its own. Depth is judged first."""
    import json

    from devicerunner.errors import MalformedError
    from devicerunner.transport import reports
    from devicerunner.trust.manifest import parse_envelope

    decoded: list[object] = []
    real = json.loads
    monkeypatch.setattr(json, "loads", lambda s: decoded.append(s) or real(s))
    with pytest.raises(MalformedError, match="nested deeper than 32"):
        parse_envelope(payload, 1 << 20, "manifest")
    with pytest.raises(reports.MalformedReport, match="nested deeper than 32"):
        reports.read_status("dev-1", payload)
    assert decoded == []  # refused before the decoder ran


def test_brackets_inside_strings_are_not_nesting() -> None:
    import json

    from devicerunner.runtime.strict import too_deep
    from devicerunner.trust.manifest import parse_envelope

    # escaped quotes and backslashes inside strings must not end them early
    x = "[{" * 5000 + '\\"[' + "\\"
    text = json.dumps({"signed": {"x": x, "y": '"{'}, "signatures": []}).encode()
    assert not too_deep(text, 32)
    assert parse_envelope(text, 1 << 20, "manifest").signed["x"] == x
    assert too_deep(b"[" * 33, 32) and not too_deep(b"[" * 32 + b"]" * 32, 32)
