"""Serial sensors on real byte streams: ptys, a TCP device, a Modbus RTU responder."""

from __future__ import annotations

import itertools
import math
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devicerunner.device import config
from devicerunner.device.daemon import Daemon
from devicerunner.device.hardware import build_hardware
from devicerunner.errors import ConfigError
from firmware_shims.base import RealClock, Sensor, Status
from firmware_shims.env import ShimEnv
from firmware_shims.serial_sensors import make_parser, nmea_checksum_ok
from tests.conftest import EXAMPLES, until
from tests.fakes import ModbusResponder, PtyDevice


@pytest.fixture
def env() -> Iterator[ShimEnv]:
    e = ShimEnv()
    yield e
    e.close()


def sensors_for(tables: dict[str, dict[str, object]], env: ShimEnv) -> dict[str, Sensor]:
    s, _ = build_hardware(tables, {}, RealClock(), env)
    return s


def nmea(body: str) -> bytes:
    cs = 0
    for ch in body.encode():
        cs ^= ch
    return f"${body}*{cs:02X}\r\n".encode()


def test_parsers_read_kv_csv_regex_and_nmea() -> None:
    assert make_parser("kv:t")("h=40 t=21.5") == 21.5
    assert make_parser("kv:t")("t:-3") == -3.0
    assert make_parser("kv:t")("x=1") is None
    assert make_parser("csv:2")("a, b, 7.25, d") == 7.25
    assert make_parser(r"regex:T=(?P<value>-?\d+\.\d+)C")("status T=19.75C ok") == 19.75
    line = nmea("YXMTW,17.3,C").decode().strip()
    assert nmea_checksum_ok(line) and make_parser("nmea:MTW:1")(line) == 17.3
    with pytest.raises(ValueError, match="checksum"):
        make_parser("nmea:MTW:1")(line[:-2] + "00")


def test_nmea_checksum_of_one_hex_digit_or_trailing_junk_is_refused() -> None:
    line = nmea("YXMTW,17.3,C").decode().strip()
    body, _ = line.split("*")
    assert nmea_checksum_ok(line)
    # A one-digit checksum equal to the XOR's value (pad the body until its XOR is < 16).
    for pad in range(256):
        b = f"{body},{pad}"
        x = 0
        for ch in b[1:].encode():
            x ^= ch
        if x < 16:
            break
    assert x < 16
    assert not nmea_checksum_ok(f"{b}*{x:X}")
    assert nmea_checksum_ok(f"{b}*{x:02X}")
    assert not nmea_checksum_ok(f"{line}Z")  # "*hhZ": three characters are not a checksum
    with pytest.raises(ValueError, match="checksum"):
        make_parser("nmea:MTW:1")(f"{b}*{x:X}")


def test_line_sensor_survives_garbage_split_lines_and_bad_checksums(tmp_path: Path, env: ShimEnv) -> None:
    dev = PtyDevice(tmp_path / "ttyTEMP")
    try:
        s = sensors_for(
            {
                "temp": {"driver": "serial", "port": str(dev.link), "parser": "kv:temp", "unit": "C"},
                "water": {"driver": "serial", "port": str(dev.link), "parser": "nmea:MTW:1"},
            },
            env,
        )
        assert until(lambda: s["temp"].read().status != Status.OFFLINE)
        dev.write(b"\x00\xff\xfe garbage without newline " * 40 + b"\n")  # over-long junk
        dev.write(b"tem")
        time.sleep(0.05)
        dev.write(b"p=21.5\r\n")  # a line split across two writes
        dev.write(b"temp=not-a-number\n")
        dev.write(nmea("YXMTW,17.3,C")[:-5] + b"00\r\n")  # bad checksum
        dev.write(nmea("YXMTW,18.1,C"))
        assert until(lambda: s["temp"].read().value == 21.5 and s["water"].read().value == 18.1)
        assert s["temp"].read().status == Status.OK
        assert s["temp"].malformed == 1 and s["water"].malformed == 1  # type: ignore[attr-defined]
    finally:
        dev.close()


def test_unplugged_port_goes_offline_and_values_flow_again_after_replug(tmp_path: Path, env: ShimEnv) -> None:
    dev = PtyDevice(tmp_path / "ttyUSB0")
    try:
        s = sensors_for(
            {
                "temp": {
                    "driver": "serial",
                    "port": str(dev.link),
                    "parser": "kv:t",
                    "reconnect_min_s": 0.05,
                    "reconnect_max_s": 0.2,
                }
            },
            env,
        )["temp"]
        assert until(lambda: s.read().status != Status.OFFLINE)
        dev.write(b"t=20.0\n")
        assert until(lambda: s.read().value == 20.0)
        dev.unplug()
        assert until(lambda: s.read().status == Status.OFFLINE)
        dev.plug()  # same path, a new device behind it
        assert until(lambda: s.read().status != Status.OFFLINE)
        dev.write(b"t=22.5\n")
        assert until(lambda: s.read().value == 22.5 and s.read().status == Status.OK)
    finally:
        dev.close()


