"""Verification decisions: is this root, release or chunk trustworthy *here, now*?

Pure: every function takes bytes, the device's current trusted state and
``now`` (Unix seconds) and returns the accepted object or raises one typed
VerificationError per cause. It never opens a file or socket and never
reads the clock. The caller persists whatever it accepts.

Order of checks for a release (each step only runs on what passed the one
before): size bound -> envelope -> signatures by a threshold of distinct
release keys of the current root -> fields -> root not expired -> release
not expired (freeze) -> app, channel and hardware/device targeting ->
capabilities within policy (escalation) -> every resource limit within
the device policy's ceilings (memory, tick budget and interval, kv,
telemetry, module size) -> sequence above the highest
accepted and not marked bad (rollback).

Time: the device keeps a trusted-time floor, raised by the ``issued`` of
what it accepts. Expiry is judged at ``max(now, floor)``, so a clock set back (or
a device with no RTC that boots in 1970) can neither revive an expired
manifest nor freeze the device on an old one.

``issued`` is judged so that the floor cannot be poisoned (docs/manifest.md):
the device's clock is *plausible* when it is not behind what signed
documents already proved (``max(floor, root.issued)``, with ``ISSUED_SKEW_S``
of slack). With a plausible clock a document issued more than
``ISSUED_SKEW_S`` after ``now`` is refused (``issued_in_future``) and the
floor never passes ``now + ISSUED_SKEW_S``. With an implausible clock (no
RTC, 1970) the device cannot tell the future from the present: it accepts
what verifies, but one accepted document moves the floor at most
``FLOOR_STEP_S`` past what was already proved. A root rotation sets the
floor to the new root's ``issued``: the recovery from a bad floor needs
only the root keys (``next_floor``, ``floor_after_rotation``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
    VerificationError,
    WrongTargetError,
)
from devicerunner.trust.manifest import (
    MAX_MANIFEST_BYTES,
    MAX_ROLLOUT_BYTES,
    MAX_ROOT_BYTES,
    Envelope,
    Manifest,
    RolloutDoc,
    Root,
    Targets,
    format_time,
    manifest_from_envelope,
    parse_envelope,
    parse_root,
    rollout_from_envelope,
    valid_signers,
)

ISSUED_SKEW_S = 3600
"""How far ahead of a plausible device clock a document may be dated
(signing machines and devices are not in perfect agreement)."""
FLOOR_STEP_S = 86400
"""How far one accepted document may move the floor past what was already
proved, on a device whose clock is not plausible."""


def effective_time(now: int, time_floor: int) -> int:
    return max(now, time_floor)


def clock_plausible(now: int, time_floor: int, root: Root) -> bool:
    """Is the device's clock at least what signed documents already proved?"""
    return now + ISSUED_SKEW_S >= max(time_floor, root.issued)


def check_issued(issued: int, what: str, *, now: int, time_floor: int, root: Root) -> None:
    """Refuse a document dated further ahead than a plausible clock vouches for."""
    if clock_plausible(now, time_floor, root) and issued > now + ISSUED_SKEW_S:
        raise IssuedInFutureError(
            f"{what} is issued {format_time(issued)}, more than {ISSUED_SKEW_S} s after this "
            f"device's clock ({format_time(now)})"
        )


def next_floor(time_floor: int, issued: int, *, now: int, root: Root) -> int:
    """The floor after accepting a document issued at ``issued`` (never lower)."""
    if clock_plausible(now, time_floor, root):
        cap = now + ISSUED_SKEW_S
    else:
        cap = max(time_floor, root.issued) + FLOOR_STEP_S
    return max(time_floor, min(issued, cap))


def floor_after_rotation(new_root: Root) -> int:
    """Accepting a new root (root keys, offline) resets the floor to its ``issued``:
    the recovery from a floor pushed ahead by a bad clock, with no hand edit."""
    return new_root.issued


def check_threshold(env: Envelope, root: Root, role: str, what: str) -> set[str]:
    r = root.role(role)
    signers = valid_signers(env, root.keys, r.keyids)
    if not signers:
        raise BadSignatureError(f"{what}: no valid signature from a trusted {role} key")
    if len(signers) < r.threshold:
        raise ThresholdError(
            f"{what}: signed by {len(signers)} of the {r.threshold} distinct {role} keys required"
        )
    return signers


# -- root rotation -------------------------------------------------------------


def update_root(current: Root, data: bytes) -> Root:
    """Accept root version N+1 only if a threshold of version N's root keys
    *and* a threshold of its own root keys signed it."""
    try:
        new = parse_root(data)
    except VerificationError as e:
        raise RootRotationError(f"new root: {e}") from e
    if new.version != current.version + 1:
        raise RootRotationError(
            f"new root has version {new.version}; only {current.version + 1} can follow {current.version}"
        )
    try:
        check_threshold(new.envelope, current, "root", f"root v{new.version} (by v{current.version}'s keys)")
        check_threshold(new.envelope, new, "root", f"root v{new.version} (by its own keys)")
    except VerificationError as e:
        raise RootRotationError(str(e)) from e
    return new


