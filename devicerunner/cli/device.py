"""Device-side commands: install a bundle through the local channel, show status."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from devicerunner.device import config
from devicerunner.device.paths import LOCK_FILE, STATUS_FILE
from devicerunner.errors import ConfigError
from devicerunner.trust import bundle
from devicerunner.trust import verify as trust
from devicerunner.trust.manifest import Manifest, parse_manifest
from devicerunner.trust.store import read_root, read_time_floor
from devicerunner.update.config_updates import ConfigFiles
from devicerunner.update.slots import AppSlots
from devicerunner.update.state import AppState, releases
from devicerunner.update.updater import install_bundle, read_bundle

FRESH_S = 5.0


def check_bundle(cfg: config.DeviceConfig, data: bytes) -> Manifest:
    """Verify a bundle as this device's daemon will: its root, identity,
    hardware, policy, anti-rollback history and time floor. Read-only."""
    root, _ = read_root(cfg.state_dir, cfg.trust_root)
    if root is None:
        raise ConfigError(
            f"{cfg.source}: no trust root: set device.trust_root "
            "(without one the daemon refuses every update)"
        )
    env, module = bundle.unpack(data)
    app = parse_manifest(env).app
    history = {}
    if app in cfg.apps:
        st, _ = AppSlots(cfg.state_dir, app).load()
        history[app] = trust.AppHistory(st.highest_sequence, st.bad)
    m = trust.verify_release(
        env,
        root=root,
        device=trust.DeviceIdentity(cfg.id, cfg.hardware, {n: a.policy for n, a in cfg.apps.items()}),
        history=history,
        time_floor=read_time_floor(cfg.state_dir),
        now=int(time.time()),
        channel=cfg.apps[app].channel if app in cfg.apps else None,
    )
    trust.verify_artifact(m, module)
    return m


def daemon_running(cfg: config.DeviceConfig) -> bool:
    """A daemon holds ``<state_dir>/lock`` (exclusive flock) for its lifetime:
    a shared non-blocking lock fails while one runs. Without the lock file
    (daemons before it existed), a fresh status.json from a live pid."""
    try:
        fd = os.open(cfg.state_dir / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return _status_fresh(cfg)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases a lock we got
    return False


def cmd_install(args: argparse.Namespace) -> int:
    cfg = config.load(Path(args.config))
    data = read_bundle(Path(args.bundle))  # size checked before reading (TooLargeError: exit 1)
    m = check_bundle(cfg, data)
    path = install_bundle(cfg.state_dir, data)
    running = daemon_running(cfg)
    if args.json:
        print(
            json.dumps(
                {
                    "queued": str(path),
                    "app": m.app,
                    "version": m.version,
                    "sequence": m.sequence,
                    "daemon": "running" if running else "stopped",
                }
            )
        )
        return 0
    what = f"queued {m.app} {m.version} (sequence {m.sequence}, verified for device {cfg.id})"
    if running:
        print(f"{what}; the running daemon takes it within a second.")
    else:
        print(
            f"{what}; no daemon is running: it is taken at the next start "
            f"(devicerunner run --config {args.config})."
        )
    print(f"Follow it with: devicerunner status --config {args.config}")
    return 0


def _status_fresh(cfg: config.DeviceConfig) -> bool:
    try:
        live = json.loads((cfg.state_dir / STATUS_FILE).read_bytes())
    except (OSError, ValueError):
        return False
    return (
        isinstance(live, dict)
        and isinstance(live.get("updated"), int | float)
        and time.time() - live["updated"] < FRESH_S
        and _pid_alive(live.get("pid"))
    )


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def device_status(cfg: config.DeviceConfig) -> dict[str, Any]:
    """Live status from a running daemon, else what is on disk."""
    try:
        live = json.loads((cfg.state_dir / STATUS_FILE).read_bytes())
    except (OSError, ValueError):
        live = None
    running = bool(live) and time.time() - live.get("updated", 0) < FRESH_S and _pid_alive(live.get("pid"))
    out: dict[str, Any] = {
        "device": cfg.id,
        "hardware": cfg.hardware,
        "daemon": "running" if running else "stopped",
        "apps": {},
    }
    for name in cfg.apps:
        st, why = AppSlots(cfg.state_dir, name).load()
        entry: dict[str, Any] = {"state": {**st.__dict__}}
        if why:
            entry["state_note"] = why
        if running and name in live.get("apps", {}):
            entry.update({k: v for k, v in live["apps"][name].items() if k != "state"})
        else:
            entry.update(releases(st, None))
        if "config" not in entry:  # stopped: the config state on disk
            cst = ConfigFiles(cfg.state_dir, name).load()
            entry["config"] = {
                "version": cst.active_version,
                "phase": cst.phase,
                "candidate_version": cst.candidate_version,
                "refused_versions": sorted(cst.bad),
                "last_error": cst.last_error,
            }
        out["apps"][name] = entry
    if running:
        out["events"] = live.get("events", [])
    return out


def cmd_status(args: argparse.Namespace) -> int:
    cfg = config.load(Path(args.config))
    s = device_status(cfg)
    if args.json:
        print(json.dumps(s, indent=2, sort_keys=True, default=str))
        return 0
    print(f"device {s['device']} ({s['hardware']}), daemon {s['daemon']}")
    for name, a in s["apps"].items():
        print(status_lines(name, a))
    return 0


def status_lines(name: str, a: dict[str, Any]) -> str:
    """Active release, candidate and last error of one app, each on its own terms."""
    st = AppState(**a["state"])
    r = {k: a[k] for k in ("active", "candidate", "error") if k in a} or releases(st, a.get("version"))
    act, cand, err = r["active"], r.get("candidate"), r.get("error")
    version = act["version"] or ("bootstrap" if not act["slot"] else "?")
    lines = [f"  {name}: {version} (sequence {act['sequence']}, slot {act['slot'] or '-'}), phase {st.phase}"]
    if cand:
        line = f"    candidate: {cand['version'] or '?'} (sequence {cand['sequence']}"
        line += f", slot {cand['slot']})" if cand.get("slot") else ")"
        line += f", {cand['phase']}"
        trial = a.get("trial")
        if trial and cand["phase"] == "TRIAL":
            line += (
                f", trial {trial['ticks']}/{trial['of_ticks']} ticks "
                f"{trial['seconds']}/{trial['of_seconds']} s"
            )
        lines.append(line)
    if "ticks" in a:
        lines.append(
            f"    ticks {a['ticks']}, traps {a['traps']}, overruns {a['overruns']}, "
            f"tick p50 {a['tick_p50_us']} us, p99 {a['tick_p99_us']} us"
        )
    if err:
        seq = err.get("sequence")
        about = f" (sequence {seq})" if seq is not None else ""
        line = f"    last error{about}: {err['text']}"
        if err.get("retry_above") is not None:
            line += (
                f"\n    sequence {seq} can no longer be taken on this device: "
                f"publish the fix with a sequence above {err['retry_above']}"
            )
        lines.append(line)
    elif a.get("last_error"):
        lines.append(f"    last error: {a['last_error']}")
    c = a.get("config") or {}
    if c.get("version") or c.get("phase") not in (None, "IDLE"):
        line = f"    config v{c['version']}, {c['phase']}"
        if c.get("on_trial") or c.get("candidate_version"):
            line += f", v{c.get('on_trial') or c.get('candidate_version')} pending"
        if c.get("refused_versions"):
            line += f", refused: {', '.join(f'v{v}' for v in c['refused_versions'])}"
        lines.append(line)
        if c.get("last_error"):
            lines.append(f"    config error: {c['last_error']}")
    m = a.get("messages")
    if m:
        lines.append(
            f"    messages: {m['received']} received, {m['delivered']} delivered, {m['queued']} queued, "
            f"dropped {m['dropped_full']} (full) {m['dropped_rate']} (rate) "
            f"{m['dropped_invalid']} (invalid)"
        )
    return "\n".join(lines)


def register(sub: Any) -> None:
    i = sub.add_parser("install", help="install a signed bundle through the local channel")
    i.add_argument("bundle", help="a signed bundle (devicerunner sign)")
    i.add_argument("--config", required=True, help="the device's device.toml")
    i.add_argument("--json", action="store_true", help="print what was queued as JSON")
    i.set_defaults(func=cmd_install)
    s = sub.add_parser("status", help="show every app: version, phase, trial, last error, counters")
    s.add_argument("--config", required=True, help="the device's device.toml")
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    s.set_defaults(func=cmd_status)
