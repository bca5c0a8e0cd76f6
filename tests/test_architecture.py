"""The layout's promises that import-linter cannot see."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

STATUS_WITHOUT_SANDBOX = """
import sys
from devicerunner.cli.main import main
rc = main(["status", "--config", sys.argv[1]])
heavy = sorted(m for m in ("wasmtime",) if m in sys.modules)
print("HEAVY", ",".join(heavy))
"""


def test_status_does_not_load_the_sandbox_to_find_a_file(tmp_path: Path) -> None:
    cfg = tmp_path / "device.toml"
    cfg.write_text(
        '[device]\nid = "d1"\nstate_dir = "state"\n\n[apps.a]\npolicy = ["log"]\n', encoding="utf-8"
    )
    r = subprocess.run(
        [sys.executable, "-c", STATUS_WITHOUT_SANDBOX, str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert "HEAVY" in r.stdout, r.stderr
    assert r.stdout.strip().endswith("HEAVY"), r.stdout  # wasmtime was not imported


def test_the_simulator_plugs_into_the_cli_without_the_product_importing_it() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "devicerunner.cli.main", "sim", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 0 and "--scenario" in r.stdout, r.stderr