def update_roots(current: Root, chain: Sequence[bytes]) -> Root:
    """Walk a chain of rotations in version order (each must follow the last)."""
    for data in chain:
        current = update_root(current, data)
    return current


def load_trusted_root(data: bytes) -> Root:
    """A root the device was provisioned with: self-signed by its root threshold."""
    root = parse_root(data)
    check_threshold(root.envelope, root, "root", f"root v{root.version}")
    return root


# -- releases ------------------------------------------------------------------


@dataclass(frozen=True)
class LimitsPolicy:
    """The most a release may ask of this device for one app: the ceilings of
    the app's device.toml table (defaults: those of devicerunner.config)."""

    memory_bytes: int = 16 * 1024 * 1024
    tick_budget_ms: int = 10
    min_tick_interval_ms: int = 10
    kv_quota_bytes: int = 64 * 1024
    telemetry_rate_per_s: float = 5.0
    module_bytes: int = 4 * 1024 * 1024


NO_LIMITS = LimitsPolicy(2**62, 2**62, 0, 2**62, float("inf"), 2**62)
"""No ceiling at all (an operator's offline check that is not about one device)."""


@dataclass(frozen=True)
class DeviceIdentity:
    device_id: str
    hardware: str
    policy: Mapping[str, frozenset[str]]
    """app name -> capabilities the device allows that app (absent: app not installed here)."""
    limits: Mapping[str, LimitsPolicy] = field(default_factory=dict)
    """app name -> resource ceilings; an app absent here gets the default ceilings."""


def check_limits(m: Manifest, ceiling: LimitsPolicy) -> None:
    """Every limit the manifest asks for within the device policy, or the whole
    release is refused naming each field over it (never trimmed to fit)."""
    lim = m.limits
    over: list[str] = []

    def above(field_: str, asked: float | None, most: float, key: str) -> None:
        if asked is not None and asked > most:
            over.append(f"manifest.{field_} = {_num(asked)} is above {_num(most)} (device policy {key})")

    above("limits.memory_bytes", lim.memory_bytes, ceiling.memory_bytes, "memory_limit_bytes")
    above("limits.tick_budget_ms", lim.tick_budget_ms, ceiling.tick_budget_ms, "tick_budget_ms")
    above("limits.kv_quota_bytes", lim.kv_quota_bytes, ceiling.kv_quota_bytes, "kv_quota_bytes")
    above(
        "limits.telemetry_rate_per_s",
        lim.telemetry_rate_per_s,
        ceiling.telemetry_rate_per_s,
        "telemetry_rate_per_s",
    )
    above("artifact.size", m.artifact.size, ceiling.module_bytes, "max_module_bytes")
    if lim.tick_interval_ms < ceiling.min_tick_interval_ms:
        over.append(
            f"manifest.limits.tick_interval_ms = {lim.tick_interval_ms} is below "
            f"{ceiling.min_tick_interval_ms} (device policy min_tick_interval_ms)"
        )
    if over:
        raise LimitAbovePolicyError(
            f"{m.app} {m.version} asks for more than this device allows: " + "; ".join(over)
        )


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class AppHistory:
    highest_sequence: int = 0
    bad_sequences: frozenset[int] = frozenset()


def verify_release(
    data: bytes,
    *,
    root: Root,
    device: DeviceIdentity,
    history: Mapping[str, AppHistory],
    time_floor: int,
    now: int,
    channel: str | None = None,
) -> Manifest:
    """Every check of a release manifest, in the documented order (docs/manifest.md)."""
    m = authenticate_release(data, root)
    return check_release(
        m, root=root, device=device, history=history, time_floor=time_floor, now=now, channel=channel
    )


def authenticate_release(data: bytes, root: Root) -> Manifest:
    """The manifest, if it parses strictly and a threshold of ``root``'s release
    keys signed it. Depends only on (data, root): a caller may cache it."""
    env = parse_envelope(data, MAX_MANIFEST_BYTES, "manifest")
    check_threshold(env, root, "release", "manifest")
    return manifest_from_envelope(env, bytes(data))


def check_times(what: str, issued: int, expires: int, *, root: Root, now: int, time_floor: int) -> None:
    """A signed document's dates (a release, a config): not issued beyond what the
    device can vouch for, the root and the document unexpired."""
    check_issued(issued, what, now=now, time_floor=time_floor, root=root)
    t = effective_time(now, time_floor)
    if root.expires <= t:
        raise ExpiredError(f"trust root v{root.version} expired at {format_time(root.expires)}")
    if expires <= t:
        raise ExpiredError(
            f"{what} expired at {format_time(expires)}"
            + (" (judged by the trusted-time floor)" if time_floor > now else "")
        )


def check_target(
    kind: str, app: str, doc_channel: str, targets: Targets, *, device: DeviceIdentity, channel: str | None
) -> None:
    """Is a document (``kind``: release, config) for an app this device runs, its
    channel, its hardware and (when it names devices) this device?"""
    if app not in device.policy:
        raise WrongTargetError(f"app {app!r} is not configured on this device")
    if channel is not None and doc_channel != channel:
        raise WrongTargetError(f"{kind} is for channel {doc_channel!r}, this device follows {channel!r}")
    if device.hardware not in targets.hardware:
        raise WrongTargetError(
            f"{kind} targets hardware {', '.join(targets.hardware)}; this device is {device.hardware!r}"
        )
    if targets.devices and device.device_id not in targets.devices:
        raise WrongTargetError(f"{kind} names {len(targets.devices)} devices, not {device.device_id!r}")


