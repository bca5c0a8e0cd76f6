"""Diagnostics for people wiring hardware: list sensors, read one (optionally watching)."""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from pathlib import Path
from typing import Any

from devicerunner.device import config
from devicerunner.device.hardware import build_hardware
from devicerunner.errors import ConfigError
from firmware_shims.base import RealClock, Sensor, Status
from firmware_shims.env import ShimEnv


def _row(name: str, s: Sensor) -> dict[str, Any]:
    r = s.read()
    age = time.monotonic() - r.t_s if math.isfinite(r.t_s) else None
    return {
        "name": name,
        "driver": getattr(s, "driver", type(s).__name__),
        "where": s.describe() if hasattr(s, "describe") else "",
        "status": Status(r.status).name.lower(),
        "value": None if math.isnan(r.value) else r.value,
        "unit": s.unit,
        "age_s": None if age is None else round(age, 3),
        "malformed": getattr(s, "malformed", 0),
        "dropped": getattr(s, "dropped", 0),
        "reconnects": getattr(s, "reconnects", 0),
    }


def _open(args: argparse.Namespace) -> tuple[dict[str, Sensor], ShimEnv]:
    cfg = config.load(Path(args.config))
    env = ShimEnv(sysfs_root=cfg.sysfs_root)
    sensors, actuators = build_hardware(cfg.sensors, cfg.actuators, RealClock(), env)
    for a in actuators.values():
        a.close()
    return sensors, env


def _settle(sensors: dict[str, Sensor], timeout_s: float) -> None:
    """Give reader threads a moment for a first sample (bounded)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and any(s.read().status != Status.OK for s in sensors.values()):
        time.sleep(0.05)


def cmd_list(args: argparse.Namespace) -> int:
    sensors, env = _open(args)
    try:
        _settle(sensors, args.wait)
        rows = [_row(n, s) for n, s in sensors.items()]
    finally:
        for s in sensors.values():
            s.close()
        env.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'NAME':<14} {'DRIVER':<8} {'STATUS':<8} {'VALUE':>12} {'AGE':>8}  WHERE")
    for r in rows:
        v = "-" if r["value"] is None else f"{r['value']:.4g} {r['unit']}".strip()
        age = "-" if r["age_s"] is None else f"{r['age_s']:.2f}s"
        print(f"{r['name']:<14} {r['driver']:<8} {r['status']:<8} {v:>12} {age:>8}  {r['where']}")
    return 0


def cmd_read(args: argparse.Namespace) -> int:
    sensors, env = _open(args)
    try:
        if args.name not in sensors:
            raise ConfigError(
                f"sensors.{args.name}: no such sensor (configured: {', '.join(sensors) or 'none'})"
            )
        s = sensors[args.name]
        _settle({args.name: s}, args.wait)
        stop = threading.Event()
        n = 0
        while True:
            r = _row(args.name, s)
            if args.json:
                print(json.dumps(r), flush=True)
            else:
                v = "-" if r["value"] is None else f"{r['value']:.6g} {r['unit']}".strip()
                print(f"{r['name']}: {v} ({r['status']}, age {r['age_s']} s)", flush=True)
            n += 1
            if not args.watch or (args.count and n >= args.count) or stop.wait(args.interval):
                break
    except KeyboardInterrupt:
        pass
    finally:
        for x in sensors.values():
            x.close()
        env.close()
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("sensors", help="check hardware wiring: list sensors, read one")
    ssub = p.add_subparsers(dest="sensors_cmd", required=True)
    ls = ssub.add_parser("list", help="every sensor: driver, status, last value, age")
    ls.add_argument("--config", required=True, help="the device's device.toml")
    ls.add_argument("--wait", type=float, default=1.5, help="seconds to wait for first samples")
    ls.add_argument("--json", action="store_true", help="print the sensors as JSON")
    ls.set_defaults(func=cmd_list)
    rd = ssub.add_parser("read", help="read one sensor")
    rd.add_argument("name", help="a sensor of [sensors.NAME] in device.toml")
    rd.add_argument("--config", required=True, help="the device's device.toml")
    rd.add_argument("--watch", action="store_true", help="keep reading until Ctrl-C")
    rd.add_argument("--interval", type=float, default=0.5, help="with --watch: seconds between readings")
    rd.add_argument("--count", type=int, default=0, help="with --watch: stop after N readings")
    rd.add_argument("--wait", type=float, default=1.5, help="seconds to wait for a first sample")
    rd.add_argument("--json", action="store_true", help="print readings as JSON")
    rd.set_defaults(func=cmd_read)