def test_sensor_goes_stale_when_the_device_stops_sending(tmp_path: Path, env: ShimEnv) -> None:
    dev = PtyDevice(tmp_path / "tty1")
    try:
        s = sensors_for(
            {"t": {"driver": "serial", "port": str(dev.link), "parser": "kv:t", "max_age_ms": 200}}, env
        )["t"]
        assert until(lambda: s.read().status != Status.OFFLINE)
        dev.write(b"t=1\n")
        assert until(lambda: s.read().status == Status.OK)
        assert until(lambda: s.read().status == Status.STALE, 2)
        assert s.read().value == 1.0  # the last value is still there, marked stale
    finally:
        dev.close()


def test_host_sensor_read_does_not_wait_while_the_port_is_wedged(tmp_path: Path) -> None:
    """The device never answers; 2,000 reads through a Wasm app must not wait on it
    (a blocking read would cost the 500 ms port timeout each)."""
    import wasmtime

    from devicerunner.device.apps import App, AppSpec, DeviceResources, start_instance
    from devicerunner.sandbox.engine import Limits, Sandbox

    dev = PtyDevice(tmp_path / "wedged")
    env = ShimEnv()
    sb = Sandbox()
    try:
        sensors = sensors_for(
            {"t": {"driver": "serial", "port": str(dev.link), "parser": "kv:t", "timeout_ms": 500}}, env
        )
        reader = bytes(
            wasmtime.wat2wasm("""(module
          (import "sensors" "read" (func $read (param i32 i32) (result i32)))
          (memory (export "memory") 1)
          (func (export "dr_init") (result i32) (i32.const 0))
          (func (export "dr_tick") (result i32) (local $i i32)
            (loop $l
              (i32.store (i32.const 0) (call $read (i32.const 0) (i32.const 8)))
              (local.set $i (i32.add (local.get $i) (i32.const 1)))
              (br_if $l (i32.lt_u (local.get $i) (i32.const 2000))))
            (i32.const 0)))""")
        )
        spec = AppSpec("r", reader, frozenset({"sensors"}), Limits(tick_budget_ms=1000))
        app = App(spec, start_instance(sb, spec, DeviceResources(RealClock(), sensors), None))
        t0 = time.monotonic()
        assert app.tick().ok
        assert time.monotonic() - t0 < 2.0
        code = int.from_bytes(app.instance.ctx.memory.read(0, 4), "little", signed=True)
        assert code in (-4, -5)  # STALE or OFFLINE: answered at once, nothing waited
    finally:
        sb.close()
        env.close()
        dev.close()


def test_socket_url_device_feeds_a_sensor(env: ShimEnv) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def device() -> None:
        conn, _ = srv.accept()
        with conn:
            for i in range(50):  # bounded
                conn.sendall(f"{i},{20 + i / 10:.1f}\n".encode())
                time.sleep(0.02)

    t = threading.Thread(target=device, daemon=True)
    t.start()
    s = sensors_for(
        {"t": {"driver": "serial", "port": f"socket://127.0.0.1:{port}", "parser": "csv:1"}}, env
    )["t"]
    assert until(lambda: s.read().status == Status.OK and s.read().value >= 20.5)
    values, seq = s.samples_since(-1, 100)
    assert len(values) >= 5 and values == sorted(values) and seq >= len(values)
    t.join(5)
    srv.close()


def test_modbus_rtu_sensor_reads_registers_and_counts_bad_crcs(tmp_path: Path, env: ShimEnv) -> None:
    dev = ModbusResponder(
        tmp_path / "rs485", unit=7, registers={100: 215, 101: 0xFFF6, 200: 0x41A8, 201: 0x0000}
    )
    dev.corrupt_next = 2
    try:
        s = sensors_for(
            {
                "temp": {
                    "driver": "modbus",
                    "port": str(dev.link),
                    "unit_id": 7,
                    "register": 100,
                    "data_type": "s16",
                    "scale": 0.1,
                    "poll_ms": 50,
                },
                "delta": {
                    "driver": "modbus",
                    "port": str(dev.link),
                    "unit_id": 7,
                    "register": 101,
                    "data_type": "s16",
                    "poll_ms": 50,
                },
                "flow": {
                    "driver": "modbus",
                    "port": str(dev.link),
                    "unit_id": 7,
                    "register": 200,
                    "function": 4,
                    "data_type": "f32",
                    "poll_ms": 50,
                },
            },
            env,
        )
        assert until(lambda: all(x.read().status == Status.OK for x in s.values()))
        assert math.isclose(s["temp"].read().value, 21.5)
        assert s["delta"].read().value == -10.0
        assert s["flow"].read().value == 21.0
        assert sum(x.malformed for x in s.values()) == 2  # type: ignore[attr-defined]
    finally:
        dev.close()


