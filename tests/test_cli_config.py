"""The operator's config commands as a user runs them: keys, a root with a
config role, config sign and verify."""

from __future__ import annotations

import json
from pathlib import Path

from devicerunner.trust import appconfig
from tests.conftest import run_cli


def make_root(d: Path) -> None:
    for name in ("root", "rel", "cfg"):
        assert run_cli("keygen", name, "--dir", str(d)).returncode == 0
    r = run_cli(
        "trust", "init", "--root-key", str(d / "root.pub"), "--release-key", str(d / "rel.pub"),
        "--config-key", str(d / "cfg.pub"), "--sign", str(d / "root.key"), "-o", str(d / "root.json"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "config   1 of 1 keys" in r.stdout


def sign(d: Path, key: str, *extra: str) -> Path:
    out = d / f"cfg-{key}.json"
    r = run_cli(
        "config", "sign", "--app", "thermostat", "--version", "3", "--set", "setpoint=21.5",
        "--set", "fans=2", "--set", "eco=true", "--hardware", "rpi4", "--key", str(d / f"{key}.key"),
        "-o", str(out), *extra,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out


def test_config_sign_then_verify_as_a_device_would(tmp_path: Path) -> None:
    make_root(tmp_path)
    doc = sign(tmp_path, "cfg")
    parsed = appconfig.parse_config(doc.read_bytes())
    assert dict(parsed.settings) == {"setpoint": "21.5", "fans": 2, "eco": True}
    r = run_cli("config", "verify", str(doc), "--root", str(tmp_path / "root.json"))
    assert r.returncode == 0 and "OK: config v3 for thermostat" in r.stdout


def test_config_signed_with_a_release_key_is_refused_by_verify(tmp_path: Path) -> None:
    make_root(tmp_path)
    doc = sign(tmp_path, "rel")  # a key of the root, but of the wrong role
    r = run_cli("config", "verify", str(doc), "--root", str(tmp_path / "root.json"))
    assert r.returncode == 1 and "REJECTED (bad_signature)" in r.stdout


def test_config_sign_keeps_decimals_from_a_json_file_as_strings(tmp_path: Path) -> None:
    make_root(tmp_path)
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"hysteresis": 0.5, "mode": "eco"}))
    doc = sign(tmp_path, "cfg", "--file", str(settings))
    parsed = appconfig.parse_config(doc.read_bytes())
    assert parsed.settings["hysteresis"] == "0.5" and parsed.settings["mode"] == "eco"


def test_config_install_hands_a_config_to_a_device_without_a_broker(tmp_path: Path) -> None:
    from tests.conftest import wat
    from tests.devicekit import Kit
    from tests.test_appconfig import CONFIGURED_WAT, QUICK

    boot = tmp_path / "configured.wasm"
    boot.write_bytes(wat(CONFIGURED_WAT))
    kit = Kit(tmp_path / "dev", bootstrap=str(boot))
    doc = tmp_path / "cfg.json"
    doc.write_bytes(kit.config(1, {"limit": "9"}, health=QUICK))
    r = run_cli("config", "install", str(doc), "--config", str(kit.config_path))
    assert r.returncode == 0 and "queued" in r.stdout, r.stderr
    r = run_cli("run", "--config", str(kit.config_path), "--once", "--for", "30", "--json")
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)["apps"]["app"]["config"]
    assert (cfg["version"], cfg["phase"]) == (1, "COMMITTED")
    assert not list((kit.state_dir / "inbox").glob("*.config"))
    (tmp_path / "junk.json").write_text("{}")
    r = run_cli("config", "install", str(tmp_path / "junk.json"), "--config", str(kit.config_path))
    assert r.returncode == 1 and "must be an object" in r.stderr and "Error" not in r.stderr
