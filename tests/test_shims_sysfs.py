"""sysfs drivers on a prepared tree, and the wiring diagnostics commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devicerunner.device.hardware import build_hardware
from devicerunner.errors import ConfigError
from firmware_shims.base import RealClock, Status
from firmware_shims.env import ShimEnv
from tests.conftest import run_cli, until


def make_tree(root: Path) -> Path:
    def put(rel: str, text: str) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + "\n")

    put("class/thermal/thermal_zone0/type", "acpitz")
    put("class/thermal/thermal_zone0/temp", "41500")
    put("class/thermal/thermal_zone1/type", "x86_pkg_temp")
    put("class/thermal/thermal_zone1/temp", "55000")
    put("class/hwmon/hwmon0/name", "nct6775")
    put("class/hwmon/hwmon0/temp1_input", "38250")
    put("class/hwmon/hwmon0/fan1_input", "1200")
    put("class/hwmon/hwmon0/in0_input", "3312")
    put("bus/iio/devices/iio:device0/name", "ads1015")
    put("bus/iio/devices/iio:device0/in_voltage0_raw", "1000")
    put("bus/iio/devices/iio:device0/in_voltage_scale", "0.125")
    put("bus/iio/devices/iio:device0/in_voltage0_offset", "24")
    put("class/leds/led0/brightness", "0")
    put("class/leds/led0/max_brightness", "1")
    put("class/backlight/panel/brightness", "10")
    put("class/backlight/panel/max_brightness", "100")
    return root


SENSORS = {
    "cpu": {"driver": "thermal", "zone": "x86_pkg_temp", "poll_ms": 50},
    "board": {"driver": "thermal", "zone": 0, "poll_ms": 50},
    "chip": {"driver": "hwmon", "chip": "nct6775", "input": "temp1_input", "poll_ms": 50},
    "fan_rpm": {"driver": "hwmon", "chip": "hwmon0", "input": "fan1_input", "poll_ms": 50},
    "rail": {"driver": "hwmon", "chip": "nct6775", "input": "in0_input", "poll_ms": 50},
    "adc": {"driver": "iio", "device": "ads1015", "channel": "in_voltage0", "poll_ms": 50},
}


def test_sysfs_sensors_read_thermal_hwmon_and_iio_with_units(tmp_path: Path) -> None:
    env = ShimEnv(sysfs_root=make_tree(tmp_path / "sys"))
    try:
        s, _ = build_hardware(SENSORS, {}, RealClock(), env)
        assert until(lambda: all(x.read().status == Status.OK for x in s.values()))
        got = {n: x.read().value for n, x in s.items()}
        assert got == pytest.approx(
            {
                "cpu": 55.0,
                "board": 41.5,
                "chip": 38.25,
                "fan_rpm": 1200.0,
                "rail": 3.312,
                "adc": (1000 + 24) * 0.125,
            }
        )
        assert s["fan_rpm"].unit == "RPM" and s["rail"].unit == "V"
        (tmp_path / "sys/class/thermal/thermal_zone1/temp").write_text("60000\n")  # the poller picks it up
        assert until(lambda: s["cpu"].read().value == 60.0)
        (tmp_path / "sys/class/thermal/thermal_zone1/temp").unlink()  # the sensor disappears
        assert until(lambda: s["cpu"].read().status == Status.OFFLINE)
    finally:
        env.close()


def test_led_and_backlight_actuators_write_brightness(tmp_path: Path) -> None:
    env = ShimEnv(sysfs_root=make_tree(tmp_path / "sys"))
    try:
        _, a = build_hardware(
            {},
            {
                "led": {"driver": "led", "device": "led0"},
                "screen": {"driver": "backlight", "device": "panel"},
            },
            RealClock(),
            env,
        )
        assert a["led"].set(1.0) == Status.OK
        assert a["screen"].set(0.5) == Status.OK  # fractions scale to max_brightness
        assert until(lambda: (tmp_path / "sys/class/leds/led0/brightness").read_text().strip() == "1")
        assert until(lambda: (tmp_path / "sys/class/backlight/panel/brightness").read_text().strip() == "50")
        a["led"].set(7)  # clamped to max_brightness
        assert until(lambda: (tmp_path / "sys/class/leds/led0/brightness").read_text().strip() == "1")
    finally:
        env.close()


@pytest.mark.parametrize(
    ("sensors", "actuators", "message"),
    [
        (
            {"x": {"driver": "hwmon", "chip": "nope", "input": "temp1_input"}},
            {},
            "sensors.x.chip: no hwmon named",
        ),
        ({"x": {"driver": "hwmon", "chip": "nct6775", "input": "volts"}}, {}, "sensors.x.input:"),
        ({"x": {"driver": "thermal", "zone": 9}}, {}, "sensors.x.driver: "),
        ({}, {"x": {"driver": "led", "device": "led9"}}, "actuators.x.device:"),
        ({}, {"x": {"driver": "gpio", "line": 17}}, "actuators.x.driver: the gpio driver needs libgpiod"),
        ({"x": {"driver": "bluetooth"}}, {}, "sensors.x.driver: unknown driver 'bluetooth'"),
    ],
)
def test_sysfs_and_gpio_config_errors_name_the_key(
    tmp_path: Path, sensors: dict, actuators: dict, message: str
) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as e:
        build_hardware(sensors, actuators, RealClock(), ShimEnv(sysfs_root=make_tree(tmp_path / "sys")))
    assert str(e.value).startswith(message)


def test_sensors_list_and_read_diagnostics(tmp_path: Path) -> None:
    make_tree(tmp_path / "sys")
    cfg = tmp_path / "device.toml"
    cfg.write_text(
        '[device]\nid = "d"\nsysfs_root = "sys"\n'
        '[sensors.cpu]\ndriver = "thermal"\nzone = "x86_pkg_temp"\npoll_ms = 50\n'
        '[sensors.sim]\ndriver = "sim"\nwaveform = "constant"\nbase = 3\n'
    )
    r = run_cli("sensors", "list", "--config", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    rows = {x["name"]: x for x in json.loads(r.stdout)}
    assert rows["cpu"]["value"] == 55.0 and rows["cpu"]["status"] == "ok" and rows["cpu"]["driver"] == "sysfs"
    assert rows["sim"]["value"] == 3.0
    text = run_cli("sensors", "list", "--config", str(cfg))
    assert "cpu" in text.stdout and "55 C" in text.stdout
    w = run_cli(
        "sensors", "read", "cpu", "--config", str(cfg), "--watch", "--count", "3", "--interval", "0.05"
    )
    assert w.returncode == 0 and w.stdout.count("cpu: 55 C (ok") == 3
    bad = run_cli("sensors", "read", "nope", "--config", str(cfg))
    assert bad.returncode == 2 and "no such sensor" in bad.stderr
