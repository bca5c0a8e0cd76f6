"""Artifact delivery figures (docs/benchmarks.md, "Artifact delivery").

1. Big artifacts: a 30 MB module published once per source (retained chunks,
   MQTT request/response through ``serve-artifacts``, HTTP range requests
   from a static host), downloaded by a real device daemon in its own process
   on loopback. Per source: download throughput (the device's own
   DOWNLOADING -> DOWNLOADED time, verification and fsync of every chunk and
   assembly included), the device's peak RSS during the download (sampled
   from /proc every 20 ms) next to its RSS before, and the publisher's and
   artifact server's peak RSS (``ru_maxrss``).
2. Power cut: the device is killed (SIGKILL) with about half of the chunks
   held, restarted, and must fetch only the rest and commit.
3. Deltas: two clang --target=wasm32-wasi builds of a generated C app
   (~1.1 MB, 5,200 functions) that differ in one function; bytes fetched for
   the second with content-defined chunks vs fixed 64 KiB chunks, and for an
   unrelated module.

    python -m bench.delivery [--size-mb 30] [--sources retained,mqtt,http] [--skip-delta]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import proc_kib
from devicerunner.device.daemon import Daemon
from devicerunner.transport import operator, topics
from devicerunner.transport.settings import parse_url
from devicerunner.trust import bundle, chunking, manifest
from tests.brokers import Mosquitto
from tests.conftest import ROOT
from tests.devicekit import Events, Kit
from tests.httphost import HttpHost
from tests.test_delivery import padded
from tests.test_mqtt import Listener

P = "dr/v1"
CLI = [sys.executable, "-m", "devicerunner.cli.main"]


class RssSampler:
    """VmRSS of a process every 20 ms, with the wall time (to compare with the
    device's event timestamps), and the highest VmHWM seen (peak since exec)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.hwm, self._stop = pid, 0, threading.Event()
        self.samples: list[tuple[float, int]] = []
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.samples.append((time.time(), proc_kib(self.pid)))
            self.hwm = max(self.hwm, proc_kib(self.pid, "VmHWM"))

    def peak_between(self, t0: float, t1: float) -> int:
        return max((kb for t, kb in self.samples if t0 <= t <= t1), default=0)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._t.join()


def run_measured(cmd: list[str]) -> int:
    """Run to completion; the child's peak RSS in KiB (its last VmHWM seen;
    ru_maxrss would count the forking parent's pages)."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    with RssSampler(p.pid) as rs:
        if p.wait(300) != 0:
            raise RuntimeError(f"{cmd[3:5]} failed with {p.returncode}")
    return rs.hwm


def start_device(cmd: list[str], tmp: Path) -> subprocess.Popen[bytes]:
    with open(tmp / "device.log", "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)


def device_cfg(url: str, source: str, http_url: str | None) -> str:
    extra = f'\n[broker]\nurl = "{url}"\ndownload_stall_s = 30\n\n[artifacts]\nsources = ["{source}"]\n'
    return extra + (f'http_url = "{http_url}"\n' if http_url else "")


def held_chunks(state: Path, sha: str) -> int:
    return len(list((state / "downloads" / sha).glob("*.chunk")))


def big(tmp: Path, size_mb: int, source: str, powercut: bool) -> dict[str, Any]:
    b = Mosquitto(tmp / "mosq").start()
    art = tmp / "artifacts"
    http = HttpHost(art).start() if source == "http" else None
    server: subprocess.Popen[bytes] | None = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        kit = Kit(tmp / "dev", extra_config=device_cfg(b.url, source, http.url if http else None))
        # the device policy ships modules up to 4 MiB by default (issue #14): this one is larger
        toml = kit.config_path.read_text()
        kit.config_path.write_text(
            toml.replace("[apps.app]\n", f"[apps.app]\nmax_module_bytes = {(size_mb + 8) * 1_000_000}\n", 1)
        )
        module = padded(1, 99, size_mb * 1_000_000)
        art_fields = chunking.artifact_of(io.BytesIO(module), chunking.for_size(len(module)))
        bundle_path = tmp / "big.bundle"
        bundle_path.write_bytes(kit.bundle(module, 1, artifact=art_fields, trial_ticks=1))
        sha, n_chunks = art_fields["sha256"], len(art_fields["chunks"])
        del module
        pub = [*CLI, "publish", str(bundle_path), "--dir", str(art), "--json"]
        if source == "retained":  # chunks retained on the broker (the release comes later, live)
            with open(bundle_path, "rb") as f:
                man, off = bundle.read_header(f)
                m = manifest.parse_manifest(man)
                with operator.Session(parse_url(b.url)) as sess:
                    sess.publish_many(
                        ((topics.chunk(P, sha, i), d) for i, d in bundle.iter_chunks(f, m, off)),
                        retain=True,
                        total=n_chunks,
                    )
        t0 = time.monotonic()
        publisher_kb = run_measured(pub)
        publish_s = time.monotonic() - t0
        if source == "mqtt":
            server = subprocess.Popen(
                [*CLI, "serve-artifacts", "--broker", b.url, "--dir", str(art)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            assert server.stdout is not None
            server.stdout.readline()  # "serving artifacts ..." once subscribed
        events = Listener(b.url, topics.events(P, "dev-1"))
        time.sleep(0.5)  # its SUBACK: the device's first events must not pass it by
        run = [*CLI, "run", "--config", str(kit.config_path)]
        dev = start_device(run, tmp)
        procs.append(dev)
        events_wait = events.wait_event
        out: dict[str, Any] = {"source": source, "size_mb": size_mb, "chunks": n_chunks}
        status = Listener(b.url, topics.status(P, "dev-1"))
        end = time.monotonic() + 60  # its first status follows its subscriptions: it is ready
        while not status.messages and time.monotonic() < end:
            time.sleep(0.05)
        status.close()
        time.sleep(0.5)
        out["device_rss_idle_mb"] = round(proc_kib(dev.pid) / 1024, 1)
        with RssSampler(dev.pid) as rs:
            with open(bundle_path, "rb") as f:  # the release, live: the device is connected and idle
                operator.publish_bundle_file(parse_url(b.url), f, P, retain=False)
            events_wait("DOWNLOADING", 1, timeout_s=60)
            if powercut:
                end = time.monotonic() + 120
                while held_chunks(kit.state_dir, sha) < n_chunks // 2 and time.monotonic() < end:
                    time.sleep(0.005)
                dev.send_signal(signal.SIGKILL)
                dev.wait(10)
                out["held_at_kill"] = held_chunks(kit.state_dir, sha)
                dev = start_device(run, tmp)
                procs.append(dev)
                rs.pid = dev.pid
            done = events_wait("DOWNLOADED", 1, timeout_s=300)
            time.sleep(0.1)
        events_wait("COMMITTED", 1, timeout_s=120)
        out.update(
            download_s=done["seconds"],
            mb_fetched=round(done["bytes_fetched"] / 1e6, 1),
            mb_per_s=round(done["bytes_fetched"] / 1e6 / max(done["seconds"], 1e-6), 1),
            # from the (last) DOWNLOADING event to DOWNLOADED, by the device's clock
            device_rss_peak_mb=round(rs.peak_between(done["ts"] - done["seconds"], done["ts"]) / 1024, 1),
            publisher_rss_peak_mb=round(publisher_kb / 1024, 1),
            publish_s=round(publish_s, 2),
            chunks_fetched=done["chunks_fetched"],
            chunks_resumed=done["chunks_resumed"],
            committed=True,
        )
        events.close()
        if server is not None:
            out["server_rss_peak_mb"] = round(proc_kib(server.pid, "VmHWM") / 1024, 1)
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(20)
        if server is not None:
            server.kill()
            server.wait(10)
        if http is not None:
            http.stop()
        b.stop()


# -- deltas ------------------------------------------------------------------------


def c_source(variant: bool, n: int = 5200) -> str:
    r = random.Random(7)
    out = ["#include <stdint.h>", "static volatile uint32_t sink;"]
    for i in range(n):
        a, b, c = r.randrange(1, 1 << 30), r.randrange(1, 31), r.randrange(1, 1 << 20)
        body = (
            f"uint32_t x = s ^ {a}u; for (int k = 0; k < {b}; k++) "
            f"{{ x = (x << 3) ^ (x >> {b % 7 + 1}) ^ {c}u;"
            f" if (x & 1) x += {a % 977}u; else x ^= {c % 4093}u; }} return x + {i}u;"
        )
        if variant and i == n // 2:  # the one function that changed
            body = "uint32_t x = s * 2654435761u; x ^= x >> 13; x *= 0x5bd1e995u; return x ^ (x >> 15);"
        out.append(f"__attribute__((noinline)) uint32_t f{i}(uint32_t s) {{ {body} }}")
    out.append("typedef uint32_t (*fn)(uint32_t);")
    out.append("static const fn table[] = {" + ",".join(f"f{i}" for i in range(n)) + "};")
    out.append('__attribute__((export_name("dr_init"))) int32_t dr_init(void) { return 0; }')
    out.append(
        '__attribute__((export_name("dr_tick"))) int32_t dr_tick(void) '
        f"{{ static uint32_t t; t++; sink = table[t % {n}](t); return 0; }}"
    )
    return "\n".join(out)


def build(tmp: Path, variant: bool) -> bytes:
    src, out = tmp / f"app{int(variant)}.c", tmp / f"app{int(variant)}.wasm"
    src.write_text(c_source(variant))
    subprocess.run(
        ["clang", "--target=wasm32-wasi", "-O2", "-mexec-model=reactor", "-o", str(out), str(src)],
        check=True,
    )
    return out.read_bytes()


def delta(tmp: Path) -> dict[str, Any]:
    if shutil.which("clang") is None:
        return {"skipped": "clang not installed"}
    v1, v2 = build(tmp, False), build(tmp, True)
    unrelated = padded(9, 4242, len(v2))
    out: dict[str, Any] = {"module_bytes": len(v2)}
    for label, how in (("cdc", None), ("fixed64k", chunking.Chunking("fixed", fixed_bytes=64 * 1024))):
        b = Mosquitto(tmp / f"mosq-{label}").start()
        try:
            kit = Kit(tmp / f"dev-{label}", extra_config=f'\n[broker]\nurl = "{b.url}"\n')
            d = Daemon(kit.cfg)
            ev = Events(d)
            d.start()
            try:
                for seq, module in ((1, v1), (2, v2), (3, unrelated)):
                    fields = chunking.artifact_of(io.BytesIO(module), how or chunking.for_size(len(module)))
                    data = kit.bundle(module, seq, artifact=fields, trial_ticks=1)
                    operator.publish_bundle(parse_url(b.url), data, P)
                    done = ev.wait("DOWNLOADED", seq, timeout_s=120)
                    ev.wait("COMMITTED", seq, timeout_s=60)
                    if seq > 1:
                        key = f"{label}_{'one_function' if seq == 2 else 'unrelated'}"
                        out[key] = {
                            "bytes_fetched": done["bytes_fetched"],
                            "bytes_reused": done["bytes_reused"],
                            "fetched_pct": round(100 * done["bytes_fetched"] / len(module), 1),
                            "chunks": len(fields["chunks"]),
                        }
            finally:
                d.stop()
        finally:
            b.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=30)
    ap.add_argument("--sources", default="retained,mqtt,http")
    ap.add_argument("--skip-delta", action="store_true")
    ap.add_argument("--skip-powercut", action="store_true")
    args = ap.parse_args()
    results: dict[str, Any] = {"big": [], "powercut": None, "delta": None}
    with tempfile.TemporaryDirectory() as tmp:
        for source in args.sources.split(","):
            r = big(Path(tmp) / source, args.size_mb, source, powercut=False)
            print(json.dumps(r), flush=True)
            results["big"].append(r)
        if not args.skip_powercut:
            r = big(Path(tmp) / "powercut", args.size_mb, "http", powercut=True)
            print(json.dumps({"powercut": r}), flush=True)
            results["powercut"] = r
        if not args.skip_delta:
            results["delta"] = delta(Path(tmp))
            print(json.dumps({"delta": results["delta"]}), flush=True)


if __name__ == "__main__":
    main()
