"""A compile bomb on a device with little memory: what happens to the daemon.

A signed release whose module is ``--functions`` trivial functions (a valid
app, ~6 bytes a function on the wire, ~5 KB of compiler memory each) is put
in the inbox of a real daemon process (``devicerunner run --once``) that
runs in a memory cgroup capped at ``--device-memory`` (a small device), the
way systemd's ``MemoryMax=`` would. The run is repeated ``--boots`` times,
as ``Restart=always`` would. Reported per boot: exit status, wall time, the
daemon's peak RSS, the cgroup's peak, and the app's phase on disk after it.

    python -m bench.compile_bomb                     # the module reaches the compiler
    python -m bench.compile_bomb --default-policy    # max_module_bytes left at its
                                                     # default (also: older checkouts)

Needs root and a cgroup v1 memory controller (as on the CI machines); it
says so and exits otherwise. Takes ~1 minute and up to --device-memory of RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import proc_kib
from devicerunner.trust import bundle
from devicerunner.update.slots import AppSlots
from tests.devicekit import Kit
from tests.wasmgen import many_functions

ROOT = Path(__file__).resolve().parent.parent


def _cgroup_base() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrl, path = line.split(":", 2)
        if "memory" in ctrl.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            return base if (base / "cgroup.procs").exists() else None
    return None


def boot(cg: Path, kit: Kit, timeout_s: float) -> dict[str, object]:
    cmd = [sys.executable, "-m", "devicerunner.cli.main", "run", "--config", str(kit.config_path)]
    cmd += ["--once", "--for", str(timeout_s)]
    wrapped = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh", *cmd]
    (cg / "memory.max_usage_in_bytes").write_text("0")
    t0 = time.monotonic()
    p = subprocess.Popen(wrapped, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    end = t0 + timeout_s + 60
    while p.poll() is None and time.monotonic() < end:  # bounded: --for plus a margin
        peak = max(peak, proc_kib(p.pid, "VmHWM"))
        time.sleep(0.05)
    if p.poll() is None:
        p.kill()
    _, err = p.communicate(timeout=30)
    st, _ = AppSlots(kit.state_dir, "app").load()
    return {
        "exit": p.returncode,
        "seconds": round(time.monotonic() - t0, 1),
        "daemon_peak_rss_mb": round(peak / 1024),
        "cgroup_peak_mb": round(int((cg / "memory.max_usage_in_bytes").read_text()) / 2**20),
        "phase": st.phase,
        "trial_attempts": st.trial_attempts,
        "last_error": (st.last_error or "")[:160],
        "stderr_tail": err.decode(errors="replace").strip().splitlines()[-1:],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--functions", type=int, default=999_990)  # wasmparser allows 1M
    ap.add_argument("--device-memory", type=int, default=2 * 1024**3, help="cgroup memory cap, bytes")
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument(
        "--default-policy", action="store_true", help="leave max_module_bytes at its default (4 MiB)"
    )
    a = ap.parse_args()
    base = _cgroup_base()
    if os.geteuid() != 0 or base is None:
        print("compile_bomb: needs root and a cgroup v1 memory controller; not measured")
        return 2
    cg = base / f"dr-bomb-{os.getpid()}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(a.device_memory))
        with tempfile.TemporaryDirectory(prefix="dr-bomb-") as tmp:
            kit = Kit(Path(tmp) / "dev")
            toml = kit.config_path.read_text()
            if not a.default_policy:  # let the bomb through the module-size ceiling to reach the compiler
                toml = toml.replace("[apps.app]\n", "[apps.app]\nmax_module_bytes = 67108864\n", 1)
            kit.config_path.write_text(toml)
            module = many_functions(a.functions)
            data = kit.bundle(module, 1, chunk_size=120 * 1024)
            bundle.unpack(data)
            inbox = kit.state_dir / "inbox"
            inbox.mkdir(parents=True)
            (inbox / "bomb.bundle").write_bytes(data)
            mb, cap = len(module) / 1e6, a.device_memory >> 20
            print(f"module: {a.functions} functions, {mb:.1f} MB; device memory {cap} MiB")
            for i in range(a.boots):
                r = boot(cg, kit, a.timeout)
                print(f"boot {i + 1}: " + json.dumps(r))
                if r["phase"] in ("ROLLED_BACK", "COMMITTED", "REJECTED") and r["exit"] == 0:
                    break
    finally:
        for _ in range(50):  # the cgroup can be removed once its last process is gone
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
