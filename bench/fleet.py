"""Fleet scale: N simulated devices against Mosquitto take one release (100%).

    python -m bench.fleet 1000 3000 10000     # sizes; workers: one per 1,250 devices, at least 2
    python -m bench.fleet --tick-ms 100 1000  # round 1's setting: apps at 10 Hz, 15-tick trials

Apps tick at 1 Hz by default (``--tick-ms``), the rate of the thermostat a
fleet runs, with health checks every 5 ticks; at 10 Hz the ticks alone of
10,000 devices are 100,000 Wasm calls a second, more than 2 cores give.

Measured, per size:
- time from the operator's publish to the whole fleet committed, as the
  watcher saw it and on the devices' own clocks (the last COMMITTED event's
  timestamp). It *includes* each device's trial (3 ticks and >= 1 s at 1 Hz;
  15 ticks at 10 Hz); also when the first, median and 90th-percentile device
  committed;
- messages and bytes through the broker during that time (Mosquitto's
  $SYS counters);
- peak RSS per device (worker processes' VmHWM / devices), threads per
  worker, and the CPU an idle device costs (workers' user+system time over
  5 s of the fleet ticking at 10 Hz, per device);
- CPU per update (workers' CPU during the rollout / devices), the same less
  what the fleet's ticking costs over that time (what one update adds), and
  per idle device, so the cost per device can be compared across sizes;
- the ratio against the goal (10,000 devices in 60 s; round 1: 1,000).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import pctl, proc_kib
from devicerunner.transport import operator
from devicerunner.transport.settings import parse_url
from sim import apps
from sim.fleet import Fleet, Keys, Watcher
from tests.brokers import Mosquitto

GOAL_S = 60.0
GOAL_DEVICES = 10_000
"""The goal: 10,000 devices converged in under 60 s on this 2-core machine."""

SYS = [
    "$SYS/broker/messages/received",
    "$SYS/broker/messages/sent",
    "$SYS/broker/bytes/received",
    "$SYS/broker/bytes/sent",
]


def _sys(url: str) -> dict[str, int]:
    with operator.Session(parse_url(url)) as s:
        got = s.collect(SYS, quiet_s=1.2, max_s=3)
    return {k.rsplit("/", 2)[-2] + "_" + k.rsplit("/", 1)[-1]: int(v) for k, v in got.items() if v.isdigit()}


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def run(n: int, workers: int, tick_ms: int = 1000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dr-bench-fleet-") as tmp:
        # The watcher takes every device's statuses and events (~15 each per
        # update): Mosquitto's default queue of 1,000 QoS 1 messages per client
        # would drop most of them at 10,000 devices (docs/operations.md).
        b = Mosquitto(
            Path(tmp) / "mosq",
            extra="sys_interval 1\nmax_connections -1\nmax_queued_messages 1000000\n",
        ).start()
        keys = Keys(tick_interval_ms=tick_ms, trial_ticks=3 if tick_ms >= 1000 else 15)
        fleet = Fleet(Path(tmp) / "fleet", n, b.url, keys, seed=7, workers=workers)
        s = parse_url(b.url)
        try:
            with Watcher(s, "dr/v1", timeline=False) as w:  # the bench reads no timeline
                t = time.monotonic()
                fleet.start(timeout_s=600)
                online = w.wait(lambda: w.count(lambda _d, st: st.get("online")) == n, 300)
                t_start = time.monotonic() - t
                pids = [p.pid for p, _ in fleet.workers]
                c0, t0 = sum(_cpu_s(p) for p in pids), time.monotonic()
                time.sleep(5)
                idle_cpu = (sum(_cpu_s(p) for p in pids) - c0) / (time.monotonic() - t0)
                before = _sys(b.url)
                data = keys.bundle(apps.good("bench"), 1, "2.0.0", percent=100)
                t_pub = time.time()
                cpu0 = [sum(_cpu_s(p) for p in pids), _cpu_s(b.proc.pid), time.process_time()]  # type: ignore[union-attr]
                t0 = time.monotonic()
                operator.publish_bundle(s, data, "dr/v1")

                def on_new(_d: str, st: dict[str, Any]) -> bool:
                    return bool(((st.get("apps") or {}).get("app") or {}).get("sequence") == 1)

                done = w.wait(lambda: w.count(on_new) == n, 600)
                converge = time.monotonic() - t0
                cpu1 = [sum(_cpu_s(p) for p in pids), _cpu_s(b.proc.pid), time.process_time()]  # type: ignore[union-attr]
                committed = w.count(on_new)
                commits = sorted(
                    e["ts"] - t_pub  # the device's own (host) clock: the watcher may lag
                    for e in list(w.events)
                    if e.get("phase") == "COMMITTED" and e.get("sequence") == 1
                )
                phases: dict[str, list[float]] = {}
                lag: list[float] = []
                for e in list(w.events):
                    if e.get("sequence") == 1:
                        phases.setdefault(str(e.get("phase")), []).append(e["ts"] - t_pub)
                        lag.append(w.t0 + e["t"] - e["ts"])
                after = _sys(b.url)
                hwm = sum(proc_kib(p, "VmHWM") for p in pids)
                threads = dict(fleet.threads)
        finally:
            fleet.stop()
            b.stop()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {
        "devices": n,
        "workers": workers,
        "online": online,
        "startup_s": round(t_start, 1),
        "converged": done,
        "committed": committed,
        "publish_to_all_committed_s": round(converge, 2),
        "publish_to_last_commit_device_clock_s": round(commits[-1], 2) if commits else None,
        "tick_ms": tick_ms,
        "cpu_ms_per_update": round((cpu1[0] - cpu0[0]) / n * 1000, 2),
        # less what the fleet's ticking costs over the same time: what one update adds
        "cpu_ms_per_update_above_idle": round((cpu1[0] - cpu0[0] - idle_cpu * converge) / n * 1000, 2),
        "commit_first_median_p90_s": [
            round(commits[0], 2) if commits else None,
            round(statistics.median(commits), 2) if commits else None,
            round(pctl(commits, 90), 2) if commits else None,
        ],
        "phase_reached_median_p90_s": {
            k: [round(statistics.median(v), 2), round(pctl(v, 90), 2)] for k, v in phases.items()
        },
        "rollout_cpu_s_workers_broker_watcher": [round(b - a, 1) for a, b in zip(cpu0, cpu1, strict=True)],
        "watcher_lag_median_p90_s": [round(statistics.median(lag), 2), round(pctl(lag, 90), 2)]
        if lag
        else None,
        "vs_goal": round(converge / GOAL_S, 2) if n == GOAL_DEVICES else None,
        "broker": delta,
        "peak_rss_per_device_kib": round(hwm / n),
        "threads_per_worker": sorted(set(threads.values())),
        "idle_cpu_per_device_pct_of_a_core": round(idle_cpu / n * 100, 4),
        "idle_cpu_us_per_device_second": round(idle_cpu / n * 1e6, 1),
    }


def default_workers(n: int) -> int:
    """A worker runs its devices on one thread, which blocks in each fsync (~0.5 ms
    of the disk's time, 12 per update): enough processes that others use the
    cores meanwhile. 10,000 devices: 61.9 s with 8 workers, 63.4 s with 4."""
    return max(2, -(-n // 1250))


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n")[0])
    ap.add_argument("sizes", nargs="*", type=int, default=[100], help="fleet sizes (default: 100)")
    ap.add_argument("--tick-ms", type=int, default=1000, help="the apps' tick interval (default: 1000)")
    ap.add_argument(
        "--workers", type=int, help="worker processes (default: one per 1,250 devices, at least 2)"
    )
    args = ap.parse_args()
    for n in args.sizes:
        r = run(n, workers=args.workers or default_workers(n), tick_ms=args.tick_ms)
        print(json.dumps(r), flush=True)  # one JSON object per fleet size, for scripts
        if r["vs_goal"] is not None:
            print(
                f"{GOAL_DEVICES:,} devices: {r['publish_to_all_committed_s']} s"
                f" = {r['vs_goal']} x the {GOAL_S:.0f} s goal",
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
