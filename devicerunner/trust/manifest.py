"""Signed documents: the release manifest, the trust root and the rollout
document, in a TUF-style envelope ``{"signed": {...}, "signatures": [...]}``.

This module is pure: it parses bytes into frozen dataclasses and builds
documents; it never opens files or sockets and never reads the clock.
Parsing is strict: a missing field, an unknown field, a wrong type or an
out-of-range value raises MalformedError naming the field; an oversized
input raises TooLargeError *before* it is parsed.

Signatures are Ed25519 over ``canonical(signed)`` (devicerunner.trust.canonical).
A key id is the hex sha256 of the raw 32-byte public key; a root that lists
a key under any other id is malformed (so one key cannot count twice).

Size: over 400 lines on purpose -- every signed document type has its reader
and its builder side by side here (one format, one reader, one writer), so
that a field added to a builder cannot miss its parser.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from devicerunner.errors import MalformedError, TooLargeError, UnsupportedError
from devicerunner.runtime.strict import REQUIRED, Strict, too_deep
from devicerunner.trust.canonical import NotCanonicalError, canonical
from hostfuncs.registry import CAPABILITIES as ABI_CAPABILITIES

SCHEMA = 1
ABI_VERSION = 1
MAX_MANIFEST_BYTES = 256 * 1024
MAX_ROOT_BYTES = 64 * 1024
MAX_ROLLOUT_BYTES = 8 * 1024
MAX_ARTIFACT_BYTES = 64 * 1024 * 1024
MIN_CHUNK = 1024
MAX_CHUNK = 120 * 1024
"""Under AWS IoT Core's 128 KiB message limit with room for the topic."""
DEFAULT_CHUNK = 64 * 1024
MAX_SIGNATURES = 32
MAX_DEPTH = 32
"""Nesting a signed document may have (a real one has 4); checked before parsing."""
MAX_KEYS = 64
ROLES = ("root", "release", "rollout", "config")
REQUIRED_ROLES = ("root", "release", "rollout")
"""A root may leave out ``config`` (roots made before signed app configuration
existed): such a root names no config key, so no config document verifies."""
CAPABILITIES = tuple(ABI_CAPABILITIES)
"""Every capability a manifest may name: the ABI registry's list (hostfuncs.registry)."""
ROLLOUT_KINDS = ("release", "config")

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
SEMVER_RE = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")
TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


# -- time --------------------------------------------------------------------


