"""Crash-injection harness: SIGKILL a real daemon during an update, restart it,
check the invariants. Runnable alone:

    python -m tests.crash_harness                 # default: every FS op + 120 random kills
    python -m tests.crash_harness --random 1000 --rounds 3   # long mode

Each iteration starts from a device that has committed version 1 (slot a)
and has version 2 waiting in its inbox, runs ``devicerunner run --once``,
and kills it:

(a) at file-system operations: the daemon runs under ``strace`` with
    ``inject=SYSCALL:signal=KILL:when=K``, for every mutating syscall kind
    (fsync, rename, unlink, mkdir, ...) and every K up to the number of such
    calls a full update makes (strace counts per thread: K is the K-th call
    of whichever thread reaches it first). The kernel delivers SIGKILL on
    entry to that call, so it never happens.
(b) at random instants: plain SIGKILL after a random delay within the
    duration of a full update.

After each kill the daemon is restarted (``run --once --json``) and must
show: state.json parses; the app runs a verified version, 1 or 2, never a
mix and never none (the running sequence equals the active slot's, whose
module matches its manifest and whose commit marker agrees); the update
ended committed, or cleanly rolled back (a trial interrupted by the kill
counts as a failed attempt); no temp files are left. Half the random kills
run on devices with ``trial_attempts = 1``, where a kill during the trial
rolls back; on the others (the default, 2) one kill must never burn the
good version 2. The harness prints how
many kills it did and how many invariant violations it found.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from devicerunner.runtime.fsutil import TMP_MARK
from devicerunner.update.slots import AppSlots
from devicerunner.update.state import AppState
from tests.devicekit import Kit

ROOT = Path(__file__).resolve().parent.parent
FS_SYSCALLS = (
    "fsync",
    "fdatasync",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "mkdir",
    "mkdirat",
)
PLAIN_WAT = """(module
  (import "log" "write" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "v%d")
  (func (export "dr_init") (result i32) (drop (call $log (i32.const 1) (i32.const 0) (i32.const 2))) (i32.const 0))
  (func (export "dr_tick") (result i32) (i32.const 0))
  (func (export "dr_health") (result i32) (i32.const 0)))"""


def _module(version: int) -> bytes:
    import wasmtime

    return bytes(wasmtime.wat2wasm(PLAIN_WAT % version))


@dataclass
class Result:
    kills: int = 0
    not_killed: int = 0
    violations: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    by_mode: Counter[str] = field(default_factory=Counter)


class Harness:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        kit = Kit(workdir / "template", bootstrap=None)
        self.kit = kit
        self.v2_bundle = kit.bundle(_module(2), 2, caps=["log"], trial_ticks=3, trial_seconds=0)
        v1 = kit.bundle(_module(1), 1, caps=["log"], trial_ticks=3, trial_seconds=0)
        (kit.state_dir / "inbox").mkdir(parents=True, exist_ok=True)
        (kit.state_dir / "inbox" / "v1.bundle").write_bytes(v1)
        r = self._run(kit.dir, ["--once"])
        st = AppSlots(kit.state_dir, "app").load()[0]
        if r.returncode != 0 or st.active_sequence != 1:
            raise RuntimeError(f"could not prepare version 1: {r.stderr[-2000:]}")

    def _cmd(self, dev: Path, extra: list[str]) -> list[str]:
        return [
            sys.executable,
            "-m",
            "devicerunner.cli.main",
            "run",
            "--config",
            str(dev / "device.toml"),
            "--for",
            "60",
            *extra,
        ]

    def _run(self, dev: Path, extra: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._cmd(dev, extra), capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )

    def fresh_device(self, name: str, attempts: int | None = None) -> Path:
        dev = self.workdir / name
        if dev.exists():
            shutil.rmtree(dev)
        shutil.copytree(self.kit.dir, dev)
        if attempts is not None:
            toml = dev / "device.toml"
            toml.write_text(
                toml.read_text().replace("[device]\n", f"[device]\ntrial_attempts = {attempts}\n", 1)
            )
        # device.toml uses relative paths (state, root.json), so the copy is self-contained
        (dev / "state" / "inbox" / "v2.bundle").write_bytes(self.v2_bundle)
        return dev

    # -- the two ways to kill ------------------------------------------------------

    def count_fs_ops(self) -> dict[str, int]:
        """Per syscall kind: the most calls any one thread makes in a full update."""
        dev = self.fresh_device("count")
        log = dev / "strace.log"
        subprocess.run(
            [
                "strace",
                "-f",
                "-qq",
                "-o",
                str(log),
                "-e",
                "trace=" + ",".join(FS_SYSCALLS),
                *self._cmd(dev, ["--once"]),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            check=True,
        )
        per: Counter[tuple[str, str]] = Counter()
        for line in log.read_text().splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and "(" in parts[1]:
                name = parts[1].split("(", 1)[0]
                if name in FS_SYSCALLS:
                    per[(parts[0], name)] += 1
        most: dict[str, int] = {}
        for (_tid, name), n in per.items():
            most[name] = max(most.get(name, 0), n)
        return most

    def kill_at_syscall(self, name: str, syscall: str, k: int) -> tuple[bool, float]:
        dev = self.fresh_device(name)
        t0 = time.monotonic()
        p = subprocess.run(
            [
                "strace",
                "-f",
                "-qq",
                "-o",
                "/dev/null",
                "-e",
                f"trace={syscall}",
                "-e",
                f"inject={syscall}:signal=KILL:when={k}",
                *self._cmd(dev, ["--once"]),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        return p.returncode in (-9, 137), time.monotonic() - t0

    def kill_at_random(self, name: str, delay_s: float, attempts: int | None = None) -> bool:
        dev = self.fresh_device(name, attempts)
        p = subprocess.Popen(
            self._cmd(dev, ["--once"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT
        )
        try:
            p.wait(timeout=delay_s)
            return False  # finished before the kill
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
            return True

    # -- invariants ----------------------------------------------------------------

    def check(self, name: str, one_attempt: bool = False) -> tuple[list[str], str]:
        dev = self.workdir / name
        state_dir = dev / "state"
        problems: list[str] = []
        state_file = state_dir / "apps" / "app" / "state.json"
        try:
            AppState.from_json(state_file.read_bytes())  # atomic writes: never torn
        except (OSError, ValueError, TypeError) as e:
            problems.append(f"state.json unreadable right after the kill: {e}")
        r = self._run(dev, ["--once", "--json"])
        if r.returncode != 0:
            return [*problems, f"restart failed (exit {r.returncode}): {r.stderr[-500:]}"], "restart-failed"
        status = json.loads(r.stdout)["apps"]["app"]
        slots = AppSlots(state_dir, "app")
        st, why = slots.load()
        if why:
            problems.append(f"state.json had to be rebuilt: {why}")
        running = status.get("sequence")
        if not status.get("running") or running not in (1, 2):
            problems.append(f"app not running a known version: running={status.get('running')} seq={running}")
        if st.active is None or slots.read_slot(st.active) is None:
            problems.append(f"active slot {st.active} missing or fails its integrity check")
        elif slots.committed_sequence(st.active) != st.active_sequence:
            problems.append(
                f"commit marker {slots.committed_sequence(st.active)} != state {st.active_sequence}"
            )
        if running != st.active_sequence:
            problems.append(f"running sequence {running} != active slot sequence {st.active_sequence}")
        if st.phase == "COMMITTED" and st.active_sequence == 2:
            outcome = "committed"
        elif st.phase == "ROLLED_BACK" and st.active_sequence == 1 and "2" in st.bad_sequences:
            outcome = "rolled_back"
        else:
            outcome = "unsettled"
            problems.append(
                f"update neither committed nor rolled back: phase={st.phase} seq={st.active_sequence}"
            )
        if outcome == "rolled_back" and not one_attempt:
            problems.append(f"one kill burnt the good version 2: {st.last_error}")
        if st.pending is not None:
            problems.append(f"a pending slot remains after settling: {st.pending}")
        leftovers = [str(p) for p in state_dir.rglob(f"*{TMP_MARK}*")]
        if leftovers:
            problems.append(f"temp files left: {leftovers[:3]}")
        return problems, outcome


def run(fs_rounds: int, random_kills: int, workers: int, seed: int, out=None) -> Result:  # type: ignore[no-untyped-def]
    out = out or sys.stdout  # looked up now: a default bound at import would miss pytest's capture
    rng = random.Random(seed)
    res = Result()
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dr-crash-") as tmp:
        h = Harness(Path(tmp))
        jobs: list[tuple[str, str, int | float]] = []
        if fs_rounds:
            if shutil.which("strace") is None:
                print("crash harness: strace not found; FS-operation kills (mode a) not run", file=out)
            else:
                ops = h.count_fs_ops()
                print(f"crash harness: FS operations in one update (most per thread): {dict(ops)}", file=out)
                for _ in range(fs_rounds):
                    for syscall, n in sorted(ops.items()):
                        jobs += [("fs", syscall, k) for k in range(1, n + 1)]
        t0 = time.monotonic()
        h._run(h.fresh_device("timing"), ["--once"])
        full_s = time.monotonic() - t0
        jobs += [("random", "", rng.uniform(0.05, full_s)) for _ in range(random_kills)]

        def one(i: int) -> tuple[str, bool, list[str], str]:
            kind, syscall, arg = jobs[i]
            one_attempt = False
            name = f"it{i}"
            if kind == "fs":
                killed, _ = h.kill_at_syscall(name, syscall, int(arg))
            else:
                one_attempt = i % 2 == 0
                killed = h.kill_at_random(name, float(arg), 1 if one_attempt else None)
            problems, outcome = h.check(name, kind == "random" and one_attempt)
            shutil.rmtree(h.workdir / name, ignore_errors=True)
            tag = f"{kind}:{syscall}#{arg}" if kind == "fs" else f"random@{float(arg):.3f}s"
            return kind, killed, [f"{tag}: {p}" for p in problems], outcome

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for kind, killed, problems, outcome in pool.map(one, range(len(jobs))):
                if killed:
                    res.kills += 1
                    res.by_mode[kind] += 1
                else:
                    res.not_killed += 1
                res.violations += problems
                res.outcomes[outcome] += 1
    dur = time.monotonic() - t_start
    print(
        f"crash harness: {res.kills} kills {dict(res.by_mode)} "
        f"({res.not_killed} runs finished before their kill point), "
        f"{len(res.violations)} invariant violations, outcomes {dict(res.outcomes)}, {dur:.0f} s",
        file=out,
    )
    for v in res.violations[:20]:
        print(f"  VIOLATION {v}", file=out)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=1, help="passes over every FS operation (mode a)")
    p.add_argument("--random", type=int, default=120, help="random-instant kills (mode b)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    res = run(a.rounds, a.random, a.workers, a.seed)
    return 1 if res.violations else 0


if __name__ == "__main__":
    sys.exit(main())