def check_release(
    m: Manifest,
    *,
    root: Root,
    device: DeviceIdentity,
    history: Mapping[str, AppHistory],
    time_floor: int,
    now: int,
    channel: str | None = None,
) -> Manifest:
    """The checks after authentication: time (``issued``, expiry), target,
    capabilities, history."""
    what = f"manifest {m.app} {m.version} (sequence {m.sequence})"
    check_times(what, m.issued, m.expires, root=root, now=now, time_floor=time_floor)
    check_target("release", m.app, m.channel, m.targets, device=device, channel=channel)
    policy = device.policy[m.app]
    extra = m.capabilities - policy
    if extra:
        raise CapabilityEscalationError(
            f"manifest asks for {', '.join(sorted(extra))}, which the device policy for "
            f"{m.app!r} does not grant (policy: {', '.join(sorted(policy)) or 'nothing'})"
        )
    check_limits(m, device.limits.get(m.app, LimitsPolicy()))
    h = history.get(m.app, AppHistory())
    if m.sequence in h.bad_sequences:
        raise RollbackError(f"sequence {m.sequence} of {m.app} was rolled back on this device")
    if m.sequence <= h.highest_sequence:
        raise RollbackError(
            f"sequence {m.sequence} is not above {h.highest_sequence}, the highest accepted for {m.app}"
        )
    return m


def verify_chunk(m: Manifest, index: int, data: bytes) -> None:
    """A chunk must be the one this manifest pins at this index (mix-and-match)."""
    a = m.artifact
    if not 0 <= index < len(a.chunks):
        raise ArtifactMismatchError(f"chunk index {index} outside 0..{len(a.chunks) - 1}")
    expect_len = a.sizes[index]
    if len(data) != expect_len:
        raise ArtifactMismatchError(f"chunk {index}: {len(data)} bytes, manifest pins {expect_len}")
    if hashlib.sha256(data).hexdigest() != a.chunks[index]:
        raise ArtifactMismatchError(f"chunk {index}: sha256 differs from the manifest")


def verify_artifact(m: Manifest, data: bytes) -> None:
    a = m.artifact
    if len(data) != a.size:
        raise ArtifactMismatchError(f"module is {len(data)} bytes, manifest pins {a.size}")
    if hashlib.sha256(data).hexdigest() != a.sha256:
        raise ArtifactMismatchError("module sha256 differs from the manifest")
    for i, (off, n) in enumerate(zip(a.offsets, a.sizes, strict=True)):
        verify_chunk(m, i, data[off : off + n])


def in_rollout(device_id: str, salt: str, percent: int) -> bool:
    """Stable membership: raising ``percent`` only ever adds devices."""
    if percent >= 100:
        return True
    digest = hashlib.sha256(f"{salt}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < percent * 100


__all__ = [
    "MAX_ROOT_BYTES",
    "NO_LIMITS",
    "AppHistory",
    "DeviceIdentity",
    "LimitsPolicy",
    "MalformedError",
    "check_limits",
    "effective_time",
    "in_rollout",
    "load_trusted_root",
    "update_root",
    "update_roots",
    "verify_artifact",
    "verify_chunk",
    "verify_release",
]


def verify_rollout(data: bytes, *, root: Root, time_floor: int, now: int, last_version: int) -> RolloutDoc:
    """A rollout document signed by a threshold of rollout keys, unexpired, and
    newer than the last one accepted for its (app, channel)."""
    env = parse_envelope(data, MAX_ROLLOUT_BYTES, "rollout")
    check_threshold(env, root, "rollout", "rollout document")
    doc = rollout_from_envelope(env)
    check_issued(doc.issued, f"rollout document v{doc.version}", now=now, time_floor=time_floor, root=root)
    t = effective_time(now, time_floor)
    if root.expires <= t:  # as for releases: an expired root vouches for nothing
        raise ExpiredError(f"trust root v{root.version} expired at {format_time(root.expires)}")
    if doc.expires <= t:
        raise ExpiredError(
            f"rollout document v{doc.version} for {doc.app} expired at {format_time(doc.expires)}"
        )
    if doc.version <= last_version:
        raise RollbackError(f"rollout document v{doc.version} is not newer than v{last_version}")
    return doc


def eligible(device_id: str, m: Manifest, doc: RolloutDoc | None) -> bool:
    """Is this device in the release's rollout now? A document for this exact
    release overrides the manifest's default percent and salt; paused stops it."""
    if (
        doc is not None
        and doc.kind == "release"
        and doc.app == m.app
        and doc.channel == m.channel
        and doc.sequence == m.sequence
    ):
        return not doc.paused and in_rollout(device_id, doc.salt, doc.percent)
    return in_rollout(device_id, m.targets.rollout_salt, m.targets.rollout_percent)
