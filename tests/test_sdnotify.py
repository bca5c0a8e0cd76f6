"""The daemon speaks systemd's notify protocol when run as a Type=notify service."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.devicekit import Kit


def test_daemon_sends_ready_watchdog_and_stopping_to_systemd(tmp_path: Path) -> None:
    kit = Kit(tmp_path / "dev")
    sock_path = str(tmp_path / "notify.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(sock_path)
    srv.settimeout(10)
    env = dict(os.environ, NOTIFY_SOCKET=sock_path, WATCHDOG_USEC="200000")
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devicerunner.cli.main",
            "run",
            "--config",
            str(kit.config_path),
            "--for",
            "1.5",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    got: list[str] = []
    try:
        while not any("STOPPING=1" in g for g in got):
            got.append(srv.recv(4096).decode())
    finally:
        p.wait(20)
        srv.close()
    assert got[0].startswith("READY=1")
    assert sum("WATCHDOG=1" in g for g in got) >= 3  # every 0.1 s for 1.5 s, while ticking
    assert p.returncode == 0
