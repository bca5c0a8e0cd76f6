"""Ctrl-C as an operator presses it: a real SIGINT to the process group of a
real `devicerunner` process."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from devicerunner.transport import operator, topics
from devicerunner.transport.settings import parse_url
from devicerunner.trust import manifest
from tests.brokers import Mosquitto
from tests.conftest import ROOT
from tests.devicekit import Kit, counter_module
from tests.test_operator_views import _good_status, _write_key

P = "dr/v1"


class Cli:
    """`devicerunner ARGS` in its own process group, stdout read line by line."""

    def __init__(self, *args: str) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-m", "devicerunner.cli.main", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                break
            self.out.append(line)
            if text in line:
                return
        self.p.kill()
        raise AssertionError(f"no {text!r} within {timeout_s} s: {''.join(self.out)}")

    def ctrl_c(self, timeout_s: float = 90) -> tuple[int, str, str]:
        os.killpg(self.p.pid, signal.SIGINT)  # what a terminal does: the whole group
        try:
            rc = self.p.wait(timeout_s)
        finally:
            if self.p.poll() is None:
                os.killpg(self.p.pid, signal.SIGKILL)
        assert self.p.stderr is not None
        err = self.p.stderr.read()
        while not self.lines.empty():
            self.out.append(self.lines.get())
        return rc, "".join(self.out), err


def test_ctrl_c_in_sim_stops_the_workers_quietly_and_writes_the_partial_report(tmp_path: Path) -> None:
    """It printed two KeyboardInterrupt tracebacks from worker processes and
    `devicerunner: : Connection reset by peer`, exit 1, no report."""
    cli = Cli("sim", "--devices", "4", "--scenario", "happy", "--report", str(tmp_path / "rep"))
    cli.wait_for("scenario happy:", 120)
    time.sleep(1.0)  # mid-rollout
    rc, out, err = cli.ctrl_c()
    assert rc == 130, out + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "Connection reset" not in err and "devicerunner:" not in err, err
    assert "interrupted (Ctrl-C)" in out and "partial report:" in out, out
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["scenarios"][0]["name"] == "happy"
    assert (tmp_path / "rep" / "report.html").exists()


def test_ctrl_c_in_rollout_says_where_the_rollout_stands_and_how_to_go_on(tmp_path: Path) -> None:
    """It exited 130 without saying at what percent the retained rollout document was left."""
    b = Mosquitto(tmp_path / "mosq").start()
    try:
        kit = Kit(tmp_path / "dev")
        bundle = tmp_path / "b.bundle"
        bundle.write_bytes(kit.bundle(counter_module(2), 1, rollout_percent=0))
        key = tmp_path / "ro.key"
        _write_key(key)
        with operator.Session(parse_url(b.url)) as sess:  # a device that will not answer in time
            sess.publish_many([(topics.status(P, "slow"), _good_status("slow", online=True))], retain=True)
        cli = Cli(
            "rollout",
            str(bundle),
            "--broker",
            b.url,
            "--key",
            str(key),
            "--steps",
            "100",
            "--step-wait",
            "60",
        )
        cli.wait_for("step 100%", 60)
        rc, out, err = cli.ctrl_c()
        assert rc == 130, out + err
        assert "Traceback" not in err, err
        assert "interrupted at the 100% step: the rollout document stays at 100% (not paused" in err, err
        assert "0 of 1 eligible committed, 1 pending" in err
        halt = next(line.split("halt:", 1)[1].split() for line in err.splitlines() if "halt:" in line)
        assert "continue:" in err and halt[:2] == ["devicerunner", "rollout"] and "--pause" in halt
        r = subprocess.run(
            [sys.executable, "-m", "devicerunner.cli.main", *halt[1:]],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        with operator.Session(parse_url(b.url)) as sess:
            held = sess.collect([topics.rollout(P, "app", "stable")])
        doc = manifest.parse_rollout(held[topics.rollout(P, "app", "stable")])
        assert doc.paused and doc.percent == 100
    finally:
        b.stop()
