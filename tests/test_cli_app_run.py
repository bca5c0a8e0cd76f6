"""``devicerunner app run`` as an app author uses it: exit codes and summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, run_cli


def test_thermostat_runs_100_ticks_with_a_json_summary() -> None:
    r = run_cli("app", "run", str(EXAMPLES / "thermostat.wasm"), "--ticks", "100", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["ticks"] == 100 and s["traps"] == 0 and s["overruns"] == 0
    assert s["tick_p50_us"] > 0 and s["tick_p99_us"] >= s["tick_p50_us"]
    assert "thermostat: setpoint 22.0 C" in r.stderr  # printf through WASI
    assert "telemetry climate" in r.stderr


def test_thermostat_fan_follows_temperature() -> None:
    hot = run_cli(
        "app",
        "run",
        str(EXAMPLES / "thermostat.wasm"),
        "--sensor",
        "temp=30",
        "--actuator",
        "fan=0",
        "--ticks",
        "3",
        "--json",
    )
    cold = run_cli(
        "app",
        "run",
        str(EXAMPLES / "thermostat.wasm"),
        "--sensor",
        "temp=15",
        "--actuator",
        "fan=0",
        "--ticks",
        "3",
        "--json",
    )
    assert json.loads(hot.stdout)["actuators"]["fan"] == 1.0
    assert json.loads(cold.stdout)["actuators"]["fan"] == 0.0


def test_offline_sensor_makes_thermostat_fail_safe() -> None:
    r = run_cli(
        "app",
        "run",
        str(EXAMPLES / "thermostat.wasm"),
        "--sensor",
        "temp=constant:base=15,fault=offline",
        "--actuator",
        "fan=0",
        "--ticks",
        "60",
        "--json",
    )
    s = json.loads(r.stdout)
    assert s["actuators"]["fan"] == 1.0  # no reading: run the fan
    assert s["health_failures"] >= 1  # and report unhealthy after 50 bad reads


def test_ungranted_import_exits_2_with_the_reason() -> None:
    r = run_cli("app", "run", str(EXAMPLES / "thermostat.wasm"), "--grant", "log,clock")
    assert r.returncode == 2
    assert "sensors.find: needs capability 'sensors'" in r.stderr
    assert "Traceback" not in r.stderr


def test_trapping_module_exits_3(tmp_path: Path) -> None:
    mod = tmp_path / "trap.wat"
    mod.write_text("""(module (memory (export "memory") 1)
      (func (export "dr_init") (result i32) (i32.const 0))
      (func (export "dr_tick") (result i32) unreachable))""")
    r = run_cli("app", "run", str(mod), "--ticks", "5", "--json")
    assert r.returncode == 3
    assert json.loads(r.stdout)["traps"] == 5


def test_init_failure_exits_2(tmp_path: Path) -> None:
    mod = tmp_path / "noinit.wat"
    mod.write_text("""(module (memory (export "memory") 1)
      (func (export "dr_init") (result i32) (i32.const 5))
      (func (export "dr_tick") (result i32) (i32.const 0)))""")
    r = run_cli("app", "run", str(mod))
    assert r.returncode == 2
    assert "dr_init failed: dr_init returned 5" in r.stderr


def test_missing_module_file_is_a_clear_error(tmp_path: Path) -> None:
    r = run_cli("app", "run", str(tmp_path / "nope.wasm"))
    assert r.returncode == 2
    assert "cannot read" in r.stderr and "Traceback" not in r.stderr


def test_failing_health_check_is_not_reported_as_a_clean_run(tmp_path: Path) -> None:
    """An app whose dr_health fails would fail its trial on a device: app run says
    so in its text summary and exits 3, not "0 errors" and 0."""
    mod = tmp_path / "sick.wat"
    mod.write_text("""(module (memory (export "memory") 1)
      (func (export "dr_init") (result i32) (i32.const 0))
      (func (export "dr_tick") (result i32) (i32.const 0))
      (func (export "dr_health") (result i32) (i32.const 1)))""")
    r = run_cli("app", "run", str(mod), "--ticks", "20", "--quiet")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "health checks failed" in r.stdout
    n = int(r.stdout.split(" of ")[0].rsplit(", ", 1)[-1])
    assert n >= 1


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--interval-ms", "0", "--interval-ms: must be between 1 and"),  # was a ZeroDivisionError traceback
        ("--budget-ms", "nan", "--budget-ms: must be a finite number"),
        ("--budget-ms", "inf", "--budget-ms: must be a finite number"),
        ("--memory-limit", "-1", "--memory-limit: must be between 65536"),  # -1 removed the limit
        ("--kv-quota", "-5", "--kv-quota: must be between 0"),
        ("--ticks", "x", "--ticks: not an integer"),
    ],
)
def test_bad_app_run_numbers_are_usage_errors_not_tracebacks(flag: str, value: str, message: str) -> None:
    r = run_cli("app", "run", str(EXAMPLES / "thermostat.wasm"), "--ticks", "3", flag, value)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
