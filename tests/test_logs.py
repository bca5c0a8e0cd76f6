"""Logs cannot be forged or flooded: app text is escaped in every log format,
repeated failures are rate-limited with a count of what was suppressed."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from devicerunner.sandbox.engine import Sandbox
from hostfuncs.logsafe import LogLimiter, escape_controls
from tests.conftest import LogCapture, make_app, wat

FORGED = "reading ok\n12:00:00 ERROR   devicerunner.updater: root key compromised\r\x1b[2K\x1b[31mALERT\x9b0m\u2028x\x00"


def _logging_app(text: str) -> bytes:
    data = text.encode("utf-8")
    escaped = "".join(f"\\{b:02x}" for b in data)
    return wat(f"""(module
      (import "log" "write" (func $log (param i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 0) "{escaped}")
      (func (export "dr_init") (result i32) (i32.const 0))
      (func (export "dr_tick") (result i32)
        (drop (call $log (i32.const 1) (i32.const 0) (i32.const {len(data)}))) (i32.const 0)))""")


def test_forged_log_line_from_an_app_stays_one_escaped_line(sandbox: Sandbox, logs: LogCapture) -> None:
    app = make_app(sandbox, _logging_app(FORGED), logs=logs)
    assert app.tick().ok
    (msg,) = logs.messages()
    assert len(msg.splitlines()) == 1
    assert "\x1b" not in msg and "\x9b" not in msg and "\r" not in msg and "\x00" not in msg
    assert "\\n12:00:00 ERROR" in msg and "\\x1b[31mALERT" in msg and "\\x9b0m" in msg and "\\u2028" in msg


def test_escape_controls_keeps_printable_text_and_escapes_every_control() -> None:
    assert escape_controls("Température 21.5 °C, path C:\\x") == "Température 21.5 °C, path C:\\x"
    for code in [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029, 0x202E, 0x2066]:
        out = escape_controls(f"a{chr(code)}b")
        assert out.startswith("a\\") and out.endswith("b") and out.isprintable(), (hex(code), out)
        assert len(out.splitlines()) == 1


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_repeated_failure_is_logged_once_per_interval_with_the_suppressed_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    limiter = LogLimiter(logging.getLogger("t.limiter"), 10.0, clock=clock)
    with caplog.at_level(logging.WARNING, "t.limiter"):
        for i in range(1000):  # 1,000 identical failures in 1 s
            clock.t = i / 1000
            limiter.log(logging.WARNING, "flush", "kv flush failed: %s", "read-only")
        clock.t = 10.5
        limiter.log(logging.WARNING, "flush", "kv flush failed: %s", "read-only")
        limiter.log(logging.WARNING, "other", "another failure")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == [
        "kv flush failed: read-only",
        "kv flush failed: read-only (999 similar suppressed in the last 10 s)",
        "another failure",
    ]
    assert limiter.suppressed_total == 999


def test_log_limiter_keys_are_bounded() -> None:
    clock = FakeClock()
    limiter = LogLimiter(logging.getLogger("t.bounded"), 10.0, max_keys=8, clock=clock)
    for i in range(10_000):
        limiter.log(logging.DEBUG, ("app", i), "x")
    limiter.log(logging.DEBUG, ("app", 0), "x")  # forgotten (oldest): logged again
    assert limiter.suppressed_total == 0


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_forged_text_in_a_daemon_message_stays_one_line_in_both_log_formats(fmt: str) -> None:
    # App-supplied text also reaches daemon messages (trap texts, dr_init errors,
    # manifest fields in update events): the formatter is the last line of defence.
    import io
    import json

    from devicerunner.device import logfmt

    stream = io.StringIO()
    logfmt.setup(logging.INFO, fmt)
    handler = logging.getLogger().handlers[0]
    handler.setStream(stream)  # type: ignore[attr-defined]
    try:
        logging.getLogger("devicerunner.test").warning("app %s: %s", "x", FORGED)
    finally:
        logging.getLogger().handlers.clear()
    out = stream.getvalue()
    assert out.count("\n") == 1 and len(out.splitlines()) == 1, out
    assert not any(c in out for c in "\x1b\x9b\r\x00\u2028")
    if fmt == "json":
        assert json.loads(out)["msg"] == f"app x: {FORGED}"  # escaped, not altered
    else:
        assert "\\n12:00:00 ERROR" in out and "\\x1b[31m" in out


def test_trap_storm_is_counted_every_tick_but_logged_once_with_the_suppressed_count(
    sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    trapping = wat("""(module (memory (export "memory") 1)
      (func (export "dr_init") (result i32) (i32.const 0))
      (func (export "dr_tick") (result i32) unreachable))""")
    app = make_app(sandbox, trapping, name="storm")
    with caplog.at_level(logging.WARNING, "devicerunner.device.apps"):
        for _ in range(1000):  # 1,000 traps: was 1,000 WARNING lines
            app.tick()
    lines = [r for r in caplog.records if r.name == "devicerunner.device.apps"]
    assert app.counters.traps == 1000
    assert len(lines) == 1 and "unreachable" in lines[0].getMessage()
    assert app.failure_log.suppressed_total == 999


def test_unwritable_state_dir_gives_a_bounded_number_of_log_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As on a read-only state dir (root ignores permissions, so the failures are
    made real another way): every kv flush fails (the store's directory is a
    file) and a refused inbox bundle can be neither removed nor set aside. The
    kv error was logged 4x/s and the inbox refusal every 0.25 s; now a handful
    of lines in 3 s, while the work keeps being retried with backoff."""
    import dataclasses
    import time

    from devicerunner.device.daemon import Daemon
    from tests.conftest import until
    from tests.devicekit import Events, Kit

    kit = Kit(tmp_path / "dev")
    cfg = dataclasses.replace(kit.cfg, kv_flush_interval_s=0.1)
    inbox = kit.state_dir / "inbox"
    inbox.mkdir(parents=True)
    (inbox / "failed").write_bytes(b"")
    (inbox / "0001-garbage.bundle").write_bytes(b"not a bundle")
    d = Daemon(cfg)
    ev = Events(d)
    with caplog.at_level(logging.INFO, "devicerunner"):
        d.start()
        try:
            kv_dir = kit.state_dir / "apps" / "app" / "kv"
            assert until(lambda: (kv_dir / "data.json").exists())  # one flush worked
            (kv_dir / "data.json").unlink()
            kv_dir.rmdir()
            kv_dir.write_bytes(b"")  # from now on every flush fails
            t0 = time.monotonic()
            caplog.clear()
            time.sleep(3.0)  # a window to count log lines in (the app writes kv every tick)
            assert d.kv_flusher.failures >= 2  # still retrying, backing off
        finally:
            d.stop()
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING and r.created >= t0]
    assert any("kv flush failed" in r.getMessage() for r in lines)
    assert len(lines) <= 4, [r.getMessage() for r in lines]
    assert len([e for e in ev.items if e["phase"] == "REJECTED"]) == 1
