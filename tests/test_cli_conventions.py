"""CLI conventions every command follows (README.md, "Exit statuses"):
one error format without Python class names, one exit-code table, --json
where a result is reported, help with defaults, quiet on a closed pipe;
and the device-side checks of `install` and `run`."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devicerunner.cli.main import build_parser
from tests.conftest import EXAMPLES, ROOT, run_cli
from tests.devicekit import Kit, counter_module

CAPS = "log,clock,sensors,actuators,kv,telemetry,wasi,messages,config"


def _parsers(
    p: argparse.ArgumentParser, path: str = "devicerunner"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    # argparse has no public way to list subcommands; its action list is the only map.
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def _kit(tmp_path: Path, **kw: object) -> Kit:
    return Kit(tmp_path / "dev", **kw)  # type: ignore[arg-type]


def _bundle(kit: Kit, path: Path, sequence: int = 1) -> Path:
    path.write_bytes(kit.bundle(counter_module(2), sequence))
    return path


def _inbox(kit: Kit) -> list[Path]:
    d = kit.state_dir / "inbox"
    return sorted(d.glob("*.bundle")) if d.exists() else []


# -- device side: run and install -------------------------------------------------


def test_missing_trust_root_is_a_startup_error_naming_the_resolved_path(tmp_path: Path) -> None:
    kit = _kit(tmp_path)
    (kit.dir / "root.json").unlink()  # device.toml says trust_root = "root.json"
    want = str((kit.dir / "root.json").resolve())
    r = run_cli("run", "--config", str(kit.config_path), "--once", "--for", "5")
    assert r.returncode == 2, r.stdout + r.stderr
    assert want in r.stderr and "does not exist" in r.stderr
    i = run_cli("install", str(_bundle(kit, tmp_path / "a.bundle")), "--config", str(kit.config_path))
    assert i.returncode == 2 and want in i.stderr
    assert not _inbox(kit)


def test_install_refuses_a_bundle_for_other_hardware_and_queues_nothing(tmp_path: Path) -> None:
    kit = _kit(tmp_path)
    other = Kit(tmp_path / "other", release_keys=kit.release_keys, root_key=kit.root_key, hardware="stb-9000")
    r = run_cli("install", str(_bundle(other, tmp_path / "b.bundle")), "--config", str(kit.config_path))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "stb-9000" in r.stderr and r.stderr.startswith("devicerunner: error:")
    assert not _inbox(kit)


def test_install_refuses_a_bundle_the_devices_root_did_not_sign(tmp_path: Path) -> None:
    kit = _kit(tmp_path)
    stranger = Kit(tmp_path / "stranger")
    r = run_cli("install", str(_bundle(stranger, tmp_path / "s.bundle")), "--config", str(kit.config_path))
    assert r.returncode == 1 and "signature" in r.stderr
    assert not _inbox(kit)


def test_install_says_no_daemon_is_running(tmp_path: Path) -> None:
    kit = _kit(tmp_path)
    r = run_cli("install", str(_bundle(kit, tmp_path / "a.bundle")), "--config", str(kit.config_path))
    assert r.returncode == 0, r.stderr
    assert "no daemon is running" in r.stdout
    assert len(_inbox(kit)) == 1


def test_install_sees_a_running_daemon_by_its_lock(tmp_path: Path) -> None:
    kit = _kit(tmp_path)
    kit.state_dir.mkdir(parents=True, exist_ok=True)
    # The daemon's contract: an exclusive flock on <state_dir>/lock for its lifetime.
    fd = os.open(kit.state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        r = run_cli(
            "install", str(_bundle(kit, tmp_path / "a.bundle")), "--config", str(kit.config_path), "--json"
        )
    finally:
        os.close(fd)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["daemon"] == "running" and out["app"] == "app" and out["sequence"] == 1
    after = run_cli(
        "install", str(_bundle(kit, tmp_path / "b.bundle", 2)), "--config", str(kit.config_path), "--json"
    )
    assert json.loads(after.stdout)["daemon"] == "stopped"  # lock file there, nobody holds it


# -- errors and exit codes ------------------------------------------------------------


def test_errors_name_the_cause_not_a_python_class(tmp_path: Path) -> None:
    bad = run_cli("keygen", "a/b", "--dir", str(tmp_path))
    garbage = tmp_path / "garbage.wasm"
    garbage.write_bytes(b"\0asm\x01\0\0\0\xff")
    app = run_cli("app", "run", str(garbage))
    for r in (bad, app):
        assert r.stderr.startswith("devicerunner: error: "), r.stderr
        assert "Error:" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert bad.returncode == 1 and app.returncode == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["install", "{missing}", "--config", "{config}"],
        ["status", "--config", "{missing}"],
        ["run", "--config", "{missing}", "--once"],
        ["verify", "{missing}", "--root", "{root}"],
        ["verify", "{bundle}", "--root", "{missing}"],
        ["app", "run", "{missing}"],
        ["sign", "{missing}", "--app", "a", "--version", "1", "--sequence", "1", "--grant", "log",
         "--hardware", "x", "--key", "{key}", "-o", "{out}"],
        ["sign", str(EXAMPLES / "blink.wat"), "--app", "a", "--version", "1", "--sequence", "1",
         "--grant", "log,actuators", "--hardware", "x", "--key", "{missing}", "-o", "{out}"],
        ["cosign", "{missing}", "--root", "{root}", "--key", "{key}"],
        ["publish", "{missing}", "--broker", "mqtt://127.0.0.1:9"],
        ["trust", "publish", "{missing}", "--broker", "mqtt://127.0.0.1:9"],
        ["trust", "rotate", "--current", "{missing}", "--sign", "{key}", "-o", "{out}"],
        ["rollout", "{missing}", "--broker", "mqtt://127.0.0.1:9", "--key", "{key}"],
    ],
)  # fmt: skip
def test_a_missing_file_is_exit_2_for_every_command(tmp_path: Path, argv: list[str]) -> None:
    kit = _kit(tmp_path)
    key = tmp_path / "k"
    assert run_cli("keygen", "k", "--dir", str(tmp_path)).returncode == 0
    values = {
        "missing": str(tmp_path / "no-such-file"),
        "config": str(kit.config_path),
        "root": str(kit.dir / "root.json"),
        "bundle": str(_bundle(kit, tmp_path / "a.bundle")),
        "key": f"{key}.key",
        "out": str(tmp_path / "out"),
    }
    r = run_cli(*[a.format(**values) for a in argv])
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no-such-file" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.startswith("devicerunner: error: ")


def test_closed_stdout_ends_the_command_quietly_with_141() -> None:
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devicerunner.cli.main",
            "app",
            "run",
            str(EXAMPLES / "blink.wat"),
            "--ticks",
            "100000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert p.stdout is not None and p.stderr is not None
    assert p.stdout.readline().startswith(b"[blink]")
    p.stdout.close()  # what `| head -1` does
    err = p.stderr.read()
    assert p.wait(60) == 141
    assert err == b""


# -- help, --json ---------------------------------------------------------------------


def test_every_option_has_help_and_shows_its_default() -> None:
    missing, no_default = [], []
    for path, p in _parsers(build_parser()):
        text = " ".join(p.format_help().split())
        for a in p._actions:
            if isinstance(a, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction):
                continue
            if a.help == argparse.SUPPRESS:
                continue
            name = a.option_strings[-1] if a.option_strings else a.dest
            if not a.help:
                missing.append(f"{path} {name}")
            elif (
                a.option_strings
                and a.default not in (None, False, [])
                and f"default: {a.default}" not in text
            ):
                no_default.append(f"{path} {name} (default {a.default!r})")
    assert not missing, "options without help:\n" + "\n".join(missing)
    assert not no_default, "defaults not shown:\n" + "\n".join(no_default)


def test_every_command_that_reports_a_result_has_json() -> None:
    reporting = {
        "devicerunner app run", "devicerunner run", "devicerunner keygen", "devicerunner trust init",
        "devicerunner trust rotate", "devicerunner trust publish", "devicerunner sign",
        "devicerunner cosign", "devicerunner verify", "devicerunner install", "devicerunner status",
        "devicerunner publish", "devicerunner gc", "devicerunner fleet status", "devicerunner rollout",
        "devicerunner sensors list", "devicerunner sensors read", "devicerunner sim",
    }  # fmt: skip
    parsers = dict(_parsers(build_parser()))
    assert reporting <= set(parsers), reporting - set(parsers)
    without = sorted(c for c in reporting if "--json" not in parsers[c].format_help())
    assert not without, f"no --json: {without}"


# -- operator commands: roles -------------------------------------------------------


def test_trust_init_without_a_rollout_key_warns_and_with_one_lists_it(tmp_path: Path) -> None:
    for name in ("root", "rel", "rollout"):
        assert run_cli("keygen", name, "--dir", str(tmp_path)).returncode == 0
    base = ["trust", "init", "--root-key", f"{tmp_path}/root.pub", "--release-key", f"{tmp_path}/rel.pub",
            "--sign", f"{tmp_path}/root.key"]  # fmt: skip
    without = run_cli(*base, "-o", str(tmp_path / "a.json"))
    assert without.returncode == 0
    assert "warning: the rollout role has no keys" in without.stderr
    with_key = run_cli(
        *base, "--rollout-key", f"{tmp_path}/rollout.pub", "-o", str(tmp_path / "b.json"), "--json"
    )
    assert with_key.returncode == 0 and "rollout role has no keys" not in with_key.stderr
    assert json.loads(with_key.stdout)["roles"]["rollout"] == {"threshold": 1, "keys": 1}


def test_cosign_refuses_a_root_key(tmp_path: Path) -> None:
    for name in ("root", "rel1", "rel2"):
        assert run_cli("keygen", name, "--dir", str(tmp_path)).returncode == 0
    r = run_cli("trust", "init", "--root-key", f"{tmp_path}/root.pub", "--release-key", f"{tmp_path}/rel1.pub",
                "--release-key", f"{tmp_path}/rel2.pub", "--release-threshold", "2",
                "--sign", f"{tmp_path}/root.key", "-o", str(tmp_path / "root.json"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = tmp_path / "x.bundle"
    r = run_cli("sign", str(EXAMPLES / "thermostat.wasm"), "--app", "thermostat", "--version", "1.0.0",
                "--sequence", "1", "--grant", CAPS, "--hardware", "rpi4", "--key", f"{tmp_path}/rel1.key",
                "-o", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    before = out.read_bytes()
    r = run_cli("cosign", str(out), "--root", str(tmp_path / "root.json"), "--key", f"{tmp_path}/root.key")
    assert r.returncode == 1 and "not a release key" in r.stderr and "root key" in r.stderr
    assert out.read_bytes() == before
    r = run_cli("cosign", str(out), "--root", str(tmp_path / "root.json"), "--key", f"{tmp_path}/rel2.key",
                "--json")  # fmt: skip
    assert r.returncode == 0 and json.loads(r.stdout)["complete"] is True


def test_keygen_calls_the_rollout_key_online_and_the_others_offline(tmp_path: Path) -> None:
    rollout = json.loads(run_cli("keygen", "rollout", "--dir", str(tmp_path), "--json").stdout)
    release = json.loads(run_cli("keygen", "rel1", "--dir", str(tmp_path), "--json").stdout)
    assert "online" in rollout["advice"] and "offline" not in rollout["advice"]
    assert "offline" in release["advice"]
