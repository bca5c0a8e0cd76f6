"""``devicerunner`` command line.

Exit statuses, the same for every command (README.md, "Exit statuses"):
0 success; 1 a verification or operation failed; 2 bad usage, a bad
config, a file that is missing or unreadable, a module that cannot
link/init, or a state dir another daemon holds; 3 an app ran but misbehaved; 130 interrupted; 141 stdout was
closed (``| head``). Errors are one line on stderr, ``devicerunner: error:
<cause>``, never a traceback or a class name (``--debug`` shows one).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import math
import os
import signal
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from devicerunner import __version__
from devicerunner.cli.config import setting_value
from devicerunner.device import logfmt, sdnotify
from devicerunner.errors import ConfigError, DeviceRunnerError, SandboxError, StateDirLockedError
from hostfuncs.config import AppSettings
from hostfuncs.registry import CAPABILITIES

log = logging.getLogger("devicerunner")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_APP_FAULTS = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

DEFAULT_SENSORS = {
    "temp": {
        "driver": "sim",
        "waveform": "sine",
        "base": 21.0,
        "amplitude": 3.0,
        "period_s": 20.0,
        "noise": 0.05,
        "unit": "C",
    },
    "humidity": {"driver": "sim", "waveform": "random_walk", "base": 45.0, "walk_step": 0.2, "unit": "%"},
}
DEFAULT_ACTUATORS = {"fan": {"driver": "sim"}, "led": {"driver": "sim"}}
ALL_CAPS = ",".join(CAPABILITIES)
APP_RUN_EPILOG = """\
Without --sensor: temp = sine, base 21.0, amplitude 3.0, period_s 20, noise
0.05, unit C; humidity = random_walk, base 45.0, walk_step 0.2, unit %.
Simulated sensor options and their defaults: waveform sine (constant, sine,
step, random_walk), base 20.0, amplitude 1.0, period_s 60, step_at_s
period_s/2, walk_step 0.1, noise 0.0, sample_interval_ms 100, max_age_ms
5 x sample_interval_ms, fault none (offline, stuck, spike, dropout),
fault_after_s 0, fault_rate 0.1, spike_magnitude 100, seed crc32(name).
Time is virtual (it advances one interval per tick) unless --realtime.
"""


class UsageError(DeviceRunnerError):
    pass


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (when it has a meaningful one), keeps
    the epilog's line breaks, and never breaks a word (a default such as a
    capability list stays whole, so it can be copied)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False) or [""]

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and "%(default)" not in text
            and "(default" not in text  # the help states it in words already
            and default not in (None, False, [], argparse.SUPPRESS)
        ):
            text += " (default: %(default)s)"
        return text


def _num(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_device_spec(arg: str, kind: str = "sensor") -> tuple[str, dict[str, Any]]:
    """``NAME=SPEC``: ``21.5`` (a constant sensor, or an actuator's initial
    value), ``sine:base=21,amplitude=3`` (waveform:options), ``base=20,fault=offline``."""
    name, sep, spec = arg.partition("=")
    if not sep or not name:
        raise UsageError(f"--sensor/--actuator {arg!r}: expected NAME=SPEC")
    table: dict[str, Any] = {"driver": "sim"}
    head, colon, rest = spec.partition(":")
    if not colon and "=" not in spec:
        value = _num(spec) if spec else None
        if isinstance(value, int | float):
            if kind == "sensor":
                table.update(waveform="constant", base=float(value))
            else:
                table["initial"] = float(value)
        elif spec:
            table["waveform"] = spec
        return name, table
    if colon:
        table["waveform"] = head
    else:
        rest = spec
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise UsageError(f"{name}: option {item!r} is not KEY=VALUE")
        table[k.strip()] = _num(v.strip())
    return name, table


def parse_messages(items: Sequence[str] | None) -> dict[int, list[tuple[str, bytes]]]:
    """``--message TICK:PAYLOAD`` (topic ``cmd``) or ``TICK@TOPIC:PAYLOAD``: queued
    for the app just before tick TICK (0-based), as the daemon queues an operator's."""
    out: dict[int, list[tuple[str, bytes]]] = {}
    for item in items or ():
        head, sep, payload = item.partition(":")
        tick, _, topic = head.partition("@")
        if not sep or not tick.isdigit():
            raise UsageError(f"--message {item!r}: expected TICK:PAYLOAD or TICK@TOPIC:PAYLOAD")
        out.setdefault(int(tick), []).append((topic or "cmd", payload.encode()))
    return out


