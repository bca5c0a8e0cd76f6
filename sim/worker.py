"""A worker process hosting many simulated devices (real daemons: real sandbox,
real slots on disk, real MQTT session), sharing one wasmtime engine."""

from __future__ import annotations

import logging
import sys
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
        "broker": {"url": broker_url, "reconnect_min_s": 0.5, "reconnect_max_s": 8.0, "download_stall_s": 10},
        "apps": {
            "app": {
                "module": str(spec["bootstrap"]),
                "policy": ["log", "clock", "sensors"],
                "tick_interval_ms": 100,
                "health_interval_ms": 500,
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
            },
            "quirk": {"driver": "sim", "waveform": "constant", "base": spec["quirk"]},
        },
    }


def run(conn: Connection, specs: list[dict[str, Any]], broker_url: str, log_path: str) -> None:
    logging.basicConfig(
        filename=log_path, level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from devicerunner import config
    from devicerunner.daemon import Daemon
    from devicerunner.sandbox import Sandbox

    sandbox = Sandbox(cache_dir=Path(specs[0]["state_dir"]).parent / "cache")
    daemons = []
    for spec in specs:
        cfg = config.parse(device_config(spec, broker_url), Path(spec["state_dir"]).parent)
        d = Daemon(cfg, sandbox=sandbox, status_file=False)
        d.start()
        daemons.append(d)
    conn.send(("ready", len(daemons)))
    while True:
        msg = conn.recv()
        if msg == "stop":
            break
    for d in daemons:
        d.stop()
    stats = {d.cfg.id: {"reconnects": [t for t in d.transport.conn.connects]} for d in daemons}
    sandbox.close()
    conn.send(("stopped", stats))
    conn.close()
    sys.exit(0)
