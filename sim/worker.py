"""A worker process hosting many simulated devices (real daemons: real sandbox,
real slots on disk, real MQTT session), sharing one wasmtime engine and one
``Runtime``: one thread runs every device's ticks, update work and MQTT I/O
(one epoll loop for every socket), beside a connect thread and the engine's
epoch ticker, however many devices it hosts."""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any


def device_config(spec: dict[str, Any], broker_url: str) -> dict[str, Any]:
    return {
        "device": {
            "id": spec["id"],
            "hardware": spec["hardware"],
            "state_dir": str(spec["state_dir"]),
            "trust_root": str(spec["root"]),
        },
        "broker": {
            "url": broker_url,
            "reconnect_min_s": 0.5,
            "reconnect_max_s": 8.0,
            "download_stall_s": 10,
            "keepalive_s": spec.get("keepalive_s", 30),
        },
        "apps": {
            "app": {
                "module": str(spec["bootstrap"]),
                "policy": ["log", "clock", "sensors", "config", "messages"],
                "tick_interval_ms": spec.get("tick_interval_ms", 100),
                "tick_budget_ms": 50,  # the ceiling for the fleet's releases (sim/fleet.py)
                "health_interval_ms": 5 * spec.get("tick_interval_ms", 100),
            }
        },
        "sensors": {
            "temp": {
                "driver": "sim",
                "waveform": "sine",
                "base": spec["temp_base"],
                "amplitude": 2.0,
                "period_s": spec["temp_period_s"],
                "seed": spec["seed"],
                "noise": spec.get("temp_noise", 0.0),
                "fault": spec.get("temp_fault", "none"),
                "fault_after_s": 5.0,
            },
            "quirk": {"driver": "sim", "waveform": "constant", "base": spec["quirk"]},
        },
    }


def run(conn: Connection, specs: list[dict[str, Any]], broker_url: str, log_path: str) -> None:
    # The parent stops us ("stop" on the pipe); a Ctrl-C meant for it is not ours.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        filename=log_path, level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from devicerunner.device import config
    from devicerunner.device.daemon import Daemon
    from devicerunner.runtime.process import Runtime
    from devicerunner.sandbox.engine import Sandbox
    from firmware_shims.base import SkewedClock

    sandbox = Sandbox(cache_dir=Path(specs[0]["state_dir"]).parent / "cache")
    # One thread runs every device's ticks, update work and MQTT I/O (one_thread):
    # the work is GIL-bound, and every extra thread turns the GIL into a convoy (a
    # thread that releases it for a 1 us stat() waits for it again). Measured on a
    # 2,500-device worker: a second tick thread cost 70% more CPU for the same
    # ticks; a second work thread 204 instead of 134 context switches and ~6% more
    # CPU per update; a tick thread of its own beside the work thread 151 instead
    # of 103 context switches and ~35% more CPU per update. Timers may fire 10 ms
    # late so that the ticks of many devices share a wake-up.
    runtime = Runtime(work_threads=1, name="sim", timer_slack_s=0.010, one_thread=True)
    daemons = []
    for spec in specs:
        cfg = config.parse(device_config(spec, broker_url), Path(spec["state_dir"]).parent)
        d = Daemon(
            cfg,
            sandbox=sandbox,
            runtime=runtime,
            clock=SkewedClock(spec["clock_offset_s"]),
            status_file=False,
            inbox_scan_s=30.0,  # simulated devices take releases over MQTT only
        )
        d.start()
        daemons.append(d)
    # What start-up made (daemons, instances, configs: millions of objects)
    # lives as long as the worker. Frozen, a full collection no longer walks it:
    # a 2,500-device worker made two of ~0.5 s each (every device in it
    # stalled) between start-up and the end of a rollout.
    gc.freeze()
    conn.send(("ready", {"devices": len(daemons), "threads": threading.active_count()}))
    while True:
        msg = conn.recv()
        if msg == "stop":
            break
    for d in daemons:
        d.stop()
    stats = {d.cfg.id: {"reconnects": d.channel.connections() if d.channel else []} for d in daemons}
    runtime.close()
    sandbox.close()
    conn.send(("stopped", stats))
    conn.close()
    sys.exit(0)