def parse_settings(items: Sequence[str]) -> Any:
    """``--setting KEY=VALUE``: the app runs as if config v1 held these settings."""
    settings: dict[str, Any] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UsageError(f"--setting {item!r}: expected KEY=VALUE")
        settings[k] = setting_value(v)
    return AppSettings(1, settings, json.dumps(settings, sort_keys=True, separators=(",", ":")).encode())


def _caps(text: str) -> frozenset[str]:
    from devicerunner.device.config import parse_capabilities

    caps = [c.strip() for c in text.split(",") if c.strip()]
    try:
        return parse_capabilities("--grant", caps)
    except ConfigError as e:
        raise UsageError(str(e)) from e


# -- app run -------------------------------------------------------------


def cmd_app_run(args: argparse.Namespace) -> int:
    from devicerunner.device.apps import App, DeviceResources, start_instance
    from devicerunner.device.hardware import build_hardware
    from devicerunner.device.kvfile import open_store
    from devicerunner.sandbox.engine import Limits, Sandbox, load_module_bytes
    from firmware_shims.base import RealClock, VirtualClock
    from hostfuncs.telemetry import Outbox

    sensors_cfg = dict(parse_device_spec(s) for s in args.sensor) if args.sensor else DEFAULT_SENSORS
    act_cfg = (
        dict(parse_device_spec(s, "actuator") for s in args.actuator) if args.actuator else DEFAULT_ACTUATORS
    )
    clock = RealClock() if args.realtime else VirtualClock()
    out = sys.stderr if args.json else sys.stdout
    names = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "error"}

    pipe_closed = threading.Event()

    def sink(app: str, level: int, msg: str) -> None:
        # Called from inside the app's host call: a closed reader (`| head`)
        # must end the run, not trap the app.
        if args.quiet or pipe_closed.is_set():
            return
        try:
            print(f"[{app}] {names.get(level, level)}: {msg}", file=out, flush=True)
        except BrokenPipeError:
            pipe_closed.set()

    sensors, actuators = build_hardware(sensors_cfg, act_cfg, clock)
    outbox = Outbox()
    res = DeviceResources(clock, sensors, actuators, outbox, sink)
    wasm = load_module_bytes(Path(args.module))
    app_name = Path(args.module).stem.lower().replace(".", "-")[:63] or "app"
    tmp = None
    state = Path(args.state) if args.state else Path(tmp := tempfile.mkdtemp(prefix="dr-app-"))
    from devicerunner.device.apps import AppSpec

    messages = parse_messages(args.message)
    spec = AppSpec(
        name=app_name,
        wasm=wasm,
        grant=_caps(args.grant),
        limits=Limits(memory_bytes=args.memory_limit, tick_budget_ms=args.budget_ms),
        tick_interval_ms=args.interval_ms,
        config=parse_settings(args.setting) if args.setting else None,
    )
    kv = open_store(state / "kv" / app_name, args.kv_quota)
    sandbox = Sandbox(cache_dir=state / "cache")
    try:
        inst = start_instance(sandbox, spec, res, kv)
        app = App(spec, inst)
        stop = threading.Event()
        _on_signals(stop.set)
        for n in range(args.ticks):
            if stop.is_set() or pipe_closed.is_set():
                break
            if isinstance(clock, VirtualClock):
                clock.advance(args.interval_ms / 1000.0)
            elif stop.wait(args.interval_ms / 1000.0):
                break
            for topic, payload in messages.get(n, ()):
                inbox = res.inboxes.get(app_name)
                why = (
                    "not granted 'messages'"
                    if inbox is None
                    else inbox.put(topic, payload, False, clock.monotonic_s())
                )
                if why:
                    sink(app_name, logging.WARNING, f"message at tick {n} on {topic} dropped: {why}")
            app.tick()
            for m in outbox.drain():
                sink(m.app, logging.INFO, f"telemetry {m.name} {m.payload.decode('utf-8', 'replace')}")
        if pipe_closed.is_set():
            kv.flush()
            raise BrokenPipeError("stdout closed")
        app.health()
        kv.flush()
        summary = app.status(clock.monotonic_s())
        summary["kv_bytes"] = kv.used_bytes
        if app_name in res.inboxes:
            summary["messages"] = res.inboxes[app_name].stats.as_dict()
        summary["actuators"] = {n: a.value for n, a in actuators.items()}
    finally:
        sandbox.close()
        if tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        c = summary
        print(
            f"{c['ticks']} ticks, {c['traps']} traps, {c['overruns']} overruns, {c['errors']} errors, "
            f"{c['health_failures']} of {c['health_checks']} health checks failed; "
            f"tick p50 {c['tick_p50_us']} us, p99 {c['tick_p99_us']} us"
        )
        if c["last_error"]:
            print(f"last error: {c['last_error']}")
    # A failed dr_health fails a trial on a device: it fails here too.
    faults = summary["traps"] or summary["overruns"] or summary["errors"] or summary["health_failures"]
    return EXIT_APP_FAULTS if faults else EXIT_OK


