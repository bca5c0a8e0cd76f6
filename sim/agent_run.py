"""The agent's side of a multi-host simulation (see sim/agent.py): wait for a
run on the broker, start this agent's devices with its root, report them
ready, stop when told."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

from devicerunner.errors import DeviceRunnerError
from devicerunner.transport import operator
from devicerunner.transport.settings import BrokerSettings
from sim.agent import PREFIX, agent_topic, control_topic, setup_topic
from sim.fleet import Fleet, Keys


class ProvidedRoot(Keys):
    """The simulation's root as an agent received it: it signs nothing."""

    def __init__(self, raw: bytes) -> None:
        super().__init__()
        self.raw = raw

    def root_bytes(self, signers: Any = None) -> bytes:
        return self.raw


def run_agent(
    s: BrokerSettings, name: str, devices: int, workers: int, workdir: Path, wait_s: float, seed: int
) -> int:
    """Run ``devices`` devices for one simulation run; returns when told to stop."""
    setup: dict[str, Any] = {}
    got_setup = threading.Event()
    stop = threading.Event()

    me = agent_topic(PREFIX, name)
    session = operator.Session(s, client_id=f"sim-agent-{name}")
    session.client.will_set(me, b"", qos=1, retain=True)  # a vanished agent is not "ready"
    with session as sess:

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            try:
                doc = json.loads(bytes(msg.payload) or b"{}")
            except ValueError:
                return
            if not isinstance(doc, dict):
                return
            if msg.topic == setup_topic(PREFIX) and isinstance(doc.get("root"), str) and doc.get("run"):
                setup.clear()
                setup.update(doc)
                got_setup.set()
            elif (
                msg.topic == control_topic(PREFIX)
                and doc.get("cmd") == "stop"
                and got_setup.is_set()
                and doc.get("run") == setup.get("run")
            ):
                stop.set()

        sess.client.on_message = on_message
        sess.client.subscribe([(setup_topic(PREFIX), 1), (control_topic(PREFIX), 1)])
        print(f"agent {name}: waiting for a simulation on {s.url}", flush=True)
        if not got_setup.wait(wait_s):
            raise DeviceRunnerError(f"no simulation was set up on {s.url} within {wait_s:.0f} s")
        run_id = str(setup["run"])
        fleet = Fleet(
            workdir,
            devices,
            s.url,
            ProvidedRoot(str(setup["root"]).encode()),
            seed=seed,
            workers=workers,
            id_prefix=name,
        )
        try:
            fleet.start(timeout_s=600)
            report = {
                "run": run_id,
                "name": name,
                "devices": devices,
                "hardware": fleet.hardware,
                "ready": True,
                "pid": os.getpid(),
                "host": socket.gethostname(),
            }
            sess.publish_many([(me, json.dumps(report).encode())], retain=True)
            print(f"agent {name}: {devices} devices running for run {run_id}", flush=True)
            while not stop.wait(1.0):
                pass
        finally:
            fleet.stop()
            sess.publish_many([(me, b"")], retain=True)
    print(f"agent {name}: stopped", flush=True)
    return 0
