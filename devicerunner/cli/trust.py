"""Operator commands: keygen, trust init/rotate, sign, verify.

Each command checks its own output before writing it (a root that its
signers cannot make valid, or a module that would not link under its grant,
is refused with the reason), and writes files atomically.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

from devicerunner.device.config import parse_capabilities
from devicerunner.errors import ConfigError, DeviceRunnerError, VerificationError
from devicerunner.runtime.fsutil import atomic_write
from devicerunner.trust import bundle, chunking, keys, manifest
from devicerunner.trust import verify as trust

DAY = 86_400


class OperatorError(DeviceRunnerError):
    pass


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _write(path: str, data: bytes) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(p, data)


def _now(args: argparse.Namespace) -> int:
    return int(args.now) if getattr(args, "now", None) is not None else int(time.time())


# -- keygen ----------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    if not manifest.ID_RE.fullmatch(args.name):
        raise OperatorError(f"key name {args.name!r}: use [A-Za-z0-9_.-]")
    password = _passphrase(args)
    priv, pub, kid = keys.generate(args.name, Path(args.dir), password)
    advice = keygen_advice(args.name)
    if args.json:
        doc = {
            "keyid": kid,
            "private": str(priv),
            "public": str(pub),
            "encrypted": bool(password),
            "advice": advice,
        }
        print(json.dumps(doc))
    else:
        state = "encrypted with the passphrase" if password else "UNENCRYPTED (see --passphrase-file)"
        print(f"{kid}\n  private key: {priv} (mode 0600, {state}; {advice})\n  public key:  {pub}")
    return 0


def _passphrase(args: argparse.Namespace) -> bytes | None:
    return keys.passphrase(getattr(args, "passphrase_file", None))


def keygen_advice(name: str) -> str:
    """How to keep a key, by the role its name suggests: the rollout key signs
    rollout documents while a rollout runs, so it lives where the controller
    runs; root and release keys sign rarely and stay offline."""
    if "rollout" in name.lower():
        return (
            "an online key: keep it on the host that runs `devicerunner rollout`; it can only "
            "move the percent/pause of releases already signed by the release role"
        )
    return "keep it offline; bring it out only to sign"


# -- trust init / rotate -----------------------------------------------------------


def _role_keys(args: argparse.Namespace, base: manifest.Root | None) -> tuple[dict[str, Any], dict[str, int]]:
    role_keys: dict[str, Any] = {}
    thresholds: dict[str, int] = {}
    for role in manifest.ROLES:
        paths = getattr(args, f"{role}_key") or []
        threshold = getattr(args, f"{role}_threshold")
        if paths:
            role_keys[role] = [keys.load_public(Path(p)) for p in paths]
            if threshold is None and base is not None:
                threshold = base.role(role).threshold  # a rotation keeps a role's threshold
        elif base is not None:
            r = base.role(role)
            role_keys[role] = [base.keys[k] for k in sorted(r.keyids)]
            threshold = r.threshold if threshold is None else threshold
        else:
            role_keys[role] = []
        n = len(role_keys[role])
        threshold = 1 if threshold is None else threshold  # an explicit 0 is refused below, not made 1
        if n and not 1 <= threshold <= n:
            raise OperatorError(f"--{role}-threshold {threshold}: must be between 1 and {n} ({role} keys)")
        thresholds[role] = threshold
    if not role_keys["root"] or not role_keys["release"]:
        raise OperatorError("a root needs at least one --root-key and one --release-key")
    return role_keys, thresholds


def _signed_root(args: argparse.Namespace, version: int, base: manifest.Root | None) -> bytes:
    """Root ``version`` from the role options (roles not given come from ``base``), signed with --sign."""
    role_keys, thresholds = _role_keys(args, base)
    now = _now(args)
    signed = manifest.root_signed(
        version=version,
        issued=now,
        expires=now + args.expires_days * DAY,
        role_keys=role_keys,
        thresholds=thresholds,
    )
    return manifest.sign_envelope(signed, [keys.load_private(Path(k), _passphrase(args)) for k in args.sign])


def cmd_trust_init(args: argparse.Namespace) -> int:
    data = _signed_root(args, 1, None)
    try:
        root = trust.load_trusted_root(data)
    except VerificationError as e:
        raise OperatorError(f"the signing keys do not make a valid root: {e}") from e
    _write(args.output, data)
    _report_root(args, root, f"root v1, expires {manifest.format_time(root.expires)}")
    return 0


ROLE_WITHOUT_KEYS = {
    "rollout": "devices will refuse every rollout document (devicerunner rollout); add --rollout-key",
}


def _report_root(args: argparse.Namespace, root: manifest.Root, what: str) -> None:
    """Print what a root holds; warn (stderr) for each role without keys."""
    roles = {role: (root.role(role).threshold, len(root.role(role).keyids)) for role in manifest.ROLES}
    warnings = [
        f"the {role} role has no keys: {ROLE_WITHOUT_KEYS.get(role, 'it can sign nothing')}"
        for role, (_, n) in roles.items()
        if n == 0
    ]
    for w in warnings:
        print(f"devicerunner: warning: {w}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "output": args.output,
                    "version": root.version,
                    "expires": manifest.format_time(root.expires),
                    "roles": {r: {"threshold": t, "keys": n} for r, (t, n) in roles.items()},
                    "warnings": warnings,
                }
            )
        )
        return
    print(f"wrote {args.output}: {what}")
    for role, (t, n) in roles.items():
        print(f"  {role:8} {t} of {n} keys")


def cmd_trust_rotate(args: argparse.Namespace) -> int:
    current_raw = Path(args.current).read_bytes()
    current = manifest.parse_root(current_raw)
    data = _signed_root(args, current.version + 1, current)
    try:
        new = trust.update_root(current, data)
    except VerificationError as e:
        raise OperatorError(
            f"{e}. A rotation must be signed by a threshold of the current root keys "
            "and a threshold of the new ones (pass both with --sign)."
        ) from e
    _write(args.output, data)
    _report_root(args, new, f"root v{new.version} (follows v{current.version})")
    return 0


# -- sign ---------------------------------------------------------------------------


def cmd_sign(args: argparse.Namespace) -> int:
    from devicerunner.sandbox.engine import Sandbox, load_module_bytes

    module = load_module_bytes(Path(args.module))
    try:
        caps = parse_capabilities("--grant", _csv(args.grant))
    except ConfigError as e:
        raise OperatorError(str(e)) from e
    # Refuse to sign what could never run: it must compile and link under its grant.
    sb = Sandbox()
    try:
        sb.check_imports(sb.compile(module), caps)
    finally:
        sb.close()
    now = _now(args)
    kind = args.chunking or ("fixed" if args.chunk_size else "fastcdc")
    how = (
        chunking.Chunking("fixed", fixed_bytes=args.chunk_size or manifest.DEFAULT_CHUNK)
        if kind == "fixed"
        else chunking.for_size(len(module))
    )
    signed = manifest.manifest_signed(
        app=args.app,
        version=args.version,
        sequence=args.sequence,
        module=module,
        capabilities=sorted(caps),
        hardware=_csv(args.hardware),
        devices=_csv(args.devices) if args.devices else (),
        issued=now,
        expires=now + args.expires_days * DAY,
        channel=args.channel,
        rollout_percent=args.rollout_percent,
        artifact=chunking.artifact_of(io.BytesIO(module), how),
        memory_bytes=args.memory_limit,
        tick_budget_ms=args.tick_budget_ms,
        tick_interval_ms=args.tick_interval_ms,
        trial_ticks=args.trial_ticks,
        trial_seconds=args.trial_seconds,
        max_traps=args.max_traps,
        max_overruns=args.max_overruns,
    )
    env = manifest.sign_envelope(signed, [keys.load_private(Path(k), _passphrase(args)) for k in args.key])
    m = manifest.parse_manifest(env)  # the same strict parser the device runs
    _write(args.output, bundle.pack(env, module))
    if args.json:
        print(
            json.dumps(
                {
                    "output": args.output,
                    "app": m.app,
                    "version": m.version,
                    "sequence": m.sequence,
                    "sha256": m.artifact.sha256,
                    "size": m.artifact.size,
                    "chunks": len(m.artifact.chunks),
                    "signatures": len(m.envelope.signatures),
                }
            )
        )
        return 0
    print(
        f"wrote {args.output}: {m.app} {m.version} sequence {m.sequence}, {m.artifact.size} bytes in "
        f"{len(m.artifact.chunks)} chunk(s), {len(m.envelope.signatures)} signature(s)"
    )
    return 0


def cmd_cosign(args: argparse.Namespace) -> int:
    root = trust.load_trusted_root(Path(args.root).read_bytes())
    release = root.role("release")
    env, module = bundle.unpack(Path(args.bundle).read_bytes())
    signers = []
    for path in args.key:
        key = keys.load_private(Path(path), _passphrase(args))
        kid = manifest.key_id(key.public_key())
        if kid not in release.keyids:
            held = [r for r in manifest.ROLES if kid in root.role(r).keyids]
            raise OperatorError(
                f"{path} is not a release key of {args.root}"
                + (f" (it is a {' and '.join(held)} key)" if held else "")
                + ": a release is signed by release keys only"
            )
        signers.append(key)
    env = manifest.add_signatures(env, signers, manifest.MAX_MANIFEST_BYTES)
    out = args.output or args.bundle
    _write(out, bundle.pack(env, module))
    parsed = manifest.parse_envelope(env, manifest.MAX_MANIFEST_BYTES, "manifest")
    valid = manifest.valid_signers(parsed, root.keys, release.keyids)
    if args.json:
        print(
            json.dumps(
                {
                    "output": out,
                    "release_signatures": len(valid),
                    "threshold": release.threshold,
                    "complete": len(valid) >= release.threshold,
                }
            )
        )
    else:
        more = release.threshold - len(valid)
        state = "threshold met" if more <= 0 else f"{more} more needed"
        print(f"wrote {out}: {len(valid)} of {release.threshold} release signature(s), {state}")
    return 0


# -- verify -------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    result: dict[str, Any] = {"bundle": args.bundle}
    root_bytes = Path(args.root).read_bytes()  # a missing file is a usage error (exit 2), not INVALID
    bundle_bytes = Path(args.bundle).read_bytes()
    try:
        root = trust.load_trusted_root(root_bytes)
        env, module = bundle.unpack(bundle_bytes)
        m = manifest.parse_manifest(env)
        caps = parse_capabilities("--policy", _csv(args.policy)) if args.policy else m.capabilities
        device = trust.DeviceIdentity(
            device_id=args.device_id,
            hardware=args.hardware or m.targets.hardware[0],
            policy={m.app: caps},
            limits={m.app: trust.NO_LIMITS},  # no device config here: resource ceilings are not checked
        )
        history = {m.app: trust.AppHistory(highest_sequence=args.highest_sequence)}
        m = trust.verify_release(
            env, root=root, device=device, history=history, time_floor=args.time_floor, now=_now(args)
        )
        trust.verify_artifact(m, module)
    except (DeviceRunnerError, ConfigError) as e:
        reason = getattr(e, "reason", "invalid")
        result.update(valid=False, reason=reason, error=str(e))
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"INVALID ({reason}): {e}", file=sys.stderr)
        return 1
    signers = trust.check_threshold(m.envelope, root, "release", "manifest")
    result.update(
        valid=True,
        app=m.app,
        version=m.version,
        sequence=m.sequence,
        channel=m.channel,
        sha256=m.artifact.sha256,
        size=m.artifact.size,
        capabilities=sorted(m.capabilities),
        hardware=list(m.targets.hardware),
        expires=manifest.format_time(m.expires),
        signed_by=sorted(signers),
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"OK: {m.app} {m.version} (sequence {m.sequence}) signed by {len(signers)} release key(s), "
            f"{m.artifact.size} bytes, expires {result['expires']}"
        )
    return 0


# -- parser --------------------------------------------------------------------------


JSON_HELP = "print the result as one JSON object on stdout"


def _role_options(p: argparse.ArgumentParser, required: bool) -> None:
    for role in manifest.ROLES:
        p.add_argument(
            f"--{role}-key",
            action="append",
            metavar="PUB",
            required=required and role in ("root", "release"),
            help=f"public key of the {role} role (repeat for several)"
            + ("; without one, devices refuse every rollout document" if role == "rollout" else ""),
        )
        p.add_argument(
            f"--{role}-threshold",
            type=int,
            metavar="N",
            help=f"signatures the {role} role needs (default: 1, or the current root's on rotate)",
        )


def _passphrase_option(p: Any) -> None:
    p.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help=f"private keys are encrypted with (and read with) the first line of FILE; "
        f"default: ${keys.PASSPHRASE_ENV}, else unencrypted",
    )


def register(sub: Any) -> Any:
    k = sub.add_parser("keygen", help="create an Ed25519 key pair (NAME.key, NAME.pub)")
    k.add_argument(
        "name", help="key name: root, rel1, rollout, ... (a name with 'rollout' is the online key)"
    )
    k.add_argument("--dir", default=".", help="directory for NAME.key and NAME.pub")
    k.add_argument("--json", action="store_true", help=JSON_HELP)
    k.set_defaults(func=cmd_keygen)
    _passphrase_option(k)

    t = sub.add_parser("trust", help="create, rotate and publish the trust root")
    tsub = t.add_subparsers(dest="trust_cmd", required=True)
    ti = tsub.add_parser("init", help="create root.json (version 1)")
    _role_options(ti, required=True)
    ti.add_argument("--sign", action="append", required=True, metavar="KEY", help="root private key (repeat)")
    ti.add_argument("--expires-days", type=int, default=365, help="the root expires this many days from now")
    ti.add_argument("-o", "--output", required=True, help="where to write the root, e.g. root.json")
    ti.add_argument("--json", action="store_true", help=JSON_HELP)
    ti.set_defaults(func=cmd_trust_init)
    _passphrase_option(ti)
    tr = tsub.add_parser("rotate", help="create the next root version (unchanged roles are kept)")
    tr.add_argument("--current", required=True, help="the current root.json")
    _role_options(tr, required=False)
    tr.add_argument(
        "--sign",
        action="append",
        required=True,
        metavar="KEY",
        help="private keys: a threshold of the current root keys and of the new ones",
    )
    tr.add_argument("--expires-days", type=int, default=365, help="the root expires this many days from now")
    tr.add_argument("-o", "--output", required=True, help="where to write the new root")
    tr.add_argument("--json", action="store_true", help=JSON_HELP)
    tr.set_defaults(func=cmd_trust_rotate)
    _passphrase_option(tr)

    s = sub.add_parser("sign", help="sign a module into a release bundle")
    s.add_argument("module", help=".wasm or .wat file")
    s.add_argument("--app", required=True, help="app name, as in [apps.NAME] of device.toml")
    s.add_argument("--version", required=True, help="semver, for people")
    s.add_argument("--sequence", required=True, type=int, help="anti-rollback counter; must increase")
    s.add_argument("--grant", required=True, help="capabilities, comma-separated")
    s.add_argument("--hardware", required=True, help="hardware ids, comma-separated")
    s.add_argument("--devices", help="restrict to these device ids, comma-separated (default: every device)")
    s.add_argument("--channel", default="stable", help="release channel devices follow")
    s.add_argument("--expires-days", type=int, default=30, help="the release expires this many days from now")
    s.add_argument(
        "--rollout-percent",
        type=int,
        default=100,
        help="devices that may take it before any rollout document",
    )
    s.add_argument(
        "--chunking",
        choices=("fastcdc", "fixed"),
        help="content-defined chunks (default: deltas fetch only what changed) or fixed-size",
    )
    s.add_argument("--chunk-size", type=int, help="bytes per chunk with --chunking fixed (default 65536)")
    s.add_argument("--memory-limit", type=int, default=16 * 1024 * 1024, help="app memory limit, bytes")
    s.add_argument("--tick-budget-ms", type=int, default=10, help="CPU budget per tick")
    s.add_argument("--tick-interval-ms", type=int, default=100, help="time between ticks")
    s.add_argument("--trial-ticks", type=int, default=50, help="ticks the trial watches")
    s.add_argument("--trial-seconds", type=int, default=5, help="seconds the trial lasts at least")
    s.add_argument("--max-traps", type=int, default=0, help="traps the trial tolerates")
    s.add_argument("--max-overruns", type=int, default=0, help="overruns the trial tolerates")
    s.add_argument("--key", action="append", required=True, help="release private key (repeat)")
    s.add_argument("-o", "--output", required=True, help="where to write the bundle")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_sign)
    _passphrase_option(s)

    c = sub.add_parser("cosign", help="add release signatures to a bundle (keys held by different people)")
    c.add_argument("bundle", help="a bundle from devicerunner sign")
    c.add_argument("--root", required=True, help="the trust root: only its release keys may sign")
    c.add_argument("--key", action="append", required=True, help="release private key (repeat)")
    c.add_argument("-o", "--output", help="write here (default: replace BUNDLE)")
    c.add_argument("--json", action="store_true", help=JSON_HELP)
    c.set_defaults(func=cmd_cosign)
    _passphrase_option(c)

    v = sub.add_parser("verify", help="verify a bundle against a root, as a device would")
    v.add_argument("bundle", help="a bundle from devicerunner sign")
    v.add_argument("--root", required=True, help="the trust root, e.g. root.json")
    v.add_argument("--hardware", help="the device's hardware id (default: the first the release targets)")
    v.add_argument("--device-id", default="verify-cli", help="the device's id")
    v.add_argument("--policy", help="the device policy for the app (default: what the manifest asks)")
    v.add_argument("--highest-sequence", type=int, default=0, help="highest sequence the device accepted")
    v.add_argument("--time-floor", type=int, default=0, help="the device's trusted-time floor (Unix s)")
    v.add_argument("--now", type=int, help="judge expiry at this Unix time (default: now)")
    v.add_argument("--json", action="store_true", help=JSON_HELP)
    v.set_defaults(func=cmd_verify)
    return tsub