# -- run (daemon) --------------------------------------------------------


def _on_signals(handler: Callable[[], None]) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: handler())


def _start_watchdog(daemon: Any, every_s: float, stop: threading.Event) -> None:
    """Pet systemd's watchdog only while the scheduler thread is alive and
    making progress: a wedged daemon gets restarted."""

    def loop() -> None:
        last = -1
        while not stop.wait(every_s):
            ticks = sum(a.counters.ticks for a in daemon.scheduler.apps.values())
            alive = daemon.scheduler.alive()
            if alive and (ticks != last or not daemon.scheduler.apps):
                sdnotify.notify(f"WATCHDOG=1\nSTATUS=running, {ticks} ticks")
            last = ticks

    threading.Thread(target=loop, name="watchdog", daemon=True).start()


def cmd_run(args: argparse.Namespace) -> int:
    from devicerunner.device import config
    from devicerunner.device.daemon import Daemon

    cfg = config.load(Path(args.config))
    logfmt.setup(logging.DEBUG if args.debug else logging.INFO, cfg.log_format)
    daemon = Daemon(cfg)
    stop = threading.Event()
    _on_signals(stop.set)
    daemon.start()
    log.info("device %s running %d app(s)", cfg.id, len(daemon.scheduler.apps))
    sdnotify.notify(f"READY=1\nSTATUS=running {len(daemon.scheduler.apps)} app(s)")
    wd = sdnotify.watchdog_interval_s()
    if wd is not None:
        _start_watchdog(daemon, wd, stop)
    try:
        if args.once:
            # Settle: take what is in the inbox, finish or revert interrupted updates
            # (bounded by --for when given).
            deadline = None if args.for_s is None else time.monotonic() + args.for_s
            while not stop.is_set() and not daemon.updater.idle.wait(0.1):
                if deadline is not None and time.monotonic() > deadline:
                    log.error("--once: updates did not settle within %s s", args.for_s)
                    break
        else:
            stop.wait(args.for_s)
    finally:
        sdnotify.notify("STOPPING=1")
        daemon.stop()
    status = daemon.status()
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True, default=str))
    else:
        for name, a in status["apps"].items():
            st = a["state"]
            print(
                f"{name}: {a.get('version', '-')} (sequence {st['active_sequence']}) phase={st['phase']} "
                f"ticks={a.get('ticks', 0)} traps={a.get('traps', 0)} overruns={a.get('overruns', 0)} "
                f"last_error={st['last_error'] or a.get('last_error')}"
            )
    return EXIT_OK


# -- parser --------------------------------------------------------------


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {v}")
        return v

    return parse


