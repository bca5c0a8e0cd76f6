"""MQTT commands: publish, trust publish, serve-artifacts, gc, fleet status, broker."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from devicerunner.transport import operator, reports
from devicerunner.transport.settings import BrokerSettings, parse_url
from devicerunner.transport.topics import DEFAULT_PREFIX


def _settings(args: argparse.Namespace) -> BrokerSettings:
    return parse_url(
        args.broker,
        ca_file=Path(args.ca_file) if args.ca_file else None,
        cert_file=Path(args.cert_file) if args.cert_file else None,
        key_file=Path(args.key_file) if args.key_file else None,
    )


def cmd_publish(args: argparse.Namespace) -> int:
    if not args.broker and not args.dir:
        raise operator.OperatorError("publish: give --broker URL, --dir DIR or both")
    t0 = time.monotonic()
    if args.dir:  # the artifact servers' and HTTP hosts' copy first: devices may ask at once
        from devicerunner.fleet.artifacts import ArtifactDir

        m = ArtifactDir(Path(args.dir)).add_bundle(Path(args.bundle), args.channel)
    if args.broker:
        s = _settings(args)
        bar = None if args.json else operator.progress_bar(sys.stderr)
        with open(args.bundle, "rb") as f:
            m = operator.publish_bundle_file(
                s, f, args.prefix, args.channel, progress=bar, retain=not args.no_retain
            )
    dt = time.monotonic() - t0
    where = " and ".join(x for x in (args.broker and _settings(args).url, args.dir) if x)
    if args.json:
        print(
            json.dumps(
                {
                    "app": m.app,
                    "version": m.version,
                    "sequence": m.sequence,
                    "channel": m.channel,
                    "sha256": m.artifact.sha256,
                    "chunks": len(m.artifact.chunks),
                    "seconds": round(dt, 3),
                }
            )
        )
    else:
        print(
            f"published {m.app} {m.version} (sequence {m.sequence}) to {where} on channel {m.channel}: "
            f"{len(m.artifact.chunks)} chunk(s), {m.artifact.size} bytes in {dt:.2f} s"
        )
    return 0


def cmd_trust_publish(args: argparse.Namespace) -> int:
    data = Path(args.root).read_bytes()
    if args.dir:
        from devicerunner.fleet.artifacts import ArtifactDir
        from devicerunner.trust import manifest

        version = manifest.parse_root(data).version
        ArtifactDir(Path(args.dir)).put_document(f"trust/roots/{version}", data)
        ArtifactDir(Path(args.dir)).put_document("trust/root", data)
    s = _settings(args)
    root = operator.publish_root(s, data, args.prefix, retain=not args.no_retain)
    if args.json:
        print(json.dumps({"published": "root", "version": root.version, "broker": s.url}))
    else:
        print(f"published trust root v{root.version} to {s.url}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    kept, removed = operator.gc(_settings(args), args.prefix, args.dry_run)
    if args.json:
        print(json.dumps({"removed": removed, "kept": kept, "dry_run": args.dry_run}))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {removed} unreferenced chunk(s); {kept} still referenced")
    return 0


SMALL_FLEET = 20
"""Up to this many devices, ``fleet status`` lists them under the summary."""


def cmd_fleet_status(args: argparse.Namespace) -> int:
    fleet = operator.fleet_status(_settings(args), args.prefix, quiet_s=args.wait, spread_s=args.spread)
    if args.json:
        doc: dict[str, Any] = {"summary": fleet_summary(fleet)}
        if args.devices or len(fleet) <= SMALL_FLEET:
            doc["devices"] = {d: st.as_dict() for d, st in fleet.items()}
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    if not fleet:
        print("no device has reported status yet")
        return 0
    _print_summary(fleet_summary(fleet))
    if args.devices or len(fleet) <= SMALL_FLEET:
        print()
        _print_devices(fleet)
    else:
        print(f"\n(--devices lists each of the {len(fleet)} devices)")
    return 0


def fleet_summary(fleet: dict[str, reports.DeviceStatus]) -> dict[str, Any]:
    """Counts a fleet operator reads first: online, and devices per hardware
    and per (app, version, sequence, phase)."""
    hardware: Counter[str] = Counter()
    apps: Counter[tuple[str, str, int, str]] = Counter()
    for st in fleet.values():
        hardware[st.hardware] += 1
        for name, a in st.apps.items():
            apps[(name, a.version or "-", a.sequence, a.phase)] += 1
    return {
        "devices": len(fleet),
        "online": sum(1 for st in fleet.values() if st.online),
        "hardware": dict(sorted(hardware.items())),
        "apps": [
            {"app": app, "version": ver, "sequence": seq, "phase": phase, "devices": n}
            for (app, ver, seq, phase), n in sorted(apps.items())
        ],
    }


def _print_summary(s: dict[str, Any]) -> None:
    print(f"{s['devices']} device(s): {s['online']} online, {s['devices'] - s['online']} offline")
    print("hardware: " + ", ".join(f"{hw} {n}" for hw, n in s["hardware"].items()))
    rows = [(a["app"], a["version"], str(a["sequence"]), a["phase"], str(a["devices"])) for a in s["apps"]]
    _table(("APP", "VERSION", "SEQ", "PHASE", "DEVICES"), rows)


def _table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _print_devices(fleet: dict[str, reports.DeviceStatus]) -> None:
    rows = []
    for dev in sorted(fleet):
        d = fleet[dev]
        apps: list[tuple[str, reports.AppReport | None]] = list(sorted(d.apps.items())) or [("-", None)]
        for app, a in apps:
            rows.append(
                (
                    dev,
                    "online" if d.online else "offline",
                    d.hardware,
                    app,
                    *(_app_columns(a) if a is not None else ("-", "-", "-", "-", "-", "")),
                )
            )
    head = (
        "DEVICE",
        "STATE",
        "HARDWARE",
        "APP",
        "VERSION",
        "SEQ",
        "PHASE",
        "CANDIDATE",
        "CONFIG",
        "LAST ERROR",
    )
    _table(head, rows)


def _app_columns(a: reports.AppReport) -> tuple[str, str, str, str, str, str]:
    """VERSION and SEQ are the active (committed) release; CANDIDATE the one
    being downloaded or on trial, if any; CONFIG the app's signed config."""
    cand = ""
    if a.pending_sequence is not None:
        cand = f"{a.pending_version or '?'} (seq {a.pending_sequence})"
    err = a.last_error or ""
    if err and a.last_error_sequence is not None:
        err = f"seq {a.last_error_sequence}: {err}"
    config = f"v{a.config_version} {a.config_phase or ''}".strip() if a.config_version is not None else "-"
    return (a.version or "-", str(a.sequence), a.phase, cand, config, (err or a.config_last_error or "")[:70])


