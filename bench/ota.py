"""Publish-to-committed latency of a 100 KiB module over MQTT on loopback.

A real Mosquitto (started here), a real device daemon in this process, the
operator's publish. Measured per run: publish start -> TRIAL event (download,
verification, staging, instantiation and dr_init: everything but the trial),
and publish start -> COMMITTED with a minimal trial (1 tick, 0 s).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.common import Stat, from_samples
from devicerunner.device.daemon import Daemon
from devicerunner.transport import operator
from devicerunner.transport.settings import parse_url
from tests.brokers import Mosquitto
from tests.devicekit import Events, Kit, counter_module


def run(runs: int = 9) -> list[Stat]:
    to_trial, to_commit = [], []
    with tempfile.TemporaryDirectory() as tmp:
        b = Mosquitto(Path(tmp) / "mosq").start()
        try:
            kit = Kit(Path(tmp) / "dev", extra_config=f'\n[broker]\nurl = "{b.url}"\n')
            d = Daemon(kit.cfg)
            ev = Events(d)
            d.start()
            d.channel.wait_connected(10)
            s = parse_url(b.url)
            for seq in range(1, runs + 1):
                module = counter_module(seq, pad_bytes=100 * 1024 - 300)
                data = kit.bundle(module, seq, trial_ticks=1, trial_seconds=0)
                t0 = time.monotonic()
                operator.publish_bundle(s, data, "dr/v1")
                ev.wait("TRIAL", seq)
                t1 = time.monotonic()
                ev.wait("COMMITTED", seq)
                t2 = time.monotonic()
                to_trial.append((t1 - t0) * 1000)
                to_commit.append((t2 - t0) * 1000)
            size = len(module)
            d.stop()
        finally:
            b.stop()
    return [
        from_samples(f"ota: publish -> trial start ({size // 1024} KiB)", to_trial, "ms"),
        from_samples(f"ota: publish -> committed, 1-tick trial ({size // 1024} KiB)", to_commit, "ms"),
    ]


if __name__ == "__main__":
    for s in run():
        print(s.row())