def _float_in(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(v) or not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be a finite number between {lo} and {hi}, got {text}")
        return v

    return parse


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's parser: subparsers are made with the parent's class,
    so all of them show defaults the same way."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        kw.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="devicerunner",
        description="Sandboxed Wasm apps on edge devices, updated over the air.",
        epilog="Exit status: 0 ok, 1 a verification or operation failed, 2 bad usage or config or a "
        "missing file, 3 an app misbehaved (app run), 130 interrupted, 141 stdout closed (| head).",
    )
    p.add_argument("--version", action="version", version=f"devicerunner {__version__}")
    p.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)

    app = sub.add_parser("app", help="tools for app authors")
    app_sub = app.add_subparsers(dest="app_cmd", required=True)
    r = app_sub.add_parser(
        "run",
        help="run one module on simulated sensors",
        formatter_class=DefaultsHelpFormatter,
        epilog=APP_RUN_EPILOG,
    )
    r.add_argument("module", help=".wasm or .wat file")
    r.add_argument("--grant", default=ALL_CAPS, help="capabilities, comma-separated")
    r.add_argument(
        "--sensor",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="simulated sensor, e.g. temp=sine:base=21,amplitude=3 (none given: temp and humidity, below)",
    )
    r.add_argument(
        "--actuator",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="simulated actuator, e.g. fan=0 (none given: fan and led)",
    )
    r.add_argument(
        "--message",
        action="append",
        metavar="TICK:PAYLOAD",
        help="queue a message for the app before tick TICK (TICK@TOPIC:PAYLOAD for a topic other than cmd)",
    )
    r.add_argument(
        "--setting", action="append", metavar="KEY=VALUE", help="a config setting the app reads (repeat)"
    )
    # The same bounds as device.toml: 0 ms ticks, a nan/inf budget or a negative
    # memory limit ("no limit" to wasmtime) are usage errors, not tracebacks.
    r.add_argument("--ticks", type=_int_in(0, 10**9), default=10, help="how many ticks to run")
    r.add_argument(
        "--interval-ms",
        type=_int_in(1, 3_600_000),
        default=100,
        help="tick interval (virtual time unless --realtime)",
    )
    r.add_argument("--budget-ms", type=_float_in(0.001, 60_000), default=10.0, help="tick CPU budget, ms")
    r.add_argument(
        "--memory-limit",
        type=_int_in(65536, 4 * 1024**3),
        default=16 * 1024 * 1024,
        help="app memory limit, bytes",
    )
    r.add_argument("--kv-quota", type=_int_in(0, 1024**3), default=64 * 1024, help="kv quota, bytes")
    r.add_argument("--state", help="directory for kv data and the compile cache (default: temporary)")
    r.add_argument("--realtime", action="store_true", help="tick on the wall clock instead of virtual time")
    r.add_argument("--quiet", action="store_true", help="do not print the app's log")
    r.add_argument("--json", action="store_true", help="print a JSON summary on stdout (log to stderr)")
    r.set_defaults(func=cmd_app_run)

    from devicerunner.cli import app_new

    app_new.register(app_sub, DefaultsHelpFormatter)

    run = sub.add_parser("run", help="run the device daemon")
    run.add_argument("--config", required=True, help="the device's device.toml")
    run.add_argument(
        "--for",
        dest="for_s",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this long (default: until SIGTERM/SIGINT)",
    )
    run.add_argument(
        "--once",
        action="store_true",
        help="process the inbox and any interrupted update, then exit (for boot scripts)",
    )
    run.add_argument("--json", action="store_true", help="print final status as JSON")
    run.set_defaults(func=cmd_run)

    from devicerunner.cli import config as cli_config
    from devicerunner.cli import device as cli_device
    from devicerunner.cli import mqtt as cli_mqtt
    from devicerunner.cli import sensors as cli_sensors
    from devicerunner.cli import trust as cli_trust

    cli_sensors.register(sub)
    trust_sub = cli_trust.register(sub)
    cli_device.register(sub)
    cli_mqtt.register(sub, trust_sub)
    cli_mqtt.register_rollout(sub)
    cli_config.register(sub)

    _register_plugins(sub)
    return p


def _register_plugins(sub: Any) -> None:
    """Subcommands of other installed packages (entry-point group
    ``devicerunner.commands``). The fleet simulator plugs in this way: it
    drives the product's public API like a user, and the product never
    imports it."""
    for ep in importlib.metadata.entry_points(group="devicerunner.commands"):
        try:
            ep.load()(sub)
        except Exception as e:  # a broken plugin must not take the whole CLI down
            log.warning("command plugin %s unavailable: %s", ep.name, e)


def _exit_broken_pipe() -> int:
    # The reader went away (`devicerunner ... | head`): say nothing more, and
    # keep Python from reporting the failed flush of stdout at exit.
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def _error(e: object) -> None:
    print(f"devicerunner: error: {e}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status follows the table in the module docstring."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logfmt.setup(logging.DEBUG if args.debug else logging.WARNING)
    try:
        rc: int = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return rc
    except BrokenPipeError:
        return _exit_broken_pipe()
    except KeyboardInterrupt:
        print("devicerunner: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UsageError, ConfigError, SandboxError, StateDirLockedError) as e:
        if args.debug:
            raise
        _error(e)
        return EXIT_USAGE
    except DeviceRunnerError as e:
        if args.debug:
            raise
        _error(e)
        return EXIT_FAILED
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        if args.debug:
            raise
        _error(f"{e.filename}: {e.strerror}" if e.filename else e)
        return EXIT_USAGE
    except OSError as e:
        if args.debug:
            raise
        _error(f"{e.filename}: {e.strerror or e}" if e.filename else e.strerror or e)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
