"""Shared test helpers: real wasmtime on inline WAT, real files, real clocks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import wasmtime

from devicerunner.device.apps import App, AppSpec, DeviceResources, start_instance
from devicerunner.sandbox.engine import Limits, Sandbox
from firmware_shims.base import Clock, RealClock

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "apps"
ALL_CAPS = frozenset(
    {"log", "clock", "sensors", "actuators", "kv", "telemetry", "wasi", "messages", "config"}
)


def wat(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


class LogCapture:
    def __init__(self) -> None:
        self.lines: list[tuple[str, int, str]] = []

    def __call__(self, app: str, level: int, msg: str) -> None:
        self.lines.append((app, level, msg))

    def messages(self, app: str | None = None) -> list[str]:
        return [m for a, _, m in self.lines if app is None or a == app]


@pytest.fixture(params=["stock", "fast"])
def sandbox(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sandbox]:
    """Every sandbox test runs on both call paths: they must behave the same."""
    sb = Sandbox(cache_dir=tmp_path / "cache", path=request.param)
    yield sb
    sb.close()


@pytest.fixture
def logs() -> LogCapture:
    return LogCapture()


def make_app(
    sandbox: Sandbox,
    module: bytes,
    *,
    name: str = "app",
    grant: frozenset[str] = ALL_CAPS,
    res: DeviceResources | None = None,
    clock: Clock | None = None,
    logs: LogCapture | None = None,
    kv: object | None = None,
    limits: Limits | None = None,
    interval_ms: int = 100,
) -> App:
    res = res or DeviceResources(clock or RealClock(), log_sink=logs)
    spec = AppSpec(name, module, grant, limits or Limits(), tick_interval_ms=interval_ms)
    return App(spec, start_instance(sandbox, spec, res, kv))  # type: ignore[arg-type]


def until(pred: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Bounded wait for a condition the code under test makes true by itself."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def run_cli(*args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devicerunner.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or ROOT,
    )


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs: a disk that fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
