"""Fleet scale: N simulated devices against Mosquitto take one release (100%).

    python -m bench.fleet 100 1000

Measured: time from the operator's publish to the whole fleet committed
(it *includes* each device's trial: 15 ticks at 100 ms and >= 1 s), messages
and bytes through the broker during that time (Mosquitto's $SYS counters),
and peak RSS per device (worker processes' VmHWM / devices).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from devicerunner.transport import operator
from devicerunner.transport.settings import parse_url
from sim import apps
from sim.fleet import Fleet, Keys, Watcher
from tests.brokers import Mosquitto

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


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def run(n: int, workers: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dr-bench-fleet-") as tmp:
        b = Mosquitto(Path(tmp) / "mosq", extra="sys_interval 1\nmax_connections -1\n").start()
        keys = Keys()
        fleet = Fleet(Path(tmp) / "fleet", n, b.url, keys, seed=7, workers=workers)
        s = parse_url(b.url)
        try:
            with Watcher(s, "dr/v1") as w:
                t = time.monotonic()
                fleet.start(timeout_s=600)
                online = w.wait(lambda: w.count(lambda _d, st: st.get("online")) == n, 300)
                t_start = time.monotonic() - t
                before = _sys(b.url)
                data = keys.bundle(apps.good("bench"), 1, "2.0.0", percent=100)
                t0 = time.monotonic()
                operator.publish_bundle(s, data, "dr/v1")

                def on_new(_d: str, st: dict[str, Any]) -> bool:
                    return bool(((st.get("apps") or {}).get("app") or {}).get("sequence") == 1)

                done = w.wait(lambda: w.count(on_new) == n, 600)
                converge = time.monotonic() - t0
                committed = w.count(on_new)
                after = _sys(b.url)
                hwm = sum(_hwm_kib(p.pid) for p, _ in fleet.workers)
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
        "broker": delta,
        "peak_rss_per_device_kib": round(hwm / n),
    }


def main() -> int:
    sizes = [int(x) for x in sys.argv[1:]] or [100]
    for n in sizes:
        r = run(n, workers=2 if n <= 200 else 4)
        print(r, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