def cmd_broker(args: argparse.Namespace) -> int:
    from devicerunner.fleet.broker import EmbeddedBroker

    b = EmbeddedBroker(args.host, args.port)
    b.start()
    print(f"embedded broker listening on {b.url} (Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    stop.wait(args.for_s)
    b.stop()
    return 0


def cmd_serve_artifacts(args: argparse.Namespace) -> int:
    from devicerunner.fleet.artifacts import ArtifactServer

    srv = ArtifactServer(_settings(args), args.prefix, Path(args.dir), share=not args.no_share).start()
    print(f"serving artifacts from {args.dir} on {srv.s.url} ({srv.filter()}); Ctrl-C to stop", flush=True)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    stop.wait(args.for_s)
    srv.stop()
    print(json.dumps(srv.stats), flush=True)
    return 0


def _retain_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", help="also write it into this artifact directory (serve-artifacts, HTTP hosts)")
    p.add_argument(
        "--no-retain", action="store_true", help="the broker has no retained messages: publish live only"
    )


def _broker_opts(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--broker",
        required=required,
        metavar="URL",
        help="mqtt://host:port or mqtts://host:port (user name and password: DR_MQTT_USERNAME, "
        "DR_MQTT_PASSWORD)",
    )
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix")
    p.add_argument("--ca-file", help="CA certificate for mqtts:// (default: the system's)")
    p.add_argument("--cert-file", help="client certificate (mqtts://)")
    p.add_argument("--key-file", help="client key (mqtts://)")


def register(sub: Any, trust_sub: Any) -> None:
    p = sub.add_parser("publish", help="publish a release bundle: chunks first, then the manifest")
    p.add_argument("bundle", help="a signed bundle (devicerunner sign)")
    p.add_argument(
        "--channel", help="must match the channel the bundle was signed for (default: the bundle's)"
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _broker_opts(p, required=False)
    _retain_opts(p)
    p.set_defaults(func=cmd_publish)

    t = trust_sub.add_parser("publish", help="publish a trust root (devices rotate to it)")
    t.add_argument("root", help="a root from devicerunner trust init/rotate")
    t.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _broker_opts(t)
    _retain_opts(t)
    t.set_defaults(func=cmd_trust_publish)

    a = sub.add_parser(
        "serve-artifacts", help="answer devices' chunk and document requests over MQTT from an artifact dir"
    )
    a.add_argument("--dir", required=True, help="written by publish --dir / trust publish --dir")
    a.add_argument(
        "--no-share",
        action="store_true",
        help="plain subscription, one server (brokers without shared subscriptions, e.g. RabbitMQ 3.x)",
    )
    a.add_argument("--for", dest="for_s", type=float, default=None, help=argparse.SUPPRESS)
    _broker_opts(a)
    a.set_defaults(func=cmd_serve_artifacts)

    g = sub.add_parser("gc", help="remove retained chunks no current release references")
    g.add_argument("--dry-run", action="store_true", help="count what would be removed, remove nothing")
    g.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _broker_opts(g)
    g.set_defaults(func=cmd_gc)

    f = sub.add_parser("fleet", help="the fleet as the broker sees it")
    fsub = f.add_subparsers(dest="fleet_cmd", required=True)
    fs = fsub.add_parser(
        "status", help="the fleet's retained statuses: a summary, and each device's for small fleets"
    )
    fs.add_argument(
        "--devices",
        action="store_true",
        help=f"list every device under the summary (done anyway up to {SMALL_FLEET} devices)",
    )
    fs.add_argument(
        "--json", action="store_true", help="print the summary (and, with --devices, every status) as JSON"
    )
    fs.add_argument("--wait", type=float, default=0.5, help="seconds of quiet that end the listing")
    fs.add_argument(
        "--spread",
        type=float,
        default=2.0,
        help="ask every device for its status; they answer within this many seconds "
        "(brokers without retained wildcard delivery; ~1 s per 1,000 devices; 0: retained only)",
    )
    _broker_opts(fs)
    fs.set_defaults(func=cmd_fleet_status)

    b = sub.add_parser("broker", help="run the embedded MQTT broker (amqtt) for demos and small setups")
    b.add_argument("--host", default="127.0.0.1", help="address to listen on")
    b.add_argument("--port", type=int, default=1883, help="port to listen on")
    b.add_argument(
        "--for",
        dest="for_s",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this long (default: until SIGTERM/SIGINT)",
    )
    b.set_defaults(func=cmd_broker)


def cmd_rollout(args: argparse.Namespace) -> int:
    from devicerunner.fleet.rollout import Policy, RolloutController
    from devicerunner.trust import keys

    steps = tuple(int(x) for x in args.steps.split(","))
    if not steps or any(not 0 < s <= 100 for s in steps) or list(steps) != sorted(steps):
        raise operator.OperatorError("--steps: increasing percentages in 1..100, e.g. 1,5,25,100")
    policy = Policy(steps, args.step_wait, args.abort_failure_pct, args.min_devices, args.device_timeout)
    if args.pause:
        return _pause(args, steps[0])

    def counts(ev: dict[str, Any]) -> str:
        return (
            f"eligible {ev['eligible']:>4}  pending {ev['pending']:>4}  committed {ev['committed']:>4}  "
            f"failed {ev['failed']:>4}  timed out {ev['timed_out']:>4}"
        )

    def emit(ev: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(ev), flush=True)
            return
        e = ev["event"]
        if e == "published":
            verb = "found" if ev.get("already_stored") else "published"
            which = f"sequence {ev['sequence']}" if "sequence" in ev else "a signed config"
            what = "release and chunks" if "sequence" in ev else "config"
            print(
                f"{verb} {ev['app']} {ev['version']} ({which}; {what} read back from the broker); "
                f"{ev['devices']} device(s) run this app on the targeted hardware",
                flush=True,
            )
        elif e == "progress":
            print(f"  step {ev['step']:>3}%: {counts(ev)}", flush=True)
        elif e in ("paused", "incomplete"):
            head = "PAUSED" if e == "paused" else "INCOMPLETE"
            print(f"{head} at {ev['step']}%: {ev['reason']}", flush=True)
            for why, n in sorted(ev["failed_by"].items()):
                print(f"    {n} x {why}", flush=True)
            print(f"  {counts(ev)}", flush=True)
        elif e == "completed":
            n, of = ev["committed"], ev["eligible"]
            print(f"completed: {n} committed, every one of the {of} eligible device(s)", flush=True)

    ctl = RolloutController(
        _settings(args),
        args.prefix,
        Path(args.bundle).read_bytes(),
        keys.load_private(Path(args.key), keys.passphrase(getattr(args, "passphrase_file", None))),
        policy,
        emit,
        retain=not args.no_retain,
        artifact_dir=Path(args.dir) if args.dir else None,
    )
    try:
        result = ctl.run()
    except KeyboardInterrupt:
        _interrupted(args, ctl.standing())
        return 130
    return 0 if result["result"] == "completed" else 1


def _interrupted(args: argparse.Namespace, where: dict[str, Any]) -> None:
    """Ctrl-C: say where the rollout was left and how to go on or halt."""
    if args.json:
        print(json.dumps({"event": "interrupted", "ts": round(time.time(), 3), **where}), flush=True)
    pct, step = where["percent"], where["step"]
    again = f"devicerunner rollout {args.bundle} --key {args.key} --broker {args.broker}"
    if args.prefix != DEFAULT_PREFIX:
        again += f" --prefix {args.prefix}"
    for opt in ("ca_file", "cert_file", "key_file"):
        if getattr(args, opt, None):
            again += f" --{opt.replace('_', '-')} {getattr(args, opt)}"
    if pct is None:
        msg = (
            f"interrupted before the first rollout document: no device takes {where['app']} "
            f"{where['version']} (it is at 0%)."
        )
    else:
        state = "paused" if where["paused"] else "not paused: devices in it keep updating"
        msg = (
            f"interrupted at the {step}% step: the rollout document stays at {pct}% ({state}); "
            f"{where['committed']} of {where['eligible']} eligible committed, {where['pending']} pending, "
            f"{where['failed']} failed, {where['timed_out']} timed out.\n"
            f"  continue: {again} --steps {','.join(str(s) for s in _rest(args.steps, pct))}\n"
            f"  halt:     {again} --steps {pct} --pause"
        )
    print(msg, file=sys.stderr, flush=True)


def _pause(args: argparse.Namespace, pct: int) -> int:
    from devicerunner.fleet.rollout import Policy, RolloutController
    from devicerunner.trust import keys

    ctl = RolloutController(
        _settings(args),
        args.prefix,
        Path(args.bundle).read_bytes(),
        keys.load_private(Path(args.key)),
        Policy((pct,), 0, 100, 1, 0),
        lambda _ev: None,
    )
    ctl.pause(pct)
    if args.json:
        print(json.dumps({"event": "paused", "ts": round(time.time(), 3), "step": pct, "app": ctl.t.app}))
    else:
        print(f"paused the rollout of {ctl.t.app} {ctl.t.label} at {pct}%")
    return 0


def _rest(steps: str, pct: int) -> list[int]:
    return [pct] + [s for s in (int(x) for x in steps.split(",")) if s > pct]


def register_rollout(sub: Any) -> None:
    r = sub.add_parser(
        "rollout", help="publish a release or a config and roll it out in stages with an abort threshold"
    )
    r.add_argument("bundle", help="a release bundle or a config document, signed with --rollout-percent 0")
    r.add_argument("--steps", default="1,5,25,100", help="percentages, e.g. 1,5,25,100")
    r.add_argument("--step-wait", type=float, default=60.0, help="seconds per step at most")
    r.add_argument("--abort-failure-pct", type=float, default=10.0, help="pause above this failure share")
    r.add_argument(
        "--min-devices", type=int, default=1, help="devices in the rollout before aborting may happen"
    )
    r.add_argument(
        "--device-timeout", type=float, default=120.0, help="a device silent this long counts as failed"
    )
    r.add_argument("--key", required=True, help="the rollout role's private key")
    r.add_argument("--json", action="store_true", help="one JSON event per line")
    r.add_argument(
        "--pause",
        action="store_true",
        help="halt: publish a paused rollout document at the first --steps percent and exit",
    )
    _broker_opts(r)
    _retain_opts(r)
    r.set_defaults(func=cmd_rollout)
    r.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="passphrase of the rollout key (default: $DEVICERUNNER_KEY_PASSPHRASE)",
    )
