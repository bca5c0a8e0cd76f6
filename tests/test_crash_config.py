"""Power loss at any instant of a config update leaves the app on a verified config.

A real daemon process (``run --once``) takes config v2 from its inbox while
running config v1, and is SIGKILLed at every mutating file-system call of
that update (strace syscall fault injection, as tests/crash_harness.py does
for releases) and at random instants. After each kill it is restarted and
must show: config state.json parses; the app runs config 1 or 2, never
none, and the document it runs is the one the state pins (sha256); the
update ended committed, or rolled back with v2 refused; nothing is left
staged; no temp files.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from devicerunner.runtime.fsutil import TMP_MARK
from devicerunner.update.config_state import ConfigState
from devicerunner.update.config_updates import ConfigFiles
from tests.crash_harness import FS_SYSCALLS
from tests.devicekit import Kit
from tests.test_appconfig import CONFIGURED_WAT, QUICK

ROOT = Path(__file__).resolve().parent.parent


def cmd(dev: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "devicerunner.cli.main",
        "run",
        "--config",
        str(dev / "device.toml"),
        *extra,
    ]


def run_once(dev: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd(dev, "--once", "--for", "60", *extra), capture_output=True, text=True, cwd=ROOT)


class ConfigCrash:
    def __init__(self, workdir: Path) -> None:
        import wasmtime

        self.workdir = workdir
        boot = workdir / "configured.wasm"
        boot.write_bytes(bytes(wasmtime.wat2wasm(CONFIGURED_WAT)))
        # one attempt, so that kills during a trial exercise the rollback (the default 2 retries once)
        self.kit = Kit(workdir / "template", bootstrap=str(boot), device_extra="trial_attempts = 1")
        inbox = self.kit.state_dir / "inbox"
        inbox.mkdir(parents=True)
        (inbox / "v1.config").write_bytes(self.kit.config(1, {"limit": "3"}, health=QUICK))
        r = run_once(self.kit.dir)
        if r.returncode != 0 or ConfigFiles(self.kit.state_dir, "app").load().active_version != 1:
            raise RuntimeError(f"could not commit config v1: {r.stderr[-2000:]}")
        self.v2 = self.kit.config(2, {"limit": "4"}, health=QUICK)

    def fresh(self, name: str) -> Path:
        dev = self.workdir / name
        shutil.copytree(self.kit.dir, dev)  # device.toml paths are relative: the copy stands alone
        (dev / "state" / "inbox" / "v2.config").write_bytes(self.v2)
        return dev

    def count_fs_ops(self) -> dict[str, int]:
        dev = self.fresh("count")
        log = dev / "strace.log"
        subprocess.run(
            ["strace", "-f", "-qq", "-o", str(log), "-e", "trace=" + ",".join(FS_SYSCALLS),
             *cmd(dev, "--once", "--for", "60")],
            capture_output=True, cwd=ROOT, check=True, timeout=120,
        )  # fmt: skip
        per: Counter[tuple[str, str]] = Counter()
        for line in log.read_text().splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and "(" in parts[1] and parts[1].split("(", 1)[0] in FS_SYSCALLS:
                per[(parts[0], parts[1].split("(", 1)[0])] += 1
        most: dict[str, int] = {}
        for (_tid, syscall), n in per.items():
            most[syscall] = max(most.get(syscall, 0), n)
        shutil.rmtree(dev)
        return most

    def kill_at(self, name: str, syscall: str, k: int) -> bool:
        dev = self.fresh(name)
        p = subprocess.run(
            ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
             "-e", f"inject={syscall}:signal=KILL:when={k}", *cmd(dev, "--once", "--for", "60")],
            capture_output=True, cwd=ROOT, timeout=120,
        )  # fmt: skip
        return p.returncode in (-9, 137)

    def kill_after(self, name: str, delay_s: float) -> bool:
        dev = self.fresh(name)
        p = subprocess.Popen(cmd(dev, "--once", "--for", "60"), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            p.wait(timeout=delay_s)
            return False
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait(30)
            return True

    def check(self, name: str) -> tuple[list[str], str]:
        dev = self.workdir / name
        state_dir = dev / "state"
        problems: list[str] = []
        try:
            ConfigState.from_json((state_dir / "apps" / "app" / "config" / "state.json").read_bytes())
        except (OSError, ValueError, TypeError) as e:
            problems.append(f"config state unreadable right after the kill: {e}")
        r = run_once(dev, "--json")
        if r.returncode != 0:
            return [*problems, f"restart failed ({r.returncode}): {r.stderr[-300:]}"], "restart-failed"
        app = json.loads(r.stdout)["apps"]["app"]
        files = ConfigFiles(state_dir, "app")
        st = files.load()
        if not app.get("running"):
            problems.append("app not running after the restart")
        if st.active_version not in (1, 2) or files.read_doc(st.active_version, st.active_sha256) is None:
            problems.append(f"active config v{st.active_version} missing or not the one the state pins")
        if app["config"]["version"] != st.active_version:
            problems.append(f"status says config v{app['config']['version']}, state v{st.active_version}")
        if st.candidate_version is not None:
            problems.append(f"config v{st.candidate_version} still staged after settling ({st.phase})")
        if st.active_version == 2 and st.phase == "COMMITTED":
            outcome = "committed"
        elif st.active_version == 1 and 2 in st.bad:
            outcome = "rolled_back"
        else:
            outcome = "unsettled"
            problems.append(f"neither committed nor rolled back: v{st.active_version} {st.phase}")
        leftovers = [str(p) for p in state_dir.rglob(f"*{TMP_MARK}*")]
        if leftovers:
            problems.append(f"temp files left: {leftovers[:3]}")
        return problems, outcome


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (scripts/test installs it)")
def test_sigkill_at_every_fs_operation_of_a_config_update_never_leaves_the_app_without_a_verified_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h = ConfigCrash(tmp_path)
    ops = h.count_fs_ops()
    jobs: list[tuple[str, str, float]] = [
        ("fs", s, k) for s, n in sorted(ops.items()) for k in range(1, n + 1)
    ]
    t0 = time.monotonic()
    run_once(h.fresh("timing"))
    full_s = time.monotonic() - t0
    rng = random.Random(20261123)
    jobs += [("random", "", rng.uniform(0.05, full_s)) for _ in range(20)]

    def one(i: int) -> tuple[str, bool, list[str], str]:
        kind, syscall, arg = jobs[i]
        name = f"it{i}"
        killed = h.kill_at(name, syscall, int(arg)) if kind == "fs" else h.kill_after(name, arg)
        problems, outcome = h.check(name)
        shutil.rmtree(tmp_path / name, ignore_errors=True)
        tag = f"{syscall}#{int(arg)}" if kind == "fs" else f"random@{arg:.2f}s"
        return kind, killed, [f"{tag}: {p}" for p in problems], outcome

    kills: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    violations: list[str] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for kind, killed, problems, outcome in pool.map(one, range(len(jobs))):
            kills[kind] += killed
            outcomes[outcome] += 1
            violations += problems
    with capsys.disabled():
        print(
            f"\nconfig crash: FS operations of one config update {ops}; kills {dict(kills)} of {len(jobs)} "
            f"runs; outcomes {dict(outcomes)}; {len(violations)} violations"
        )
    assert violations == []
    assert kills["fs"] >= 8  # every mutating FS operation of a config update, at least
    assert outcomes["committed"] > 0 and outcomes["rolled_back"] > 0