def format_time(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def parse_time(s: str, where: str) -> int:
    if not isinstance(s, str) or not TIME_RE.fullmatch(s):
        raise MalformedError(f"{where}: expected UTC time like 2026-01-31T12:00:00Z, got {s!r}")
    try:
        return calendar.timegm(time.strptime(s, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError as e:
        raise MalformedError(f"{where}: {e}") from e


# -- keys --------------------------------------------------------------------


def key_id(public: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_hex(public: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return public.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    """A parsed envelope: the signed object, its canonical bytes, its signatures."""

    signed: Mapping[str, Any]
    signed_bytes: bytes
    signatures: tuple[Signature, ...]


def sign_envelope(signed: Mapping[str, Any], keys: Sequence[Ed25519PrivateKey]) -> bytes:
    """Envelope bytes (pretty JSON, signatures over the canonical form)."""
    try:
        msg = canonical(dict(signed))
    except NotCanonicalError as e:
        raise MalformedError(str(e)) from e
    sigs = [{"keyid": key_id(k.public_key()), "sig": k.sign(msg).hex()} for k in keys]
    return json.dumps({"signed": signed, "signatures": sigs}, indent=2, sort_keys=True).encode() + b"\n"


def add_signatures(envelope: bytes, keys: Sequence[Ed25519PrivateKey], max_bytes: int) -> bytes:
    env = parse_envelope(envelope, max_bytes, "document")
    sigs = [{"keyid": s.keyid, "sig": s.sig.hex()} for s in env.signatures]
    have = {s["keyid"] for s in sigs}
    for k in keys:
        kid = key_id(k.public_key())
        if kid not in have:
            sigs.append({"keyid": kid, "sig": k.sign(env.signed_bytes).hex()})
            have.add(kid)
    return json.dumps({"signed": env.signed, "signatures": sigs}, indent=2, sort_keys=True).encode() + b"\n"


def parse_envelope(data: bytes, max_bytes: int, what: str) -> Envelope:
    if not isinstance(data, bytes | bytearray):
        raise MalformedError(f"{what}: expected bytes")
    if len(data) > max_bytes:
        raise TooLargeError(f"{what}: {len(data)} bytes, the limit is {max_bytes}")
    if too_deep(bytes(data), MAX_DEPTH):
        raise MalformedError(f"{what}: nested deeper than {MAX_DEPTH}")
    try:
        obj = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MalformedError(f"{what}: not JSON: {e}") from e
    if not isinstance(obj, dict) or set(obj) != {"signed", "signatures"}:
        raise MalformedError(f"{what}: must be an object with exactly 'signed' and 'signatures'")
    signed, raw_sigs = obj["signed"], obj["signatures"]
    if not isinstance(signed, dict):
        raise MalformedError(f"{what}.signed: must be an object")
    if not isinstance(raw_sigs, list) or len(raw_sigs) > MAX_SIGNATURES:
        raise MalformedError(f"{what}.signatures: must be a list of at most {MAX_SIGNATURES}")
    sigs = []
    for i, s in enumerate(raw_sigs):
        if not isinstance(s, dict) or set(s) != {"keyid", "sig"}:
            raise MalformedError(f"{what}.signatures[{i}]: must be {{keyid, sig}}")
        kid, sig = s["keyid"], s["sig"]
        if not isinstance(kid, str) or not HEX64_RE.fullmatch(kid):
            raise MalformedError(f"{what}.signatures[{i}].keyid: must be 64 hex digits")
        if not isinstance(sig, str) or not re.fullmatch(r"[0-9a-f]{128}", sig):
            raise MalformedError(f"{what}.signatures[{i}].sig: must be 128 hex digits")
        sigs.append(Signature(kid, bytes.fromhex(sig)))
    try:
        signed_bytes = canonical(signed)
    except NotCanonicalError as e:
        raise MalformedError(f"{what}.signed: {e}") from e
    return Envelope(signed, signed_bytes, tuple(sigs))


def valid_signers(env: Envelope, keys: Mapping[str, Ed25519PublicKey], allowed: frozenset[str]) -> set[str]:
    """Distinct key ids in ``allowed`` whose signature over the envelope verifies."""
    ok: set[str] = set()
    for s in env.signatures:
        if s.keyid in ok or s.keyid not in allowed:
            continue
        pub = keys.get(s.keyid)
        if pub is None:
            continue
        try:
            pub.verify(s.sig, env.signed_bytes)
        except InvalidSignature:
            continue
        ok.add(s.keyid)
    return ok


# -- strict field access -------------------------------------------------------


class _Fields(Strict):
    """Strict reads of one document object (runtime.strict), as MalformedError.
    Unknown fields are refused at once: a document is read in full."""

    def __init__(self, obj: Any, where: str, required: Sequence[str], optional: Sequence[str] = ()) -> None:
        super().__init__(obj, where, _malformed, what="object", unknown="unknown field", required=required)
        self.used.update(required, optional)
        self.finish()

    def text(self, k: str, pattern: re.Pattern[str] | None = None) -> str:  # type: ignore[override]
        return str(super().text(k, pattern=pattern, nonempty=False))

    def integer(self, k: str, lo: int, hi: int, default: int | None = None) -> int:  # type: ignore[override]
        return int(super().integer(k, REQUIRED if default is None else default, lo=lo, hi=hi))

    def text_list(self, k: str, pattern: re.Pattern[str], max_n: int = 256) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(super().text_list(k, (), pattern=pattern, max_n=max_n, unique=True))


def _malformed(key: str, message: str) -> Exception:
    return MalformedError(f"{key}: {message}")


def _schema(f: _Fields, type_: str) -> None:
    if f.get("_type") != type_:
        raise MalformedError(f"{f.where}._type: expected {type_!r}, got {f.get('_type')!r}")
    if f.get("schema") != SCHEMA:
        raise UnsupportedError(f"{f.where}.schema: version {f.get('schema')!r} (this device: {SCHEMA})")


# -- trust root ------------------------------------------------------------------


@dataclass(frozen=True)
class Role:
    keyids: frozenset[str]
    threshold: int


@dataclass(frozen=True)
class Root:
    version: int
    issued: int
    expires: int
    keys: Mapping[str, Ed25519PublicKey]
    roles: Mapping[str, Role]
    envelope: Envelope = field(repr=False, compare=False)
    raw: bytes = field(repr=False, compare=False, default=b"")

    def role(self, name: str) -> Role:
        return self.roles[name]


def parse_root(data: bytes) -> Root:
    env = parse_envelope(data, MAX_ROOT_BYTES, "root")
    f = _Fields(env.signed, "root", ("_type", "schema", "version", "issued", "expires", "keys", "roles"))
    _schema(f, "root")
    keys_raw = f.get("keys")
    if not isinstance(keys_raw, dict) or not 0 < len(keys_raw) <= MAX_KEYS:
        raise MalformedError(f"root.keys: must be an object of 1..{MAX_KEYS} keys")
    keys: dict[str, Ed25519PublicKey] = {}
    for kid, kobj in keys_raw.items():
        kf = _Fields(kobj, f"root.keys.{kid[:12]}", ("keytype", "public"))
        if kf.get("keytype") != "ed25519":
            raise UnsupportedError(f"root.keys.{kid[:12]}.keytype: only ed25519 is supported")
        pub_hex = kf.text("public", re.compile(r"^[0-9a-f]{64}$"))
        try:
            pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(pub_hex))
        except ValueError as e:
            raise MalformedError(f"root.keys.{kid[:12]}.public: not an Ed25519 key") from e
        if key_id(pub) != kid:
            raise MalformedError(f"root.keys.{kid[:12]}: key id is not sha256 of the public key")
        keys[kid] = pub
    roles_raw = f.get("roles")
    if (
        not isinstance(roles_raw, dict)
        or not set(REQUIRED_ROLES) <= set(roles_raw)
        or not set(roles_raw) <= set(ROLES)
    ):
        raise MalformedError(
            f"root.roles: must define {', '.join(REQUIRED_ROLES)} and may define config, nothing else"
        )
    roles: dict[str, Role] = {}
    for name in ROLES:
        if name not in roles_raw:
            roles[name] = Role(frozenset(), 1)  # an absent optional role can sign nothing
            continue
        rf = _Fields(roles_raw[name], f"root.roles.{name}", ("keyids", "threshold"))
        ids = rf.text_list("keyids", HEX64_RE, MAX_KEYS)
        for kid in ids:
            if kid not in keys:
                raise MalformedError(f"root.roles.{name}.keyids: {kid[:12]} is not in root.keys")
        # A role with no keys (e.g. no rollout key yet) can never sign anything.
        threshold = rf.integer("threshold", 1, max(1, len(ids)))
        if name in ("root", "release") and not ids:
            raise MalformedError(f"root.roles.{name}.keyids: needs at least one key")
        roles[name] = Role(frozenset(ids), threshold)
    issued = parse_time(f.get("issued"), "root.issued")
    expires = parse_time(f.get("expires"), "root.expires")
    return Root(
        version=f.integer("version", 1, 2**31),
        issued=issued,
        expires=expires,
        keys=keys,
        roles=roles,
        envelope=env,
        raw=bytes(data),
    )


def root_signed(
    *,
    version: int,
    issued: int,
    expires: int,
    role_keys: Mapping[str, Sequence[Ed25519PublicKey]],
    thresholds: Mapping[str, int],
) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    roles: dict[str, Any] = {}
    for role in ROLES:
        if role not in REQUIRED_ROLES and not role_keys.get(role):
            continue  # an optional role without keys is left out: the root reads as before
        ids = []
        for pub in role_keys.get(role, ()):
            kid = key_id(pub)
            keys[kid] = {"keytype": "ed25519", "public": public_hex(pub)}
            ids.append(kid)
        roles[role] = {"keyids": sorted(set(ids)), "threshold": thresholds.get(role, 1)}
    return {
        "_type": "root",
        "schema": SCHEMA,
        "version": version,
        "issued": format_time(issued),
        "expires": format_time(expires),
        "keys": keys,
        "roles": roles,
    }


# -- release manifest ------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """The module a release pins: its size and sha256 and every chunk's hash.

    Two encodings, one reader: fixed-size chunks (``chunk_size``; every chunk
    but the last is that long) or content-defined chunks (``sizes``: each
    chunk's length, as a FastCDC chunker cut it). ``sizes`` and ``offsets``
    are filled in for both, so nothing downstream cares which one it was.
    """

    sha256: str
    size: int
    chunk_size: int
    """The fixed chunk size, or 0 when the boundaries are content-defined."""
    chunks: tuple[str, ...]
    sizes: tuple[int, ...] = ()
    offsets: tuple[int, ...] = ()

    @property
    def content_defined(self) -> bool:
        return self.chunk_size == 0

    def span(self, index: int) -> tuple[int, int]:
        """(offset, size) of chunk ``index``."""
        return self.offsets[index], self.sizes[index]


@dataclass(frozen=True)
class ReleaseLimits:
    memory_bytes: int
    tick_budget_ms: int
    tick_interval_ms: int
    kv_quota_bytes: int | None = None
    """Optional: the kv space the release needs (the device keeps its own quota)."""
    telemetry_rate_per_s: int | None = None
    """Optional: telemetry messages per second the release asks for."""


@dataclass(frozen=True)
class Health:
    trial_ticks: int
    trial_seconds: int
    max_traps: int
    max_overruns: int
    max_broker_loss_s: int


@dataclass(frozen=True)
class Targets:
    hardware: tuple[str, ...]
    devices: tuple[str, ...]
    rollout_percent: int
    rollout_salt: str


@dataclass(frozen=True)
class Manifest:
    app: str
    version: str
    sequence: int
    abi: int
    channel: str
    artifact: Artifact
    capabilities: frozenset[str]
    limits: ReleaseLimits
    health: Health
    targets: Targets
    issued: int
    expires: int
    envelope: Envelope = field(repr=False, compare=False)
    raw: bytes = field(repr=False, compare=False, default=b"")


def parse_health(obj: Any, where: str) -> Health:
    """A trial's rules (release manifests and config documents share them)."""
    hf = _Fields(
        obj, where, ("trial_ticks", "trial_seconds", "max_traps", "max_overruns"), ("max_broker_loss_s",)
    )
    return Health(
        hf.integer("trial_ticks", 0, 10_000_000),
        hf.integer("trial_seconds", 0, 86_400),
        hf.integer("max_traps", 0, 10_000_000),
        hf.integer("max_overruns", 0, 10_000_000),
        hf.integer("max_broker_loss_s", 0, 86_400, default=60),
    )


def parse_manifest(data: bytes) -> Manifest:
    """Parse without checking signatures (trust.verify_release checks them first)."""
    return manifest_from_envelope(parse_envelope(data, MAX_MANIFEST_BYTES, "manifest"), bytes(data))


def manifest_from_envelope(env: Envelope, raw: bytes = b"") -> Manifest:
    f = _Fields(
        env.signed,
        "manifest",
        (
            "_type",
            "schema",
            "app",
            "version",
            "sequence",
            "abi",
            "channel",
            "artifact",
            "capabilities",
            "limits",
            "health",
            "targets",
            "issued",
            "expires",
        ),
    )
    _schema(f, "release")
    abi = f.integer("abi", 0, 2**16)
    if abi != ABI_VERSION:
        raise UnsupportedError(f"manifest.abi: ABI v{abi} (this device runs v{ABI_VERSION})")
    artifact = parse_artifact(f.get("artifact"))
    caps = _Fields({"c": f.get("capabilities")}, "manifest", ("c",))
    cap_list = caps.text_list("c", re.compile("^(" + "|".join(CAPABILITIES) + ")$"), len(CAPABILITIES))
    lf = _Fields(
        f.get("limits"),
        "manifest.limits",
        ("memory_bytes", "tick_budget_ms", "tick_interval_ms"),
        ("kv_quota_bytes", "telemetry_rate_per_s"),
    )
    limits = ReleaseLimits(
        lf.integer("memory_bytes", 65536, 4 * 1024**3),
        lf.integer("tick_budget_ms", 1, 60_000),
        lf.integer("tick_interval_ms", 1, 3_600_000),
        None if lf.get("kv_quota_bytes") is None else lf.integer("kv_quota_bytes", 0, 1024**3),
        None if lf.get("telemetry_rate_per_s") is None else lf.integer("telemetry_rate_per_s", 0, 100_000),
    )
    health = parse_health(f.get("health"), "manifest.health")
    tf = _Fields(f.get("targets"), "manifest.targets", ("hardware",), ("devices", "rollout"))
    hardware = tf.text_list("hardware", ID_RE)
    if not hardware:
        raise MalformedError("manifest.targets.hardware: must name at least one hardware id")
    rollout = tf.get("rollout", {"percent": 100, "salt": ""})
    rf = _Fields(rollout, "manifest.targets.rollout", ("percent", "salt"))
    targets = Targets(
        hardware,
        tf.text_list("devices", ID_RE, max_n=10_000),
        rf.integer("percent", 0, 100),
        rf.text("salt", re.compile(r"^[A-Za-z0-9_.-]{0,64}$")),
    )
    issued = parse_time(f.get("issued"), "manifest.issued")
    expires = parse_time(f.get("expires"), "manifest.expires")
    if expires <= issued:
        raise MalformedError("manifest.expires: must be after issued")
    return Manifest(
        app=f.text("app", NAME_RE),
        version=f.text("version", SEMVER_RE),
        sequence=f.integer("sequence", 1, 2**53),
        abi=abi,
        channel=f.text("channel", NAME_RE),
        artifact=artifact,
        capabilities=frozenset(cap_list),
        limits=limits,
        health=health,
        targets=targets,
        issued=issued,
        expires=expires,
        envelope=env,
        raw=raw,
    )


def parse_artifact(obj: Any) -> Artifact:
    """``artifact`` of a release: fixed-size (``chunk_size``) or content-defined (``sizes``)."""
    af = _Fields(obj, "manifest.artifact", ("sha256", "size", "chunks"), ("chunk_size", "sizes"))
    size = af.integer("size", 1, MAX_ARTIFACT_BYTES)
    raw_chunks = af.get("chunks")
    if not isinstance(raw_chunks, list) or len(raw_chunks) > MAX_ARTIFACT_BYTES // MIN_CHUNK + 1:
        raise MalformedError("manifest.artifact.chunks: must be a list of chunk hashes")
    # identical chunks (e.g. zero padding) legitimately repeat a hash
    if not all(isinstance(h, str) and HEX64_RE.fullmatch(h) for h in raw_chunks):
        raise MalformedError("manifest.artifact.chunks: every entry must be 64 hex digits")
    has_fixed, has_sizes = af.get("chunk_size") is not None, af.get("sizes") is not None
    if has_fixed == has_sizes:
        raise MalformedError("manifest.artifact: exactly one of chunk_size and sizes")
    if has_fixed:
        chunk_size = af.integer("chunk_size", MIN_CHUNK, MAX_CHUNK)
        n_chunks = -(-size // chunk_size)
        if len(raw_chunks) != n_chunks:
            raise MalformedError(
                f"manifest.artifact.chunks: expected {n_chunks} chunk hashes for {size} bytes"
            )
        sizes = tuple(min(chunk_size, size - i * chunk_size) for i in range(n_chunks))
    else:
        chunk_size = 0
        raw_sizes = af.get("sizes")
        if not isinstance(raw_sizes, list) or len(raw_sizes) != len(raw_chunks):
            raise MalformedError("manifest.artifact.sizes: one size per chunk hash")
        if not all(type(n) is int and 1 <= n <= MAX_CHUNK for n in raw_sizes):
            raise MalformedError(f"manifest.artifact.sizes: every size must be an integer in 1..{MAX_CHUNK}")
        if sum(raw_sizes) != size:
            raise MalformedError(f"manifest.artifact.sizes: they add up to {sum(raw_sizes)}, not {size}")
        sizes = tuple(raw_sizes)
    offsets, pos = [], 0
    for n in sizes:
        offsets.append(pos)
        pos += n
    return Artifact(af.text("sha256", HEX64_RE), size, chunk_size, tuple(raw_chunks), sizes, tuple(offsets))


def artifact_fields(sha256: str, size: int, chunks: Sequence[tuple[int, str]]) -> dict[str, Any]:
    """The ``artifact`` of a release whose boundaries a content-defined chunker
    chose: ``chunks`` is ``(size, sha256)`` per chunk, in order."""
    return {
        "sha256": sha256,
        "size": size,
        "sizes": [n for n, _ in chunks],
        "chunks": [h for _, h in chunks],
    }


def chunk_hashes(module: bytes, chunk_size: int) -> list[str]:
    return [hashlib.sha256(module[i : i + chunk_size]).hexdigest() for i in range(0, len(module), chunk_size)]


def manifest_signed(
    *,
    app: str,
    version: str,
    sequence: int,
    module: bytes,
    capabilities: Sequence[str],
    hardware: Sequence[str],
    issued: int,
    expires: int,
    channel: str = "stable",
    devices: Sequence[str] = (),
    rollout_percent: int = 100,
    rollout_salt: str = "",
    chunk_size: int = DEFAULT_CHUNK,
    artifact: Mapping[str, Any] | None = None,
    memory_bytes: int = 16 * 1024 * 1024,
    tick_budget_ms: int = 10,
    tick_interval_ms: int = 100,
    trial_ticks: int = 50,
    trial_seconds: int = 5,
    max_traps: int = 0,
    max_overruns: int = 0,
    max_broker_loss_s: int = 60,
    kv_quota_bytes: int | None = None,
    telemetry_rate_per_s: int | None = None,
) -> dict[str, Any]:
    limits: dict[str, Any] = {
        "memory_bytes": memory_bytes,
        "tick_budget_ms": tick_budget_ms,
        "tick_interval_ms": tick_interval_ms,
    }
    if kv_quota_bytes is not None:
        limits["kv_quota_bytes"] = kv_quota_bytes
    if telemetry_rate_per_s is not None:
        limits["telemetry_rate_per_s"] = telemetry_rate_per_s
    targets: dict[str, Any] = {
        "hardware": list(hardware),
        "rollout": {"percent": rollout_percent, "salt": rollout_salt or f"{app}-{sequence}"},
    }
    if devices:
        targets["devices"] = list(devices)
    return {
        "_type": "release",
        "schema": SCHEMA,
        "app": app,
        "version": version,
        "sequence": sequence,
        "abi": ABI_VERSION,
        "channel": channel,
        "artifact": dict(artifact)
        if artifact is not None
        else {
            "sha256": hashlib.sha256(module).hexdigest(),
            "size": len(module),
            "chunk_size": chunk_size,
            "chunks": chunk_hashes(module, chunk_size),
        },
        "capabilities": sorted(set(capabilities)),
        "limits": limits,
        "health": {
            "trial_ticks": trial_ticks,
            "trial_seconds": trial_seconds,
            "max_traps": max_traps,
            "max_overruns": max_overruns,
            "max_broker_loss_s": max_broker_loss_s,
        },
        "targets": targets,
        "issued": format_time(issued),
        "expires": format_time(expires),
    }


# -- rollout document ---------------------------------------------------------------

MAX_ROLLOUT_VERSION = 2**53


@dataclass(frozen=True)
class RolloutDoc:
    """Signed by the ``rollout`` role: how far a release (app, channel, sequence)
    has been rolled out. It can widen, narrow, pause or resume a release that the
    release keys signed, and nothing else."""

    app: str
    channel: str
    sequence: int
    percent: int
    salt: str
    paused: bool
    version: int
    """Monotonic per (app, channel, kind): an older document never replaces a newer one."""
    issued: int
    expires: int
    envelope: Envelope = field(repr=False, compare=False)
    kind: str = "release"
    """What ``sequence`` counts: a release's sequence, or (``config``) a signed
    app configuration's version. Absent in the document means ``release``."""


def parse_rollout(data: bytes) -> RolloutDoc:
    return rollout_from_envelope(parse_envelope(data, MAX_ROLLOUT_BYTES, "rollout"))


def rollout_from_envelope(env: Envelope) -> RolloutDoc:
    f = _Fields(
        env.signed,
        "rollout",
        (
            "_type",
            "schema",
            "app",
            "channel",
            "sequence",
            "percent",
            "salt",
            "paused",
            "version",
            "issued",
            "expires",
        ),
        ("kind",),
    )
    _schema(f, "rollout")
    kind = f.get("kind", "release")
    if kind not in ROLLOUT_KINDS:
        raise MalformedError(f"rollout.kind: must be one of {', '.join(ROLLOUT_KINDS)}, got {kind!r}")
    paused = f.get("paused")
    if not isinstance(paused, bool):
        raise MalformedError("rollout.paused: must be true or false")
    issued = parse_time(f.get("issued"), "rollout.issued")
    expires = parse_time(f.get("expires"), "rollout.expires")
    return RolloutDoc(
        app=f.text("app", NAME_RE),
        channel=f.text("channel", NAME_RE),
        sequence=f.integer("sequence", 1, 2**53),
        percent=f.integer("percent", 0, 100),
        salt=f.text("salt", re.compile(r"^[A-Za-z0-9_.-]{0,64}$")),
        paused=paused,
        version=f.integer("version", 1, MAX_ROLLOUT_VERSION),
        issued=issued,
        expires=expires,
        envelope=env,
        kind=kind,
    )


def rollout_signed(
    *,
    app: str,
    channel: str,
    sequence: int,
    percent: int,
    salt: str,
    paused: bool,
    version: int,
    issued: int,
    expires: int,
    kind: str = "release",
) -> dict[str, Any]:
    extra = {"kind": kind} if kind != "release" else {}  # release documents read as before
    return {
        **extra,
        "_type": "rollout",
        "schema": SCHEMA,
        "app": app,
        "channel": channel,
        "sequence": sequence,
        "percent": percent,
        "salt": salt,
        "paused": paused,
        "version": version,
        "issued": format_time(issued),
        "expires": format_time(expires),
    }