def test_sensor_joining_a_port_that_is_already_open_is_online_at_once(tmp_path: Path, env: ShimEnv) -> None:
    # Each cell used to copy "online" only when the port (re)connected: a sensor
    # that joined a bus already open stayed OFFLINE until the next reconnect. The
    # whole-file run of the Modbus test hit it whenever ``import serial`` was already
    # done (by an earlier test) and the port thread opened before the 2nd sensor joined.
    dev = ModbusResponder(tmp_path / "rs485", unit=7, registers={100: 215, 101: 5})
    table = {"driver": "modbus", "port": str(dev.link), "unit_id": 7, "poll_ms": 20}
    try:
        first = sensors_for({"a": {**table, "register": 100}}, env)["a"]
        assert until(lambda: first.read().status == Status.OK)
        second = sensors_for({"b": {**table, "register": 101}}, env)["b"]
        assert until(lambda: second.read().status == Status.OK, 3), second.read()
        assert second.read().value == 5.0
    finally:
        dev.close()


def test_modbus_word_order_little_reads_the_low_word_first(tmp_path: Path, env: ShimEnv) -> None:
    dev = ModbusResponder(
        tmp_path / "rs485", unit=7, registers={200: 0x0000, 201: 0x41A8, 300: 0x0001, 301: 0x0002}
    )
    table = {"driver": "modbus", "port": str(dev.link), "unit_id": 7, "poll_ms": 20}
    try:
        s = sensors_for(
            {
                "flow": {**table, "register": 200, "data_type": "f32", "word_order": "little"},
                "count": {**table, "register": 300, "data_type": "u32", "word_order": "little"},
                "count_be": {**table, "register": 300, "data_type": "u32"},
            },
            env,
        )
        assert until(lambda: all(x.read().status == Status.OK for x in s.values()))
        assert s["flow"].read().value == 21.0
        assert s["count"].read().value == 0x00020001
        assert s["count_be"].read().value == 0x00010002
    finally:
        dev.close()


def test_modbus_exception_reply_does_not_wait_out_the_read_timeout(tmp_path: Path, env: ShimEnv) -> None:
    # An exception reply is 5 bytes; reading the 7 of a normal reply waited the whole
    # 1.5 s timeout for every poll, stalling every other sensor on the bus.
    dev = ModbusResponder(tmp_path / "rs485", unit=7, registers={})
    dev.exceptions[100] = 2  # illegal data address
    table = {"driver": "modbus", "port": str(dev.link), "unit_id": 7, "register": 100}
    try:
        s = sensors_for({"x": {**table, "poll_ms": 20, "timeout_ms": 1500}}, env)["x"]
        t0 = time.monotonic()
        assert until(lambda: s.malformed >= 5, 5)  # type: ignore[attr-defined]
        assert time.monotonic() - t0 < 1.5
    finally:
        dev.close()


def test_modbus_polls_on_one_bus_keep_the_t35_silent_interval(tmp_path: Path, env: ShimEnv) -> None:
    dev = ModbusResponder(tmp_path / "rs485", unit=7, registers={1: 1, 2: 2, 3: 3})
    table = {"driver": "modbus", "port": str(dev.link), "unit_id": 7, "poll_ms": 50, "baudrate": 9600}
    try:
        sensors_for({f"r{i}": {**table, "register": i} for i in (1, 2, 3)}, env)
        assert until(lambda: dev.requests >= 12)
        events = list(dev.timeline)
        gaps = [b[1] - a[1] for a, b in itertools.pairwise(events) if a[0] == "reply" and b[0] == "request"]
        t35 = 3.5 * 11 / 9600  # 4.0 ms
        assert len(gaps) >= 10 and min(gaps) >= t35, [round(g * 1000, 2) for g in gaps]
    finally:
        dev.close()


