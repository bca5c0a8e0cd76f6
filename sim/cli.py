"""``devicerunner sim``: run a fleet of simulated devices through scenarios."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from devicerunner.errors import DeviceRunnerError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cmd_sim(args: argparse.Namespace) -> int:
    from devicerunner.transport.settings import parse_url
    from sim import report, scenarios
    from sim.agent import RemoteFleet
    from sim.fleet import Fleet, Keys, Watcher

    names = (
        list(scenarios.DEMO)
        if args.scenario == "demo"
        else (list(scenarios.SCENARIOS) if args.scenario == "all" else args.scenario.split(","))
    )
    unknown = [n for n in names if n not in scenarios.SCENARIOS]
    if unknown:
        raise DeviceRunnerError(
            f"unknown scenario {unknown[0]!r}; known: {', '.join(scenarios.SCENARIOS)}, all, demo"
        )
    from devicerunner.fleet.broker import EmbeddedBroker

    # The embedded broker warns about every client that vanishes mid-exchange; the
    # scenarios make that happen on purpose.
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    if args.agents and not args.broker:
        raise DeviceRunnerError("--agents needs --broker: the agents and this controller meet on it")
    broker = None
    url = args.broker
    if url is None:
        broker = EmbeddedBroker(port=_free_port())
        broker.start()
        url = broker.url
    proxy = None
    if "flaky-network" in names:
        from sim.netfault import FaultProxy

        # Devices reach the broker through it for the whole run; faults only during that scenario.
        up = parse_url(url)
        proxy = FaultProxy(up.host, up.port, seed=args.seed).start()
    t_start = time.time()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dr-sim-") as tmp:
        keys = Keys()
        killable = max(2, args.devices // 5) if "power-loss" in names else 0
        fleet: Fleet | RemoteFleet
        if args.agents:  # devices run in `devicerunner sim-agent`s, possibly on other hosts
            fleet = RemoteFleet(parse_url(url), args.agents, keys, args.seed)
        else:
            fleet = Fleet(
                Path(tmp),
                args.devices,
                proxy.url if proxy else url,
                keys,
                args.seed,
                workers=args.workers,
                killable=killable,
                # a stalled link is only noticed by keepalive: keep it short there
                keepalive_s=5 if proxy else 30,
            )
        s = parse_url(url)
        interrupted = False
        data: dict[str, Any] = {}
        try:
            with Watcher(s, "dr/v1") as w:
                try:
                    fleet.start()
                    kind = "agents" if args.agents else "worker processes"
                    where = f"{fleet.n_workers} {kind}"
                    print(f"fleet: {fleet.n} devices in {where}, broker {url}", flush=True)
                    w.wait(lambda: w.count(lambda _d, st: st.get("online")) == fleet.n, 120)
                    print(f"  {w.count(lambda _d, st: st.get('online'))} devices online", flush=True)

                    def restart(down_s: float) -> None:
                        nonlocal broker
                        assert broker is not None
                        port = broker.port
                        broker.stop()
                        time.sleep(down_s)
                        for _ in range(50):  # amqtt may take a moment to release its socket
                            broker = EmbeddedBroker(port=port)
                            try:
                                broker.start()
                                break
                            except DeviceRunnerError:
                                time.sleep(0.1)

                    ctx = scenarios.Ctx(fleet, w, restart if broker is not None else None, proxy)
                    for name in names:
                        print(f"scenario {name}:", flush=True)
                        t0 = time.time()
                        try:
                            r = scenarios.SCENARIOS[name](ctx)
                        except KeyboardInterrupt:
                            r = {"ok": False, "interrupted": True, "checks": ["interrupted (Ctrl-C)"]}
                            interrupted = True
                        except Exception as e:  # a scenario's own failure is a result, not a crash
                            r = {"ok": False, "checks": [f"scenario raised {type(e).__name__}: {e}"]}
                        r.update(name=name, seconds=time.time() - t0, t_start=round(t0 - w.t0, 2))
                        results.append(r)
                        for c in r["checks"]:
                            print(f"    {c}", flush=True)
                        print(f"  -> {'ok' if r['ok'] else 'FAILED'} ({r['seconds']:.1f} s)", flush=True)
                        if interrupted:
                            break
                except KeyboardInterrupt:  # while the fleet started
                    interrupted = True
                w.sample()  # the fleet as it ended, however short the run
                data = {
                    "devices": fleet.n,
                    "broker": url if args.broker else "embedded (amqtt)",
                    "seed": args.seed,
                    "duration_s": time.time() - t_start,
                    "interrupted": interrupted,
                    "scenarios": results,
                    "events": list(w.events),
                    "timeline": list(w.timeline),
                    "reconnect_spread": next(
                        (r["reconnect_spread"] for r in results if "reconnect_spread" in r), None
                    ),
                }
        finally:
            # The workers ignore SIGINT (a Ctrl-C reaches the whole process group):
            # they are stopped here, quietly, whatever interrupted the run.
            with _no_sigint():
                fleet.stop()
                if proxy is not None:
                    proxy.stop()
                if broker is not None:
                    broker.stop()
    ok = bool(results) and all(r["ok"] for r in results)
    done = f"{sum(r['ok'] for r in results)}/{len(results)} scenarios ok in {time.time() - t_start:.0f} s"
    if interrupted:
        done = f"interrupted (Ctrl-C) after {done}"
    print(f"\n{done}", flush=True)
    paths: dict[str, str] = {}
    if args.report and data:
        sp, hp = report.write(Path(args.report), data)
        paths = {"report": str(hp.resolve()), "summary": str(sp.resolve())}
        which = "partial report" if interrupted else "report"
        print(f"{which}: {paths['report']}\nsummary: {paths['summary']}", flush=True)
    json_out = getattr(args, "json_out", None)
    if json_out is not None:
        scen = [{k: r.get(k) for k in ("name", "ok", "seconds", "checks")} for r in results]
        summary = {"ok": ok, "devices": args.devices, "interrupted": interrupted, "scenarios": scen, **paths}
        print(json.dumps(summary), file=json_out)
    if interrupted:
        return 130
    return 0 if ok else 1


def cmd_sim_entry(args: argparse.Namespace) -> int:
    """With --json, progress goes to stderr and one JSON summary to stdout."""
    if not args.json:
        return cmd_sim(args)
    args.json_out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        return cmd_sim(args)


@contextlib.contextmanager
def _no_sigint() -> Iterator[None]:
    """A second Ctrl-C does not interrupt the clean-up of the first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sim", help="simulate a fleet: rollouts, bad and tampered releases, outages, power cuts"
    )
    p.add_argument("--devices", type=int, default=20, help="simulated devices")
    p.add_argument(
        "--scenario",
        default="demo",
        help="happy, bad-release, tampered, broker-outage, power-loss, key-rotation, flaky-network, "
        "bad-config (comma-separated), "
        "'all', or 'demo' (happy,bad-release,tampered)",
    )
    p.add_argument("--broker", help="a real broker URL (default: start the embedded one)")
    p.add_argument("--report", metavar="DIR", help="write summary.json and report.html here")
    p.add_argument("--seed", type=int, default=1, help="seed of every random choice (same seed, same fleet)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (devices are spread over them)")
    p.add_argument(
        "--agents",
        type=int,
        default=0,
        metavar="N",
        help="run no devices here: wait for N `devicerunner sim-agent`s on the broker (needs --broker)",
    )
    p.add_argument("--json", action="store_true", help="progress on stderr, one JSON summary on stdout")
    p.set_defaults(func=cmd_sim_entry)
