"""A hostile broker against a real daemon: does its memory stay bounded, and
does the genuine release still commit afterwards?

    python -m bench.hostile_broker                       # the issue's figures (~3 minutes)
    python -m bench.hostile_broker --manifests 500 --roots 200 --big-mb 20   # a quick look

A real Mosquitto (started here, on a free loopback port) and a real device
daemon in its own process (``python -m devicerunner.cli run``). Anyone may
publish; this script does, in order:

1. ``--manifests`` distinct garbage manifests of ~120 KiB each on the
   device's release topic (JSON envelopes, unsigned: every one is parsed);
2. ``--roots`` distinct parseable roots self-signed by strangers, on
   ``trust/root`` and on ``trust/roots/2`` (the version the device expects
   next), none verifiable against the device's root;
3. one ``--big-mb`` MB payload on the release topic;
4. the genuine release (a signed bundle, via the operator's publish).

The daemon's RSS (``/proc/PID/status`` VmRSS) is sampled every 50 ms: the
baseline is taken once it is connected and idle, the peak over the attack,
"after" 5 s after the genuine release committed (or failed to). The goal
(issue #13): peak <= baseline + 64 MiB, after <= baseline + 16 MiB, committed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import proc_kib
from devicerunner.transport import operator, topics
from devicerunner.transport.settings import parse_url
from devicerunner.trust import manifest
from tests.brokers import Mosquitto
from tests.devicekit import Kit, counter_module

P = "dr/v1"
MIB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent
PEAK_GOAL_MIB = 64
AFTER_GOAL_MIB = 16


class Sampler:
    """RSS of one process every ``every_s``, with the peak since the last ``reset``."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        self.pid = pid
        self.every_s = every_s
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, proc_kib(self.pid))

    def reset(self) -> None:
        self.peak = proc_kib(self.pid)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(2)