def test_modbus_bus_unplugged_mid_poll_goes_offline_without_killing_its_thread(
    tmp_path: Path, env: ShimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A poll that starts on an unplugged pty fails its tcflush with termios.error,
    # which is not an OSError: it used to kill the port's thread for good.
    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda a: died.append(a.exc_value))
    dev = ModbusResponder(tmp_path / "rs485", unit=7, registers={100: 215})
    table = {
        "driver": "modbus",
        "port": str(dev.link),
        "unit_id": 7,
        "register": 100,
        "poll_ms": 20,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.2,
    }
    try:
        s = sensors_for({"temp": table}, env)["temp"]
        gate = threading.Event()
        gate.set()
        s.port.pollers.insert(0, lambda _p: gate.wait(5))  # type: ignore[attr-defined]
        assert until(lambda: s.read().status == Status.OK)
        for _ in range(3):
            gate.clear()  # the next poll cycle stops here, before the sensor's own poll
            time.sleep(0.1)
            dev.unplug()
            time.sleep(0.1)  # the kernel hangs the pty up asynchronously
            gate.set()  # ... and the poll goes on against a dead pty
            assert until(lambda: s.read().status == Status.OFFLINE)
            dev.plug()
            dev.restart()
            assert until(lambda: s.read().status == Status.OK), s.read()
        assert died == []
    finally:
        gate.set()
        dev.close()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"driver": "serial", "parser": "kv:t"}, "sensors.x.port: is required"),
        ({"driver": "serial", "port": "/dev/null", "parser": "json:t"}, "sensors.x.parser: unknown parser"),
        (
            {"driver": "serial", "port": "/dev/null", "parser": "regex:(unclosed"},
            "sensors.x.parser: bad regex",
        ),
        ({"driver": "serial", "port": "/dev/null", "parser": "regex:\\d+"}, "sensors.x.parser: regex needs"),
        ({"driver": "serial", "port": "/dev/null"}, "sensors.x.parser: is required"),
        ({"driver": "modbus", "port": "/dev/null", "function": 6}, "sensors.x.function: must be 3"),
        # ``o.integer(...) or 3`` used to turn an explicit 0 into function 3, silently
        ({"driver": "modbus", "port": "/dev/null", "function": 0}, "sensors.x.function: must be 3"),
        (
            {"driver": "modbus", "port": "/dev/null", "word_order": "middle"},
            "sensors.x.word_order: must be one of big, little",
        ),
        (
            {
                "driver": "serial",
                "port": "/dev/null",
                "parser": "kv:t",
                "reconnect_min_s": 5,
                "reconnect_max_s": 1,
            },
            "sensors.x.reconnect_max_s: must be >= reconnect_min_s",
        ),
        (
            {"driver": "serial", "port": "/dev/null", "parser": "kv:t", "baud": 9600},
            "sensors.x.baud: unknown option",
        ),
    ],
)
def test_serial_config_errors_name_the_sensor_and_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_hardware({"x": table}, {}, RealClock(), ShimEnv())
    assert str(e.value).startswith(message)


def test_thermostat_runs_unchanged_on_a_serial_temperature_sensor(tmp_path: Path) -> None:
    dev = PtyDevice(tmp_path / "ttyTHERMO")
    cfg_path = tmp_path / "device.toml"
    cfg_path.write_text(f"""
[device]
id = "serial-dev"
state_dir = "state"
[apps.thermostat]
module = "{EXAMPLES / "thermostat.wasm"}"
policy = ["log", "clock", "sensors", "actuators", "kv", "telemetry", "wasi", "messages", "config"]
tick_interval_ms = 20
[sensors.temp]
driver = "serial"
port = "{dev.link}"
parser = "kv:temp"
unit = "C"
[actuators.fan]
driver = "sim"
""")
    d = Daemon(config.load(cfg_path))
    d.start()
    try:
        fan = d.resources.actuators["fan"]
        for _ in range(100):  # bounded: a hot room
            dev.write(b"temp=30.0\n")
            if fan.value == 1.0:
                break
            time.sleep(0.02)
        assert fan.value == 1.0
        for _ in range(100):  # then it cools down
            dev.write(b"temp=15.0\n")
            if fan.value == 0.0:
                break
            time.sleep(0.02)
        assert fan.value == 0.0
        assert d.scheduler.apps["thermostat"].counters.traps == 0
    finally:
        d.stop()
        dev.close()


def test_modbus_sensor_on_a_loop_url_sees_only_its_own_echo_and_never_a_value(env: ShimEnv) -> None:
    """pyserial's loop:// echoes what is written: the poller reads back its own request,
    which must fail the response checks (counted malformed), never become a value."""
    s = sensors_for(
        {"p": {"driver": "modbus", "port": "loop://", "unit_id": 3, "register": 0, "poll_ms": 20}}, env
    )["p"]
    assert until(lambda: s.malformed >= 3)  # type: ignore[attr-defined]
    assert s.read().status == Status.STALE and math.isnan(s.read().value)
