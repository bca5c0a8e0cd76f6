"""The README and docs/operations.md run as written.

Every ```sh block of README.md, then of docs/operations.md, runs in order in
a fresh copy of the repository (the files git tracks, plus untracked ones
not ignored: what a fresh clone of this tree holds), with ``devicerunner``
on PATH running this tree's code. The rules, so a reader can predict what
is checked:

- A block preceded by ``<!-- flows: skip: REASON -->`` is not run (the
  reason is required). Blocks in other languages (toml, conf, ini) are
  files shown, not commands.
- Each command (a line, with ``\\`` continuations and ``<<'EOF'`` here-
  documents) runs in bash from the copy's top directory; it must exit 0.
- A command ending in ``&`` runs in the background (the broker, the
  daemon) until the test ends; the next command starts once it has printed
  its first line, and a command naming ``--broker URL`` once that port
  accepts connections (a person typing the next command is never faster
  than a broker starting; the test is).
- The only substitution: port 1883 becomes a free loopback port, so the
  test never meets another broker.
- A comment after a command (or on the line after it) promises an outcome.
  Every promise has a pattern in OUTCOMES that the command's output must
  match; status commands are re-run until it does (bounded), since the
  device gets there by itself. A promise without a pattern fails the test.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.brokers import free_port, wait_port
from tests.conftest import ROOT

DOCS = ("README.md", "docs/operations.md")

OUTCOMES = {
    "OK: thermostat 1.1.0 (sequence 1)": r"OK: thermostat 1\.1\.0 \(sequence 1\)",
    "queued; no daemon is running": r"queued .*no daemon is running",
    "takes it: STAGED -> TRIAL -> COMMITTED, then exits": r"thermostat: 1\.1\.0 .*COMMITTED",
    "thermostat: 1.1.0 (sequence 1, slot a), phase COMMITTED": r"thermostat: 1\.1\.0 \(sequence 1.*COMMITTED",
    "dev-1 ... thermostat 1.2.0  2  COMMITTED": r"dev-1 .*thermostat\s+1\.2\.0\s+2\s+COMMITTED",
    "... 1.2.0  2  ROLLED_BACK  dr_init failed: ...": r"thermostat\s+1\.2\.0\s+2\s+ROLLED_BACK\s.*\bdr_init failed",
    'reply from dev-1: {"re":"ping","temp":...,"fan":...,"manual":-1,"setpoint":22.0,"config":0}': (
        r'reply from dev-1: \{"re":"ping",.*"manual":-1,"setpoint":22\.0,"config":0\}'
    ),
    'reply from dev-1: {"re":"fan",...,"manual":1,...}': r'reply from dev-1: \{"re":"fan",.*"manual":1,',
    '"root_version": 3': r'"root_version": 3\b',
    "dev-1 ... CONFIG v1 COMMITTED": r"dev-1 .*\sv1 COMMITTED\b",
    'reply from dev-1: {"re":"ping",...,"setpoint":21.5,"config":1}': (
        r'reply from dev-1: \{"re":"ping",.*"setpoint":21\.5,"config":1\}'
    ),
    "PAUSED at ...%: 1 of 1 devices failed (100% > 10%)  1 x rpi4: trial_failed  exit status 1": (
        r"PAUSED at (50|100)%: 1 of 1 devices failed \(100% > 10%\)\s+1 x rpi4: trial_failed"
        r"[\s\S]*rollout: exit status 1\b"
    ),
    "dev-1 ... CONFIG v1 ROLLED_BACK": r"dev-1 .*\sv1 ROLLED_BACK\b",
    "config v1, ROLLED_BACK, refused: v2 (with config v2: dr_init failed)": (
        r"config v1, ROLLED_BACK, refused: v2\s+config error: with config v2: dr_init failed"
    ),
    "... completed: 1 committed": r"completed: 1 committed",
    "dev-2 ... 1.2.0  2  COMMITTED": r"dev-2 .*thermostat\s+1\.2\.0\s+2\s+COMMITTED",
}
"""Each promise a comment makes -> the pattern its command's output must show."""

RERUN = re.compile(r"\bdevicerunner (fleet )?status ")
"""Commands that show state the device reaches by itself: re-run until it shows."""

RERUN_S = 90.0
COMMAND_S = 240.0
READY_S = 30.0

BROKER_URL = re.compile(r"--broker mqtts?://(?:[^@\s]*@)?[^:/\s]+:(\d+)")

SKIP = re.compile(r"<!--\s*flows:\s*skip:\s*(\S.*?)\s*-->")
HEREDOC = re.compile(r"<<-?\s*'?(\w+)'?")


@dataclass
class Command:
    where: str
    text: str
    background: bool = False
    promise: str | None = None


def sh_blocks(path: Path) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every ```sh block not marked skip."""
    lines = path.read_text().splitlines()
    out: list[tuple[int, list[str]]] = []
    skip_next = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if SKIP.search(line):
            skip_next = True
        elif line.startswith("```"):
            lang = line[3:].strip()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if lang == "sh" and not skip_next:
                out.append((i + 2, lines[i + 1 : end]))
            skip_next = False
            i = end
        elif line.strip():
            skip_next = False
        i += 1
    return out