class Watch:
    """The device's events topic, as an operator would watch it."""

    def __init__(self, url: str) -> None:
        s = parse_url(url)
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-watch-{os.getpid()}")
        self.c.on_message = self._msg
        self.c.connect(s.host, s.port)
        self.c.subscribe([(topics.events(P, "dev-1"), 1), (topics.status(P, "dev-1"), 1)])
        self.c.loop_start()
        self.online = threading.Event()

    def _msg(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        if msg.topic.endswith("/status"):
            if doc.get("online"):
                self.online.set()
            return
        with self._cond:
            self.events.append(doc)
            self._cond.notify_all()

    def wait(self, phase: str, sequence: int, timeout_s: float) -> bool:
        def seen() -> bool:
            return any(e.get("phase") == phase and e.get("sequence") == sequence for e in self.events)

        with self._cond:
            return self._cond.wait_for(seen, timeout_s)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def garbage_manifest(i: int, size: int) -> bytes:
    return json.dumps(
        {"signed": {"_type": "release", "app": "app", "pad": f"{i:08d}" + "x" * size}, "signatures": []}
    ).encode()


def stranger_root(version: int) -> bytes:
    """Parseable, self-signed by a key nobody trusts, padded with keys (~7 KiB)."""
    keys = [Ed25519PrivateKey.generate() for _ in range(2)]
    extra = [Ed25519PrivateKey.generate().public_key() for _ in range(60)]
    now = int(time.time())
    signed = manifest.root_signed(
        version=version,
        issued=now - 60,
        expires=now + 86400,
        role_keys={"root": [keys[0].public_key()], "release": [keys[1].public_key(), *extra]},
        thresholds={"root": 1, "release": 1},
    )
    return manifest.sign_envelope(signed, keys[:1])


def publish_all(url: str, items: list[tuple[str, bytes]]) -> float:
    t = time.monotonic()
    with operator.Session(parse_url(url)) as s:
        s.publish_many(items, retain=False)
    return time.monotonic() - t


def publish_big(url: str, topic: str, size: int) -> float:
    t = time.monotonic()
    with operator.Session(parse_url(url), timeout_s=300) as s:
        s.publish_many([(topic, b"{" + b" " * (size - 1))], retain=False)
    return time.monotonic() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifests", type=int, default=15_000)
    ap.add_argument("--manifest-kib", type=int, default=120)
    ap.add_argument("--roots", type=int, default=6_000)
    ap.add_argument("--big-mb", type=int, default=200)
    ap.add_argument("--protocol", choices=["3.1.1", "5"], default="3.1.1")
    ap.add_argument(
        "--code", type=Path, default=REPO, help="run the daemon from this checkout (before/after)"
    )
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        # The tests' Mosquitto: no size limit, 100,000 queued messages per subscriber.
        broker = Mosquitto(Path(tmp) / "mosq").start()
        proto = f'protocol = "{args.protocol}"\n' if args.protocol != "3.1.1" else ""
        kit = Kit(
            Path(tmp) / "dev",
            extra_config=f'\n[broker]\nurl = "{broker.url}"\n{proto}reconnect_min_s = 0.1\n',
        )
        watch = Watch(broker.url)
        cmd = [sys.executable, "-m", "devicerunner.cli.main", "run", "--config", str(kit.config_path)]
        log = open(Path(tmp) / "daemon.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=args.code)
        sampler = Sampler(proc.pid)
        committed = False
        baseline = peak = after = hwm = 0
        try:
            if not watch.online.wait(30):
                log.flush()
                tail = (Path(tmp) / "daemon.log").read_text()[-3000:]
                print(f"the daemon did not come online:\n{tail}", file=sys.stderr)
                return 2
            time.sleep(3)  # settle: imports done, app ticking
            baseline = proc_kib(proc.pid)
            sampler.reset()
            print(f"daemon pid {proc.pid}, protocol {args.protocol}; baseline RSS {baseline / 1024:.1f} MiB")

            release = topics.release(P, "app", "stable")
            flood = [
                (release, garbage_manifest(i, args.manifest_kib * 1024 - 200)) for i in range(args.manifests)
            ]
            took = publish_all(broker.url, flood)
            print(f"1. {args.manifests:,} garbage manifests of ~{args.manifest_kib} KiB in {took:.1f} s")
            del flood
            roots = [
                (topics.root(P), stranger_root(v)) if v % 2 else (topics.root_version(P, 2), stranger_root(2))
                for v in range(2, args.roots + 2)
            ]
            took = publish_all(broker.url, roots)
            print(f"2. {args.roots:,} unsigned roots (~{len(roots[0][1]) // 1024} KiB) in {took:.1f} s")
            del roots
            took = publish_big(broker.url, release, args.big_mb * 1000 * 1000)
            print(f"3. one {args.big_mb} MB payload published in {took:.1f} s")

            data = kit.bundle(counter_module(42), 1)
            t0 = time.monotonic()
            operator.publish_bundle(parse_url(broker.url), data, P)
            committed = watch.wait("COMMITTED", 1, timeout_s=300)
            took = time.monotonic() - t0
            verdict = "COMMITTED" if committed else "NOT committed"
            print(f"4. genuine release: {verdict} {took:.1f} s after its publish")
            peak = sampler.peak
            time.sleep(5)
            after = proc_kib(proc.pid)
            hwm = proc_kib(proc.pid, "VmHWM")  # the kernel's peak (sampling may miss a spike)
        finally:
            sampler.stop()
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            log.close()
            watch.close()
            broker.stop()
        status = json.loads((kit.state_dir / "status.json").read_text())
        inp = status.get("input", {})
        rejected = sum(1 for e in watch.events if e.get("phase") == "REJECTED")

    counted = max(peak, hwm)  # whichever is higher counts against the goal
    peak_d, after_d = (counted - baseline) / 1024, (after - baseline) / 1024
    print()
    print(f"RSS baseline {baseline / 1024:8.1f} MiB")
    print(f"RSS peak     {peak / 1024:8.1f} MiB  (+{(peak - baseline) / 1024:.1f}; sampled every 50 ms)")
    print(f"VmHWM        {hwm / 1024:8.1f} MiB  (+{(hwm - baseline) / 1024:.1f}; the kernel's peak)")
    print(f"peak counted {counted / 1024:8.1f} MiB  (+{peak_d:.1f}; goal <= +{PEAK_GOAL_MIB})")
    print(f"RSS after    {after / 1024:8.1f} MiB  (+{after_d:.1f}; goal <= +{AFTER_GOAL_MIB})")
    print(f"genuine release committed: {committed}")
    print(f"REJECTED events published: {rejected}")
    print(f"input counters: {json.dumps(inp, sort_keys=True)}")
    ok = committed and peak_d <= PEAK_GOAL_MIB and after_d <= AFTER_GOAL_MIB
    print("goal:", "MET" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
