"""Every attack the trust layer defends against, one test each (docs/threat-model.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devicerunner.errors import (
    ArtifactMismatchError,
    BadSignatureError,
    CapabilityEscalationError,
    ExpiredError,
    IssuedInFutureError,
    LimitAbovePolicyError,
    MalformedError,
    RollbackError,
    RootRotationError,
    ThresholdError,
    TooLargeError,
    UnsupportedError,
    WrongTargetError,
)
from devicerunner.trust import bundle, manifest
from devicerunner.trust import verify as trust
from tests.trustsim import DAY, NOW, WAT_MODULE, Repo, verify


@pytest.fixture
def repo() -> Repo:
    return Repo()


def test_valid_release_signed_by_two_of_three_keys_is_accepted(repo: Repo) -> None:
    m = verify(repo, repo.release(signers=[repo.release_keys[0], repo.release_keys[2]]))
    assert (m.app, m.sequence) == ("thermo", 5)
    trust.verify_artifact(m, WAT_MODULE)


def test_arbitrary_software_unsigned_manifest_is_rejected(repo: Repo) -> None:
    with pytest.raises(BadSignatureError):
        verify(repo, repo.release(signers=[]))


def test_manifest_signed_by_wrong_key_is_rejected(repo: Repo) -> None:
    outsider = [Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()]
    with pytest.raises(BadSignatureError):
        verify(repo, repo.release(signers=outsider))


def test_manifest_signed_by_root_key_is_not_a_release_signature(repo: Repo) -> None:
    with pytest.raises(BadSignatureError):
        verify(repo, repo.release(signers=repo.root_keys[:2]))


def test_manifest_signed_by_the_rollout_key_is_not_a_release_signature() -> None:
    # Release threshold 1, so a rollout signature would be enough if it counted.
    repo = Repo(release_threshold=1)
    assert verify(repo, repo.release(signers=repo.release_keys[:1])).sequence == 5
    with pytest.raises(BadSignatureError):
        verify(repo, repo.release(signers=repo.rollout_keys))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("app", "thermo\n"),
        ("version", "1.0.0\n"),
        ("channel", "stable\n"),
        ("issued", "2026-01-01T00:00:00Z\n"),
    ],
)
def test_field_with_a_trailing_newline_is_malformed(repo: Repo, field: str, value: str) -> None:
    # re.match(r"^...$") accepts "thermo\n": every pattern must match the whole text.
    env = json.loads(repo.release())
    env["signed"][field] = value
    with pytest.raises(MalformedError):
        manifest.manifest_from_envelope(
            manifest.parse_envelope(json.dumps(env).encode(), manifest.MAX_MANIFEST_BYTES, "manifest")
        )


def test_signatures_below_threshold_are_rejected(repo: Repo) -> None:
    with pytest.raises(ThresholdError, match="1 of the 2"):
        verify(repo, repo.release(signers=[repo.release_keys[0]]))


def test_one_key_signing_many_times_counts_once(repo: Repo) -> None:
    data = repo.release(signers=[repo.release_keys[0]])
    env = json.loads(data)
    env["signatures"] = env["signatures"] * 5
    with pytest.raises(ThresholdError):
        verify(repo, json.dumps(env).encode())


def test_tampered_manifest_field_breaks_the_signature(repo: Repo) -> None:
    env = json.loads(repo.release())
    env["signed"]["capabilities"] = ["log", "sensors", "clock"]
    with pytest.raises(BadSignatureError):
        verify(repo, json.dumps(env).encode())


def test_tampered_artifact_is_rejected(repo: Repo) -> None:
    m = verify(repo, repo.release())
    evil = bytearray(WAT_MODULE)
    evil[-1] ^= 1
    with pytest.raises(ArtifactMismatchError):
        trust.verify_artifact(m, bytes(evil))
    with pytest.raises(ArtifactMismatchError, match="bytes"):
        trust.verify_artifact(m, WAT_MODULE + b"\0")


def test_mix_and_match_chunk_from_another_release_is_rejected(repo: Repo) -> None:
    other = bytes(reversed(WAT_MODULE))
    m = verify(repo, repo.release())
    with pytest.raises(ArtifactMismatchError, match="chunk 1"):
        trust.verify_chunk(m, 1, other[1024:2048])
    trust.verify_chunk(m, 1, WAT_MODULE[1024:2048])  # its own chunk passes
    with pytest.raises(ArtifactMismatchError):
        trust.verify_chunk(m, 99, b"x")


def test_rollback_to_an_older_or_equal_sequence_is_rejected(repo: Repo) -> None:
    with pytest.raises(RollbackError):
        verify(repo, repo.release(sequence=5), highest=5)
    with pytest.raises(RollbackError):
        verify(repo, repo.release(sequence=4), highest=5)


def test_re_release_of_old_code_with_a_higher_sequence_is_accepted(repo: Repo) -> None:
    assert verify(repo, repo.release(sequence=6, version="0.9.0"), highest=5).sequence == 6


def test_rolled_back_sequence_is_never_retried(repo: Repo) -> None:
    with pytest.raises(RollbackError, match="rolled back"):
        verify(repo, repo.release(sequence=6), highest=5, bad=frozenset({6}))


def test_freeze_expired_manifest_is_rejected(repo: Repo) -> None:
    with pytest.raises(ExpiredError):
        verify(repo, repo.release(), now=NOW + 31 * DAY)


def test_freeze_clock_set_back_cannot_revive_an_expired_manifest(repo: Repo) -> None:
    # The device once accepted something issued at NOW + 40 days: its time
    # floor says at least that much time has passed, whatever the clock says.
    with pytest.raises(ExpiredError, match="floor"):
        verify(repo, repo.release(), now=0, floor=NOW + 40 * DAY)


def test_device_without_rtc_still_accepts_current_releases(repo: Repo) -> None:
    assert verify(repo, repo.release(), now=0, floor=NOW - DAY).sequence == 5


def test_expired_root_blocks_releases(repo: Repo) -> None:
    root = trust.load_trusted_root(repo.root_bytes(expires=NOW - 1))
    with pytest.raises(ExpiredError, match="root"):
        verify(repo, repo.release(), root=root)


def test_endless_data_oversized_manifest_is_rejected_before_parsing(repo: Repo) -> None:
    huge = b"{" + b" " * manifest.MAX_MANIFEST_BYTES + b"}"
    with pytest.raises(TooLargeError):
        verify(repo, huge)
    with pytest.raises(TooLargeError):
        trust.load_trusted_root(b" " * (manifest.MAX_ROOT_BYTES + 1))


def test_endless_data_artifact_and_chunk_sizes_are_bounded(repo: Repo) -> None:
    env = json.loads(repo.release())
    signed = env["signed"]
    signed["artifact"]["size"] = manifest.MAX_ARTIFACT_BYTES + 1
    with pytest.raises(MalformedError, match="size"):
        manifest.manifest_from_envelope(manifest.parse_envelope(json.dumps(env).encode(), 10**6, "m"))
    signed["artifact"]["size"] = len(WAT_MODULE)
    signed["artifact"]["chunk_size"] = manifest.MAX_CHUNK + 1
    with pytest.raises(MalformedError, match="chunk_size"):
        manifest.manifest_from_envelope(manifest.parse_envelope(json.dumps(env).encode(), 10**6, "m"))


def test_endless_data_bundle_manifest_length_is_bounded() -> None:
    evil = bundle.MAGIC + (manifest.MAX_MANIFEST_BYTES + 1).to_bytes(4, "big") + b"x"
    with pytest.raises(TooLargeError):
        bundle.unpack(evil)
    with pytest.raises(MalformedError):
        bundle.unpack(bundle.MAGIC + (100).to_bytes(4, "big") + b"short")


def test_wrong_hardware_is_rejected(repo: Repo) -> None:
    with pytest.raises(WrongTargetError, match="hardware"):
        verify(repo, repo.release(hardware=["stb-9000"]))


def test_release_for_other_devices_is_rejected(repo: Repo) -> None:
    with pytest.raises(WrongTargetError):
        verify(repo, repo.release(devices=["dev-1", "dev-2"]))
    assert verify(repo, repo.release(devices=["dev-7"])).sequence == 5


def test_release_for_an_app_not_on_this_device_is_rejected(repo: Repo) -> None:
    with pytest.raises(WrongTargetError, match="not configured"):
        verify(repo, repo.release(app="miner"))


def test_capability_escalation_is_rejected_not_trimmed(repo: Repo) -> None:
    with pytest.raises(CapabilityEscalationError, match="actuators, kv"):
        verify(repo, repo.release(capabilities=["log", "sensors", "actuators", "kv"]))


def _policy_device(app_table: str = "") -> trust.DeviceIdentity:
    """A device whose ceilings come from a real device.toml [apps.thermo] table."""
    from pathlib import Path

    from devicerunner.device import config

    doc = {"device": {"id": "dev-7", "hardware": "rpi4"}, "apps": {"thermo": {"policy": ["log", "sensors"]}}}
    for line in filter(None, app_table.splitlines()):
        k, v = (x.strip() for x in line.split("=", 1))
        doc["apps"]["thermo"][k] = int(v)  # type: ignore[index]
    app = config.parse(doc, Path("/")).apps["thermo"]
    return trust.DeviceIdentity("dev-7", "rpi4", {"thermo": app.policy}, {"thermo": app.ceilings()})


@pytest.mark.parametrize(
    ("ask", "field"),
    [
        ({"memory_bytes": 3 * 1024**3}, "manifest.limits.memory_bytes = 3221225472 is above 16777216"),
        ({"tick_budget_ms": 60_000}, "manifest.limits.tick_budget_ms = 60000 is above 10"),
        ({"tick_interval_ms": 1}, "manifest.limits.tick_interval_ms = 1 is below 10"),
        ({"kv_quota_bytes": 1024**2}, "manifest.limits.kv_quota_bytes = 1048576 is above 65536"),
        ({"telemetry_rate_per_s": 1000}, "manifest.limits.telemetry_rate_per_s = 1000 is above 5"),
        ({"module": b"\0asm" + bytes(5 * 1024**2)}, "manifest.artifact.size = 5242884 is above 4194304"),
    ],
)
def test_resource_limit_above_the_device_policy_is_rejected_not_trimmed(
    repo: Repo,
    ask: dict,
    field: str,  # type: ignore[type-arg]
) -> None:
    """The manifest does not set the device's limits: above the app's device.toml
    policy (here its defaults: 16 MiB, 10 ms budget, 10 ms interval, 64 KiB kv,
    5 msg/s, 4 MiB module) the release is refused whole, naming the field."""
    data = repo.release(chunk_size=manifest.MAX_CHUNK, **ask)
    with pytest.raises(LimitAbovePolicyError, match=re.escape(field)):
        verify(repo, data, device=_policy_device())


def test_release_within_raised_policy_limits_is_accepted(repo: Repo) -> None:
    device = _policy_device("memory_limit_bytes = 67108864\ntick_budget_ms = 50\nkv_quota_bytes = 1048576")
    m = verify(
        repo,
        repo.release(memory_bytes=64 * 1024**2, tick_budget_ms=50, kv_quota_bytes=1024**2),
        device=device,
    )
    assert (m.limits.memory_bytes, m.limits.tick_budget_ms, m.limits.kv_quota_bytes) == (
        64 * 1024**2,
        50,
        1024**2,
    )


def test_unsupported_abi_or_schema_is_rejected(repo: Repo) -> None:
    env = json.loads(repo.release())
    env["signed"]["abi"] = 2
    env = manifest.sign_envelope(env["signed"], repo.release_keys[:2])
    with pytest.raises(UnsupportedError, match="ABI v2"):
        verify(repo, env)


# -- root rotation -----------------------------------------------------------------


def _rotated(repo: Repo, *, new_release: bool = False, new_root: bool = False) -> Repo:
    nxt = Repo(
        root_keys=list(repo.root_keys),
        release_keys=list(repo.release_keys),
        rollout_keys=list(repo.rollout_keys),
        version=repo.version + 1,
    )
    if new_root:
        nxt.root_keys = [Ed25519PrivateKey.generate() for _ in range(3)]
    if new_release:
        nxt.release_keys = [Ed25519PrivateKey.generate() for _ in range(3)]
    return nxt


def test_root_rotation_signed_by_old_and_new_thresholds_is_accepted(repo: Repo) -> None:
    nxt = _rotated(repo, new_root=True, new_release=True)
    data = nxt.root_bytes(signers=repo.root_keys[:2] + nxt.root_keys[:2])
    assert trust.update_root(repo.root(), data).version == 2


def test_root_rotation_signed_only_by_new_keys_is_rejected(repo: Repo) -> None:
    nxt = _rotated(repo, new_root=True)
    with pytest.raises(RootRotationError, match="v1's keys"):
        trust.update_root(repo.root(), nxt.root_bytes(signers=nxt.root_keys))


def test_root_rotation_signed_only_by_old_keys_is_rejected(repo: Repo) -> None:
    nxt = _rotated(repo, new_root=True)
    with pytest.raises(RootRotationError, match="its own keys"):
        trust.update_root(repo.root(), nxt.root_bytes(signers=repo.root_keys))


def test_root_rotation_must_be_exactly_the_next_version(repo: Repo) -> None:
    nxt = _rotated(repo)
    with pytest.raises(RootRotationError, match="only 2"):
        trust.update_root(repo.root(), nxt.root_bytes(version=3))
    with pytest.raises(RootRotationError, match="only 2"):
        trust.update_root(repo.root(), repo.root_bytes())  # replay of v1


def test_chain_of_rotations_is_walked_in_order(repo: Repo) -> None:
    r2 = _rotated(repo, new_root=True)
    r3 = _rotated(r2, new_root=True)
    b2 = r2.root_bytes(signers=repo.root_keys[:2] + r2.root_keys[:2])
    b3 = r3.root_bytes(signers=r2.root_keys[:2] + r3.root_keys[:2])
    assert trust.update_roots(repo.root(), [b2, b3]).version == 3
    with pytest.raises(RootRotationError):
        trust.update_roots(repo.root(), [b3, b2])  # skipping a version


def test_release_key_rotated_out_stops_working(repo: Repo) -> None:
    old_release = repo.release()
    nxt = _rotated(repo, new_release=True)
    root2 = trust.update_root(repo.root(), nxt.root_bytes(signers=repo.root_keys[:2]))
    with pytest.raises(BadSignatureError):
        verify(repo, old_release, root=root2)
    assert verify(nxt, nxt.release(), root=root2).sequence == 5


def test_root_listing_one_key_under_two_ids_is_malformed(repo: Repo) -> None:
    env = json.loads(repo.root_bytes())
    keys = env["signed"]["keys"]
    val = next(iter(keys.values()))
    keys["f" * 64] = val  # same public key, forged id, to count it twice
    env["signed"]["roles"]["release"]["keyids"].append("f" * 64)
    data = manifest.sign_envelope(env["signed"], repo.root_keys)
    with pytest.raises(MalformedError, match="not sha256"):
        trust.load_trusted_root(data)


# -- time cannot be poisoned (docs/manifest.md "Time") ------------------------------------

YEAR = 365 * DAY


def test_release_issued_years_ahead_is_refused_on_a_plausible_clock(repo: Repo) -> None:
    ahead = repo.release(issued=NOW + 10 * YEAR, expires=NOW + 10 * YEAR + DAY)
    with pytest.raises(IssuedInFutureError) as e:
        verify(repo, ahead, now=NOW)
    assert e.value.reason == "issued_in_future"


def test_release_issued_within_the_clock_skew_is_accepted(repo: Repo) -> None:
    assert verify(repo, repo.release(issued=NOW + trust.ISSUED_SKEW_S - 1), now=NOW).sequence == 5


def test_floor_never_passes_a_plausible_clock_plus_the_skew(repo: Repo) -> None:
    root = repo.root()
    assert trust.next_floor(0, NOW + 10 * YEAR, now=NOW, root=root) == NOW + trust.ISSUED_SKEW_S
    assert trust.next_floor(NOW, NOW - DAY, now=NOW, root=root) == NOW  # never lowered


def test_device_without_rtc_cannot_have_its_floor_pushed_years_ahead_by_one_document(repo: Repo) -> None:
    root = repo.root()  # issued NOW - DAY: a clock at 0 is not plausible
    ahead = repo.release(issued=NOW + 10 * YEAR, expires=NOW + 10 * YEAR + DAY)
    assert verify(repo, ahead, now=0).sequence == 5  # it cannot tell: accepted
    floor = trust.next_floor(0, NOW + 10 * YEAR, now=0, root=root)
    assert floor == root.issued + trust.FLOOR_STEP_S


def test_rollout_document_issued_years_ahead_is_refused(repo: Repo) -> None:
    signed = manifest.rollout_signed(
        app="thermo",
        channel="stable",
        sequence=5,
        version=1,
        percent=100,
        paused=False,
        salt="s",
        issued=NOW + 10 * YEAR,
        expires=NOW + 10 * YEAR + DAY,
    )
    data = manifest.sign_envelope(signed, repo.rollout_keys)
    with pytest.raises(IssuedInFutureError):
        trust.verify_rollout(data, root=repo.root(), time_floor=0, now=NOW, last_version=0)


def test_root_rotation_resets_a_poisoned_time_floor(repo: Repo, tmp_path: Path) -> None:
    from devicerunner.trust.store import TrustStore

    (tmp_path / "root.json").write_bytes(repo.root_bytes())
    store = TrustStore(tmp_path / "state", tmp_path / "root.json")
    # A clock ten years ahead when a genuine future-dated document arrived (both attacked).
    store.raise_floor(NOW + 10 * YEAR, now=NOW + 10 * YEAR)
    assert store.time_floor > NOW + 9 * YEAR
    with pytest.raises(ExpiredError):
        verify(repo, repo.release(), now=NOW, floor=store.time_floor)
    # The operator's recovery: a root rotation (root keys only, no hand edit on the device).
    nxt = _rotated(repo)
    store.rotate(nxt.root_bytes(signers=repo.root_keys[:2]))
    assert store.time_floor == NOW - DAY  # the new root's issued, kept across a restart:
    assert TrustStore(tmp_path / "state", tmp_path / "root.json").time_floor == NOW - DAY
    assert verify(nxt, nxt.release(), root=store.root, now=NOW, floor=store.time_floor).sequence == 5