def commands(doc: str, first: int, lines: list[str]) -> list[Command]:
    out: list[Command] = []
    i = 0
    while i < len(lines):
        where = f"{doc}:{first + i}"
        line = lines[i]
        i += 1
        if not line.strip():
            continue
        if line.lstrip().startswith("#"):
            assert out and out[-1].promise is None, f"{where}: a comment that follows no command"
            out[-1].promise = line.lstrip("# ").strip()
            continue
        text = line
        while text.endswith("\\") and i < len(lines):
            text = text[:-1] + " " + lines[i].strip()
            i += 1
        promise = None
        m = HEREDOC.search(text)
        if m:
            body = []
            while lines[i] != m.group(1):
                body.append(lines[i])
                i += 1
            i += 1
            text = "\n".join([text, *body, m.group(1)])
        else:
            parts = re.split(r"\s+#\s+", text, maxsplit=1)
            if len(parts) == 2:
                text, promise = parts[0], parts[1].strip()
        text = text.rstrip()
        background = text.endswith("&") and not text.endswith("&&")
        out.append(Command(where, text.rstrip("&").rstrip() if background else text, background, promise))
    return out


def all_commands() -> list[Command]:
    out: list[Command] = []
    for doc in DOCS:
        for first, lines in sh_blocks(ROOT / doc):
            out.extend(commands(doc, first, lines))
    return out


def fresh_copy(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / os.fsdecode(name)
        if not src.is_file():  # deleted in the work tree, not yet committed
            continue
        target = dest / os.fsdecode(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes())
        target.chmod(src.stat().st_mode & 0o777)


def entry_point_shim(bindir: Path) -> None:
    """``devicerunner`` on PATH, as pyproject's [project.scripts] defines it."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["devicerunner"].split(":")
    bindir.mkdir()
    shim = bindir / "devicerunner"
    shim.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" -c '
        f"'import sys; from {module} import {func}; sys.exit({func}())' \"$@\"\n"
    )
    shim.chmod(0o755)


def test_every_promise_in_the_docs_has_a_check() -> None:
    cmds = all_commands()
    assert cmds, "no sh blocks found"
    unchecked = [f"{c.where}: {c.promise}" for c in cmds if c.promise and c.promise not in OUTCOMES]
    assert not unchecked, "promises with no pattern in OUTCOMES:\n" + "\n".join(unchecked)
    stale = set(OUTCOMES) - {c.promise for c in cmds}
    assert not stale, f"OUTCOMES no doc promises any more: {stale}"


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs a git checkout to copy")
def test_readme_and_operations_flows_run_as_written(tmp_path: Path) -> None:
    work = tmp_path / "clone"
    fresh_copy(work)
    entry_point_shim(tmp_path / "bin")
    (tmp_path / "home").mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DR_", "PYTEST", "COV_"))} | {
        "PATH": f"{tmp_path / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "PYTHONPATH": str(work),
        "HOME": str(tmp_path / "home"),
    }
    background: list[tuple[Command, subprocess.Popen[bytes], Path]] = []

    def run(c: Command, n: int) -> tuple[int, str]:
        out = tmp_path / f"cmd-{n}.out"
        text = re.sub(r"\b1883\b", str(port), c.text)
        with open(out, "wb") as f:
            p = subprocess.run(
                ["bash", "-c", text], cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=COMMAND_S
            )
        return p.returncode, out.read_text(errors="replace")

    def context() -> str:
        return "".join(
            f"\n--- background {c.where} ({c.text[:60]}):\n{log.read_text(errors='replace')[-3000:]}"
            for c, _, log in background
        )

    try:
        for n, c in enumerate(all_commands()):
            if c.background:
                log = tmp_path / f"bg-{n}.out"
                with open(log, "wb") as f:
                    p = subprocess.Popen(
                        ["bash", "-c", "exec " + re.sub(r"\b1883\b", str(port), c.text)],
                        cwd=work,
                        env=env,
                        stdout=f,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                background.append((c, p, log))
                end = time.monotonic() + READY_S
                while not log.stat().st_size and p.poll() is None and time.monotonic() < end:
                    time.sleep(0.05)
                assert p.poll() is None, f"{c.where}: {c.text!r} exited ({p.returncode}){context()}"
                assert log.stat().st_size, f"{c.where}: {c.text!r} printed nothing in {READY_S} s"
                continue
            for port_text in BROKER_URL.findall(re.sub(r"\b1883\b", str(port), c.text)):
                wait_port(int(port_text), READY_S)
            want = OUTCOMES.get(c.promise or "")
            end = time.monotonic() + (RERUN_S if RERUN.search(c.text) else 0)
            while True:
                rc, output = run(c, n)
                ok = rc == 0 and (want is None or re.search(want, output) is not None)
                if ok or time.monotonic() >= end:
                    break
                time.sleep(0.5)
            assert rc == 0, f"{c.where}: {c.text!r} exited {rc}:\n{output}{context()}"
            assert ok, f"{c.where}: {c.text!r} did not show {want!r}:\n{output}{context()}"
    finally:
        for _, p, _ in reversed(background):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(10)
