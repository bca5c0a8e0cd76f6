"""Operator commands for apps that listen: ``config sign``, ``config publish``,
``config verify`` and ``send``.

``config sign`` is the one place a config document is built from the
command line (appconfig.config_signed is the format's one writer); values
given as ``KEY=VALUE`` become integers, booleans or strings — a decimal
stays a string (``setpoint=21.5`` -> ``"21.5"``), as signed JSON has no
floats.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

from devicerunner.cli.mqtt import _broker_opts, _settings
from devicerunner.device import config as device_config
from devicerunner.errors import DeviceRunnerError, VerificationError
from devicerunner.transport import operator, topics
from devicerunner.trust import appconfig, keys, manifest
from devicerunner.trust import verify as trust
from devicerunner.trust.manifest import Health
from devicerunner.update.config_updates import install_config
from hostfuncs.messages import MAX_PAYLOAD, TOPIC_RE

DAY = 86_400


class ConfigUsageError(DeviceRunnerError):
    pass


def setting_value(text: str) -> Any:
    """``KEY=VALUE`` text as a setting: an integer, a boolean, or else the string
    (decimals stay strings: signed JSON has no floats)."""
    if re.fullmatch(r"-?(0|[1-9]\d{0,15})", text):
        return int(text)
    if text in ("true", "false"):
        return text == "true"
    return text


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if args.file:
        try:
            loaded = json.loads(Path(args.file).read_text())
        except ValueError as e:
            raise ConfigUsageError(f"{args.file}: not JSON: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigUsageError(f"{args.file}: must hold a JSON object of settings")
        settings.update(loaded)
    for item in args.set or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ConfigUsageError(f"--set {item!r}: expected KEY=VALUE")
        settings[k] = setting_value(v)
    # floats from a JSON file: keep their text, as strings (signed JSON has no floats)
    return {k: (repr(v) if isinstance(v, float) else v) for k, v in settings.items()}


def cmd_config_sign(args: argparse.Namespace) -> int:
    now = int(time.time())
    health = None
    if args.trial_ticks is not None or args.trial_seconds is not None:
        health = Health(
            args.trial_ticks if args.trial_ticks is not None else 50,
            args.trial_seconds if args.trial_seconds is not None else 5,
            args.max_traps,
            args.max_overruns,
            60,
        )
    signed = appconfig.config_signed(
        app=args.app,
        version=args.version,
        settings=settings_from(args),
        hardware=[h for h in args.hardware.split(",") if h],
        devices=[d for d in (args.devices or "").split(",") if d],
        channel=args.channel,
        issued=now,
        expires=now + args.expires_days * DAY,
        rollout_percent=args.rollout_percent,
        health=health,
    )
    data = manifest.sign_envelope(signed, [keys.load_private(Path(k)) for k in args.key])
    doc = appconfig.parse_config(data)  # what the device will parse: refuse here, not there
    Path(args.output).write_bytes(data)
    print(
        f"wrote {args.output}: config v{doc.version} for {doc.app} ({doc.channel}), "
        f"{len(doc.settings)} setting(s), {len(doc.settings_bytes)} bytes"
    )
    return 0


def cmd_config_verify(args: argparse.Namespace) -> int:
    data = Path(args.document).read_bytes()
    root = trust.load_trusted_root(Path(args.root).read_bytes())
    doc = appconfig.parse_config(data)
    device = trust.DeviceIdentity(
        args.device_id, args.hardware or doc.targets.hardware[0], {doc.app: frozenset()}
    )
    try:
        doc = appconfig.verify_config(
            data,
            root=root,
            device=device,
            channel=None,
            history=appconfig.ConfigHistory(args.highest_version),
            time_floor=0,
            now=int(time.time()) if args.now is None else args.now,
        )
    except VerificationError as e:
        print(f"REJECTED ({e.reason}): {e}")
        return 1
    print(f"OK: config v{doc.version} for {doc.app}: {doc.settings_bytes.decode()}")
    return 0


def cmd_config_install(args: argparse.Namespace) -> int:
    cfg = device_config.load(Path(args.config))
    path = install_config(cfg.state_dir, Path(args.document).read_bytes())
    print(
        f"queued {args.document} as {path.name}; a running daemon takes it within a second, "
        "a stopped one at its next start. Follow it with: devicerunner status --config " + args.config
    )
    return 0


def cmd_config_publish(args: argparse.Namespace) -> int:
    data = Path(args.document).read_bytes()
    doc = appconfig.parse_config(data)
    s = _settings(args)
    with operator.Session(s) as sess:
        sess.publish_many([(topics.config(args.prefix, doc.app, doc.channel), data)], retain=True)
    print(f"published config v{doc.version} for {doc.app} on channel {doc.channel} to {s.url}")
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    payload = args.payload.encode()
    if len(payload) > MAX_PAYLOAD:
        raise ConfigUsageError(f"payload is {len(payload)} bytes; apps take at most {MAX_PAYLOAD}")
    if not TOPIC_RE.match(args.topic):
        raise ConfigUsageError(f"--topic {args.topic!r}: [A-Za-z0-9_.-] segments separated by /")
    base = topics.app_inbox(args.prefix, args.app, None if args.all else args.device)
    s = _settings(args)
    replies: list[tuple[str, bytes]] = []
    got = threading.Event()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        # strict: some brokers match (or replay retained messages) more loosely than asked
        parts = str(msg.topic)[len(args.prefix) + 1 :].split("/")
        ours = len(parts) == 5 and parts[0] == "devices" and parts[2:] == ["telemetry", args.app, "reply"]
        if ours and (args.all or parts[1] == args.device):
            replies.append((parts[1], bytes(msg.payload)))
            got.set()

    with operator.Session(s) as sess:
        if args.reply:
            # subscribed on the same connection before the message goes out: no reply is missed
            sess.client.on_message = on_message
            reply_topic = topics.telemetry(args.prefix, "+" if args.all else args.device, args.app, "reply")
            sess.client.subscribe(reply_topic, 1)
        sess.publish_many([(f"{base}/{args.topic}", payload)], retain=False)
        who = "every device running it" if args.all else f"device {args.device}"
        print(f"sent {len(payload)} bytes to {args.app} on {who} ({base}/{args.topic})", flush=True)
        if args.reply and args.all:
            time.sleep(args.reply)  # every device's reply in that time (a fleet has no "last one")
        elif args.reply:
            got.wait(args.reply)
    for device, body in replies:
        print(f"reply from {device}: {body.decode('utf-8', 'replace')}")
    if args.reply and not replies:
        print(f"no reply within {args.reply:g} s (the app replies with telemetry 'reply', if it does)")
        return 1
    return 0


def register(sub: Any) -> None:
    c = sub.add_parser("config", help="signed app configuration: sign, verify, publish")
    csub = c.add_subparsers(dest="config_cmd", required=True)
    s = csub.add_parser("sign", help="make a config document signed by the config role")
    s.add_argument("--app", required=True, help="app name, as in [apps.NAME] of device.toml")
    s.add_argument("--version", required=True, type=int, help="monotonic per app and channel")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="a setting (repeat)")
    s.add_argument("--file", help="a JSON object of settings (--set entries override it)")
    s.add_argument("--hardware", required=True, help="hardware ids, comma-separated")
    s.add_argument("--devices", help="restrict to these device ids, comma-separated")
    s.add_argument("--channel", default="stable", help="the channel devices follow")
    s.add_argument("--rollout-percent", type=int, default=100, help="0 for a staged `rollout`")
    s.add_argument("--trial-ticks", type=int, help="trial rules (default: those of the running release)")
    s.add_argument(
        "--trial-seconds", type=int, help="seconds the trial lasts at least (default: the release's)"
    )
    s.add_argument("--max-traps", type=int, default=0, help="traps the trial tolerates")
    s.add_argument("--max-overruns", type=int, default=0, help="overruns the trial tolerates")
    s.add_argument(
        "--expires-days", type=int, default=30, help="the document expires this many days from now"
    )
    s.add_argument("--key", action="append", required=True, help="config private key (repeat)")
    s.add_argument("-o", "--output", required=True, help="where to write the signed document")
    s.set_defaults(func=cmd_config_sign)

    v = csub.add_parser("verify", help="verify a config document against a root, as a device would")
    v.add_argument("document", help="a signed config document (config sign -o)")
    v.add_argument("--root", required=True, help="the trust root, e.g. root.json")
    v.add_argument("--hardware", help="the device's hardware id (default: the first targeted)")
    v.add_argument("--device-id", default="verify-cli", help="the device's id")
    v.add_argument("--highest-version", type=int, default=0, help="the newest config version the device took")
    v.add_argument("--now", type=int, help="judge expiry at this Unix time (default: now)")
    v.set_defaults(func=cmd_config_verify)

    i = csub.add_parser("install", help="hand a config document to a device through its local inbox")
    i.add_argument("document", help="a signed config document")
    i.add_argument("--config", required=True, help="the device's device.toml")
    i.set_defaults(func=cmd_config_install)

    p = csub.add_parser("publish", help="publish a config document (retained) for every device at once")
    p.add_argument("document", help="a signed config document")
    _broker_opts(p)
    p.set_defaults(func=cmd_config_publish)

    m = sub.add_parser("send", help="send a message to an app on one device or on every device")
    m.add_argument("app", help="the app the message is for")
    who = m.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", metavar="ID", help="one device")
    who.add_argument("--all", action="store_true", help="every device running the app")
    m.add_argument("payload", help="the message's bytes (UTF-8 text)")
    m.add_argument("--topic", default="cmd", help="the app sees it as the message's topic (default: cmd)")
    m.add_argument(
        "--reply",
        type=float,
        metavar="SECONDS",
        help="wait this long for the app's telemetry 'reply' and print it (--all: every reply in that time)",
    )
    _broker_opts(m)
    m.set_defaults(func=cmd_send)
