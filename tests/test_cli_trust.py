"""The operator flow from the CLI, as a new user runs it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, run_cli

THERMO = str(EXAMPLES / "thermostat.wasm")
CAPS = "log,clock,sensors,actuators,kv,telemetry,wasi,messages,config"


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    for name in ("root1", "root2", "root3", "rel1", "rel2", "rel3", "newrel"):
        r = run_cli("keygen", name, "--dir", str(d), "--json")
        assert r.returncode == 0, r.stderr
    r = run_cli(
        "trust",
        "init",
        "--root-key",
        str(d / "root1.pub"),
        "--root-key",
        str(d / "root2.pub"),
        "--root-key",
        str(d / "root3.pub"),
        "--root-threshold",
        "2",
        "--release-key",
        str(d / "rel1.pub"),
        "--release-key",
        str(d / "rel2.pub"),
        "--release-key",
        str(d / "rel3.pub"),
        "--release-threshold",
        "2",
        "--sign",
        str(d / "root1.key"),
        "--sign",
        str(d / "root2.key"),
        "-o",
        str(d / "root.json"),
    )
    assert r.returncode == 0, r.stderr
    return d


def _sign(d: Path, out: str, *keys: str, extra: tuple[str, ...] = ()) -> None:
    args = [
        "sign",
        THERMO,
        "--app",
        "thermostat",
        "--version",
        "1.0.0",
        "--sequence",
        "3",
        "--grant",
        CAPS,
        "--hardware",
        "rpi4",
        "-o",
        str(d / out),
        *extra,
    ]
    for k in keys:
        args += ["--key", str(d / f"{k}.key")]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr


def test_keygen_writes_a_private_key_only_its_owner_can_read(keydir: Path) -> None:
    mode = stat.S_IMODE(os.stat(keydir / "rel1.key").st_mode)
    assert mode == 0o600
    again = run_cli("keygen", "rel1", "--dir", str(keydir))
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr


def test_release_signed_by_two_of_three_verifies_and_one_does_not(keydir: Path) -> None:
    _sign(keydir, "two.bundle", "rel1", "rel3")
    ok = run_cli("verify", str(keydir / "two.bundle"), "--root", str(keydir / "root.json"), "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["valid"] is True
    _sign(keydir, "one.bundle", "rel2")
    bad = run_cli("verify", str(keydir / "one.bundle"), "--root", str(keydir / "root.json"), "--json")
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["reason"] == "below_threshold"
    # a second key holder adds their signature later
    co = run_cli(
        "cosign",
        str(keydir / "one.bundle"),
        "--root",
        str(keydir / "root.json"),
        "--key",
        str(keydir / "rel3.key"),
    )
    assert co.returncode == 0
    assert run_cli("verify", str(keydir / "one.bundle"), "--root", str(keydir / "root.json")).returncode == 0


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (("--highest-sequence", "3"), "rollback"),
        (("--hardware", "stb-9000"), "wrong_target"),
        (("--policy", "log,clock"), "capability_escalation"),
        (("--now", "4000000000"), "expired"),
        (("--time-floor", "4000000000", "--now", "0"), "expired"),
    ],
)
def test_each_attack_is_refused_from_the_cli_with_its_reason(
    keydir: Path, flags: tuple[str, ...], reason: str
) -> None:
    _sign(keydir, "ok.bundle", "rel1", "rel2")
    r = run_cli("verify", str(keydir / "ok.bundle"), "--root", str(keydir / "root.json"), "--json", *flags)
    assert r.returncode == 1
    assert json.loads(r.stdout)["reason"] == reason


def test_tampered_bundle_module_is_refused(keydir: Path) -> None:
    _sign(keydir, "t.bundle", "rel1", "rel2")
    data = bytearray((keydir / "t.bundle").read_bytes())
    data[-10] ^= 0xFF
    (keydir / "t.bundle").write_bytes(bytes(data))
    r = run_cli("verify", str(keydir / "t.bundle"), "--root", str(keydir / "root.json"), "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["reason"] == "artifact_mismatch"


def test_sign_refuses_a_module_that_would_not_link_under_its_grant(keydir: Path, tmp_path: Path) -> None:
    r = run_cli(
        "sign",
        THERMO,
        "--app",
        "thermostat",
        "--version",
        "1.0.0",
        "--sequence",
        "1",
        "--grant",
        "log",
        "--hardware",
        "rpi4",
        "--key",
        str(keydir / "rel1.key"),
        "-o",
        str(tmp_path / "x.bundle"),
    )
    assert r.returncode == 2 and "needs capability 'sensors'" in r.stderr
    assert not (tmp_path / "x.bundle").exists()


def test_rotation_retires_a_release_key(keydir: Path, tmp_path: Path) -> None:
    old_root = keydir / "root.json"
    r = run_cli(
        "trust",
        "rotate",
        "--current",
        str(old_root),
        "--release-key",
        str(keydir / "newrel.pub"),
        "--release-key",
        str(keydir / "rel2.pub"),
        "--release-threshold",
        "1",
        "--sign",
        str(keydir / "root1.key"),
        "--sign",
        str(keydir / "root3.key"),
        "-o",
        str(tmp_path / "root2.json"),
    )
    assert r.returncode == 0, r.stderr
    _sign(keydir, "old-keys.bundle", "rel1", "rel3")  # both retired
    v = run_cli("verify", str(keydir / "old-keys.bundle"), "--root", str(tmp_path / "root2.json"), "--json")
    assert json.loads(v.stdout)["reason"] == "bad_signature"
    _sign(keydir, "new-key.bundle", "newrel")
    assert (
        run_cli("verify", str(keydir / "new-key.bundle"), "--root", str(tmp_path / "root2.json")).returncode
        == 0
    )


def test_rotation_not_signed_by_the_current_root_threshold_is_refused(keydir: Path, tmp_path: Path) -> None:
    r = run_cli(
        "trust",
        "rotate",
        "--current",
        str(keydir / "root.json"),
        "--sign",
        str(keydir / "root1.key"),
        "-o",
        str(tmp_path / "root2.json"),
    )
    assert r.returncode == 1 and "threshold" in r.stderr
    assert not (tmp_path / "root2.json").exists()


def test_garbage_root_file_is_a_clear_error(tmp_path: Path, keydir: Path) -> None:
    (tmp_path / "root.json").write_text("{not json")
    _sign(keydir, "g.bundle", "rel1", "rel2")
    r = run_cli("verify", str(keydir / "g.bundle"), "--root", str(tmp_path / "root.json"))
    assert r.returncode == 1 and "malformed" in r.stderr and "Traceback" not in r.stderr


def test_a_private_key_given_as_a_public_key_is_refused(keydir: Path) -> None:
    # load_public used to take the public half of a private key silently, so
    # private keys travelled to wherever public ones were wanted.
    from devicerunner.trust import keys

    with pytest.raises(keys.KeyFileError, match="private key; give its public half"):
        keys.load_public(keydir / "rel1.key")
    assert keys.load_public(keydir / "rel1.pub")


def test_keygen_with_a_passphrase_file_encrypts_the_key_and_signing_needs_it(
    tmp_path: Path, keydir: Path
) -> None:
    pw = tmp_path / "pass"
    pw.write_text("correct horse battery staple\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("hunter2\n")
    r = run_cli("keygen", "enc", "--dir", str(tmp_path), "--json", "--passphrase-file", str(pw))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["encrypted"] is True
    pem = (tmp_path / "enc.key").read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in pem
    plain = run_cli("keygen", "plain", "--dir", str(tmp_path))
    assert "UNENCRYPTED" in plain.stdout

    from devicerunner.trust import keys

    with pytest.raises(keys.KeyFileError, match="encrypted: give --passphrase-file"):
        keys.load_private(tmp_path / "enc.key", password=None)
    with pytest.raises(keys.KeyFileError, match="wrong passphrase"):
        keys.load_private(tmp_path / "enc.key", keys.passphrase(wrong))
    assert keys.load_private(tmp_path / "enc.key", keys.passphrase(pw))
    # the CLI: cosign with the encrypted key (a release key of this root), with and without its passphrase
    root = tmp_path / "root-enc.json"
    init = run_cli(
        "trust", "init", "--root-key", str(keydir / "root1.pub"), "--release-key", str(keydir / "rel1.pub"),
        "--release-key", str(tmp_path / "enc.pub"), "--release-threshold", "2",
        "--sign", str(keydir / "root1.key"), "-o", str(root),
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    _sign(keydir, str(tmp_path / "b.bundle"), "rel1")
    no = run_cli(
        "cosign", str(tmp_path / "b.bundle"), "--root", str(root), "--key", str(tmp_path / "enc.key")
    )
    assert no.returncode != 0 and "encrypted" in no.stderr and "Traceback" not in no.stderr
    yes = run_cli(
        "cosign", str(tmp_path / "b.bundle"), "--root", str(root),
        "--key", str(tmp_path / "enc.key"), "--passphrase-file", str(pw),
    )  # fmt: skip
    assert yes.returncode == 0, yes.stderr
    assert "2 of 2 release signature(s), threshold met" in yes.stdout, yes.stdout


def test_an_explicit_threshold_of_zero_is_refused_not_turned_into_one(keydir: Path, tmp_path: Path) -> None:
    r = run_cli(
        "trust",
        "init",
        "--root-key",
        str(keydir / "root1.pub"),
        "--release-key",
        str(keydir / "rel1.pub"),
        "--release-threshold",
        "0",
        "--sign",
        str(keydir / "root1.key"),
        "-o",
        str(tmp_path / "root.json"),
    )
    assert r.returncode != 0 and "--release-threshold 0: must be between 1 and 1" in r.stderr, r.stderr
