"""Cost of a host ``sensors.read`` on a serial sensor next to a simulated one.

Two levels: the driver's ``read()`` alone (what the host function does after
argument checks), and a whole Wasm tick that calls ``sensors.read`` once,
through the stock path. The serial sensor is fed by a pty at 100 lines/s
while it is read.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import wasmtime

from bench.common import Stat, measure
from devicerunner.device.apps import App, AppSpec, DeviceResources, start_instance
from devicerunner.device.hardware import build_hardware
from devicerunner.sandbox.engine import Limits, Sandbox
from firmware_shims.base import RealClock, Status
from firmware_shims.env import ShimEnv

ONE_READ = """(module
  (import "sensors" "read" (func $read (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "dr_init") (result i32) (i32.const 0))
  (func (export "dr_tick") (result i32) (drop (call $read (i32.const 0) (i32.const 8))) (i32.const 0)))"""


def run(n: int = 20_000) -> list[Stat]:
    import tty

    master, slave = os.openpty()
    tty.setraw(master)
    stop = threading.Event()

    def feed() -> None:
        while not stop.wait(0.01):
            os.write(master, b"temp=21.5\n")

    env = ShimEnv()
    clock = RealClock()
    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / "tty"
        link.symlink_to(os.ttyname(slave))
        sensors, _ = build_hardware(
            {
                "serial": {"driver": "serial", "port": str(link), "parser": "kv:temp"},
                "sim": {"driver": "sim"},
            },
            {},
            clock,
            env,
        )
        threading.Thread(target=feed, daemon=True).start()
        end = time.monotonic() + 5
        while sensors["serial"].read().status != Status.OK and time.monotonic() < end:
            time.sleep(0.01)
        sb = Sandbox()
        module = bytes(wasmtime.wat2wasm(ONE_READ))
        out = []
        for name in ("sim", "serial"):
            s = sensors[name]
            out.append(measure(f"sensor read(): {name} driver", s.read, n))
        for name in ("sim", "serial"):
            res = DeviceResources(clock, {name: sensors[name]})
            spec = AppSpec("r", module, frozenset({"sensors"}), Limits())
            app = App(spec, start_instance(sb, spec, res, None))
            out.append(measure(f"tick with 1 sensors.read: {name}", app.tick, n))
        stop.set()
        sb.close()
        for s in sensors.values():
            s.close()
        env.close()
    os.close(master)
    os.close(slave)
    return out


if __name__ == "__main__":
    for s in run():
        print(s.row())
