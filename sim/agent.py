"""Simulator agents: devices on several hosts, one scenario controller elsewhere,
coordinating only through the broker.

    devicerunner sim-agent --broker URL --name host-a --devices 2500   # on each host
    devicerunner sim --agents 4 --broker URL --scenario happy         # anywhere

Topics (under ``{p}/sim/``, operator identities only):

- ``setup`` (retained, controller): ``{"run": ID, "root": <root.json text>}``.
  An agent waits for it, provisions its devices with that root and starts
  them. The root is the simulation's own (made by the controller); taking
  it from the broker is acceptable here because a simulation trusts its
  broker -- a real device is provisioned with its root at the factory.
- ``agents/{name}`` (retained, agent; emptied by its last will and on exit):
  ``{"run", "name", "devices", "hardware": {id: hw}, "ready", "pid", "host"}``.
- ``control`` (controller): ``{"run": ID, "cmd": "stop"}`` stops every agent
  of that run; agents of another run ignore it.

Everything else -- releases, rollouts, statuses, events -- travels on the
product's own topics, exactly as with local workers.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devicerunner.errors import DeviceRunnerError
from devicerunner.transport import operator
from devicerunner.transport.settings import BrokerSettings, parse_url

if TYPE_CHECKING:
    from sim.fleet import Keys

log = logging.getLogger(__name__)

PREFIX = "dr/v1"


def setup_topic(p: str) -> str:
    return f"{p}/sim/setup"


def agent_topic(p: str, name: str) -> str:
    return f"{p}/sim/agents/{name}"


def control_topic(p: str) -> str:
    return f"{p}/sim/control"


class RemoteFleet:
    """What the scenarios need of a fleet, when its devices run in agents."""

    killable: list[str] = []

    def __init__(self, s: BrokerSettings, agents: int, keys: Keys, seed: int) -> None:
        self.s = s
        self.keys = keys
        self.agents = agents
        self.rng = random.Random(seed)
        self.run_id = f"{int(time.time())}-{random.randrange(10**6)}"
        self.hardware: dict[str, str] = {}
        self.n = 0
        self.n_workers = 0

    def start(self, timeout_s: float = 600.0) -> None:
        setup = json.dumps({"run": self.run_id, "root": self.keys.root_bytes().decode()}).encode()
        with operator.Session(self.s) as sess:
            sess.publish_many([(setup_topic(PREFIX), setup)], retain=True)
            end = time.monotonic() + timeout_s
            ready: dict[str, dict[str, Any]] = {}
            while time.monotonic() < end and len(ready) < self.agents:
                got = sess.collect([f"{PREFIX}/sim/agents/+"], quiet_s=1.0, max_s=5.0)
                for topic, payload in got.items():
                    try:
                        doc = json.loads(payload) if payload else None
                    except ValueError:
                        continue
                    if isinstance(doc, dict) and doc.get("run") == self.run_id and doc.get("ready"):
                        ready[topic] = doc
            if len(ready) < self.agents:
                raise DeviceRunnerError(
                    f"{len(ready)} of {self.agents} simulator agents reported ready within {timeout_s:.0f} s"
                )
        for doc in ready.values():
            hw = doc.get("hardware")
            if isinstance(hw, dict):
                self.hardware.update({str(k): str(v) for k, v in hw.items()})
        self.n = len(self.hardware)
        self.n_workers = len(ready)

    def power_cut(self, device: str, timeout_s: float = 60.0) -> None:
        raise DeviceRunnerError("power cuts need local workers (run power-loss without --agents)")

    def stop(self) -> None:
        try:
            with operator.Session(self.s) as sess:
                stop = json.dumps({"run": self.run_id, "cmd": "stop"}).encode()
                sess.publish_many([(control_topic(PREFIX), stop)], retain=False)
                sess.publish_many([(setup_topic(PREFIX), b"")], retain=True)
        except DeviceRunnerError as e:
            log.warning("could not tell the agents to stop: %s", e)


def cmd_agent(args: argparse.Namespace) -> int:
    # the devices' code (and wasmtime) load only when an agent runs, not with the CLI
    from sim.agent_run import run_agent

    s = parse_url(args.broker)
    if args.workdir:
        return run_agent(s, args.name, args.devices, args.workers, Path(args.workdir), args.wait, args.seed)
    with tempfile.TemporaryDirectory(prefix=f"dr-sim-agent-{args.name}-") as tmp:
        return run_agent(s, args.name, args.devices, args.workers, Path(tmp), args.wait, args.seed)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sim-agent",
        help="run simulated devices for a simulation controlled from elsewhere (through the broker)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--broker", required=True, help="the broker (or one node of a cluster) URL")
    p.add_argument(
        "--name", required=True, help="this agent's name: a prefix of its device ids, unique per run"
    )
    p.add_argument("--devices", type=int, default=100, help="devices this agent runs")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--workdir", help="where device state lives (default: a temporary directory)")
    p.add_argument("--wait", type=float, default=600.0, help="seconds to wait for a simulation to be set up")
    p.add_argument("--seed", type=int, default=1, help="seed for the devices' variety")
    p.set_defaults(func=cmd_agent)
