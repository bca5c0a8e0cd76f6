"""A simulated fleet: worker processes of devices, the operator's keys, and a
watcher that records what the broker saw (status, events) over time."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devicerunner.transport import operator, reports
from devicerunner.transport.settings import BrokerSettings
from devicerunner.trust import appconfig, bundle, manifest
from sim import apps, worker

HARDWARE = ("rpi4", "stb-a", "stb-b")
QUIRKY = "stb-b"
"""The hardware variant on which the bad release's bug shows."""
RTC_UNSET_EPOCH = 946_684_800
"""2000-01-01: where a device without a battery-backed clock starts."""


@dataclass
class Keys:
    root: list[Ed25519PrivateKey] = field(default_factory=lambda: [Ed25519PrivateKey.generate()])
    release: list[Ed25519PrivateKey] = field(
        default_factory=lambda: [Ed25519PrivateKey.generate() for _ in range(2)]
    )
    rollout: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    config: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    version: int = 1
    tick_interval_ms: int = 100
    """How often the releases' apps tick (a thermostat needs 1 Hz; the
    scenarios tick at 10 Hz so that trials are short)."""
    trial_ticks: int = 15

    def root_bytes(self, signers: list[Ed25519PrivateKey] | None = None) -> bytes:
        now = int(time.time())
        signed = manifest.root_signed(
            version=self.version,
            issued=now - 60,
            expires=now + 30 * 86_400,
            role_keys={
                "root": [k.public_key() for k in self.root],
                "release": [k.public_key() for k in self.release],
                "rollout": [self.rollout.public_key()],
                "config": [self.config.public_key()],
            },
            thresholds={"root": 1, "release": 2, "rollout": 1, "config": 1},
        )
        return manifest.sign_envelope(signed, signers or self.root)

    def bundle(
        self,
        module: bytes,
        sequence: int,
        version: str,
        *,
        percent: int = 0,
        signers: list[Ed25519PrivateKey] | None = None,
        hardware: tuple[str, ...] = HARDWARE,
        capabilities: tuple[str, ...] = ("log", "clock", "sensors"),
    ) -> bytes:
        now = int(time.time())
        signed = manifest.manifest_signed(
            app="app",
            version=version,
            sequence=sequence,
            module=module,
            capabilities=list(capabilities),
            hardware=list(hardware),
            issued=now - 5,
            expires=now + 86_400,
            rollout_percent=percent,
            rollout_salt=f"sim-{sequence}",
            trial_ticks=self.trial_ticks,
            trial_seconds=1,
            chunk_size=4096,
            # Dozens of daemons share 2 cores here: a tick can wait for the GIL.
            # The budget and allowance keep CPU contention from failing trials;
            # the bug under test (a trap) is never allowed.
            tick_interval_ms=self.tick_interval_ms,
            tick_budget_ms=50,
            max_overruns=2,
        )
        return bundle.pack(manifest.sign_envelope(signed, signers or self.release), module)

    def config_doc(self, version: int, settings: dict[str, Any], *, percent: int = 100) -> bytes:
        """A config document for the fleet's app, signed by the config role."""
        now = int(time.time())
        signed = appconfig.config_signed(
            app="app",
            version=version,
            settings=settings,
            hardware=list(HARDWARE),
            issued=now - 5,
            expires=now + 86_400,
            rollout_percent=percent,
            rollout_salt=f"sim-config-{version}",
            # the same allowance as a release trial: contention is not the bug under test
            health=manifest.Health(
                trial_ticks=self.trial_ticks,
                trial_seconds=1,
                max_traps=0,
                max_overruns=2,
                max_broker_loss_s=60,
            ),
        )
        return manifest.sign_envelope(signed, [self.config])


class Watcher:
    """The broker's view of the fleet, sampled over time."""

    def __init__(self, s: BrokerSettings, prefix: str, timeline: bool = True) -> None:
        """``timeline``: sample the versions seen every 0.5 s (for the scenario's
        report); without it the watcher only collects (a sample of 10,000
        statuses costs ~10 ms, and the watcher shares the machine it watches)."""
        self.s, self.p = s, prefix
        self._timeline = timeline
        self.status: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.timeline: list[dict[str, Any]] = []
        self.status_times: dict[str, list[float]] = {}
        self.t0 = time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.sess = operator.Session(s, client_id=f"sim-watch-{random.randrange(10**9)}")
        self.reader = reports.Reader(prefix)

    def __enter__(self) -> Watcher:
        self.sess.__enter__()
        self.sess.client.on_message = lambda _c, _u, m: self._msg(m.topic, bytes(m.payload))
        subs = [(f"{self.p}/devices/+/status", 1), (f"{self.p}/devices/+/events", 1)]
        # paho reconnects by itself here; clean sessions need the subscriptions again
        self.sess.client.on_connect = lambda c, *_: c.subscribe(subs)
        self.sess.client.subscribe(subs)
        self._thread: threading.Thread | None = None
        if self._timeline:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        self.sess.__exit__()

    def _msg(self, topic: str, payload: bytes) -> None:
        msg = self.reader.read(topic, payload)  # validated: a device cannot crash or stall this
        if msg is None:
            return
        with self._lock:
            if isinstance(msg, reports.DeviceStatus):
                doc = msg.as_dict()
                prev = self.status.get(msg.device)
                if prev is not None and not msg.online and not msg.apps:
                    # a last will ({"online": false}, nothing else): the device is
                    # offline, and what it last reported about its apps still stands
                    doc = {**prev, "online": False}
                self.status[msg.device] = doc
                # the device's own clock at publish time: a reconnecting device
                # publishes status at once, while we may only see it later
                self.status_times.setdefault(msg.device, []).append(msg.ts or time.time())
            else:
                doc = msg.as_dict()
                doc["hardware"] = (self.status.get(msg.device) or {}).get("hardware")
                doc["t"] = round(time.time() - self.t0, 3)
                self.events.append(doc)

    def _sample(self) -> None:
        self.sample()
        while not self._stop.wait(0.5):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            versions: dict[str, int] = {}
            online = 0
            for st in self.status.values():
                online += bool(st.get("online"))
                a = (st.get("apps") or {}).get("app") or {}
                key = str(a.get("version") or "bootstrap")
                if a.get("phase") == "TRIAL":
                    key += " (on trial)"
                versions[key] = versions.get(key, 0) + 1
            self.timeline.append(
                {"t": round(time.time() - self.t0, 2), "versions": versions, "online": online}
            )

    def first_status_after(self, t: float) -> dict[str, float]:
        """Per device, the first status it published after ``t`` (its reconnection)."""
        with self._lock:
            out = {}
            for d, ts in self.status_times.items():
                later = [x for x in ts if x >= t]
                if later:
                    out[d] = later[0]
            return out

    def count(self, pred: Any) -> int:
        with self._lock:
            return sum(1 for d, st in self.status.items() if pred(d, st))

    def app_of(self, device: str) -> dict[str, Any]:
        with self._lock:
            return dict(((self.status.get(device) or {}).get("apps") or {}).get("app") or {})

    def wait(self, pred: Any, timeout_s: float) -> bool:
        """Poll ``pred`` until true; at most 5% of the time goes into polling (a
        predicate over 10,000 statuses takes ~10 ms, and the watcher shares
        the machine with the fleet it watches)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            t = time.monotonic()
            if pred():
                return True
            time.sleep(max(0.2, 20 * (time.monotonic() - t)))
        return bool(pred())


class Fleet:
    """N devices over W worker processes."""

    def __init__(
        self,
        workdir: Path,
        n: int,
        broker_url: str,
        keys: Keys,
        seed: int,
        workers: int = 2,
        killable: int = 0,
        keepalive_s: int = 30,
        id_prefix: str = "sim",
    ) -> None:
        """``killable`` devices get a worker process each, so a power cut can hit one
        device alone (SIGKILL its process) while the others run on. Device ids
        are ``{id_prefix}-NNNN`` (agents on several hosts use their name)."""
        self.dir, self.n, self.url, self.keys = workdir, n, broker_url, keys
        self.rng = random.Random(seed)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "root.json").write_bytes(keys.root_bytes())
        (workdir / "bootstrap.wasm").write_bytes(apps.good("v0"))
        self.specs: list[dict[str, Any]] = []
        for i in range(n):
            hw = HARDWARE[i % len(HARDWARE)]
            self.specs.append(
                {
                    "id": f"{id_prefix}-{i:04d}",
                    "hardware": hw,
                    "state_dir": str(workdir / "devices" / f"{id_prefix}-{i:04d}"),
                    "root": str(workdir / "root.json"),
                    "bootstrap": str(workdir / "bootstrap.wasm"),
                    "temp_base": round(self.rng.uniform(18, 26), 2),
                    "temp_period_s": self.rng.choice([20, 45, 90]),
                    "temp_noise": round(self.rng.uniform(0.0, 0.3), 2),
                    # one in eight has a flaky temperature sensor
                    "temp_fault": self.rng.choice(["dropout", "spike", "stuck"])
                    if self.rng.random() < 0.125
                    else "none",
                    "seed": self.rng.randrange(2**31),
                    "quirk": 1.0 if hw == QUIRKY else 0.0,
                    "clock_offset_s": self._clock_offset(),
                    "keepalive_s": keepalive_s,
                    "tick_interval_ms": keys.tick_interval_ms,
                }
            )
        self.hardware = {s["id"]: s["hardware"] for s in self.specs}
        self.threads: dict[str, int] = {}
        """Worker name -> its thread count once all its devices run."""
        self.workers: list[tuple[Any, Any]] = []
        self._names: list[str] = []
        self.killable: list[str] = [str(s["id"]) for s in self.specs[: max(0, min(killable, n))]]
        shared = self.specs[len(self.killable) :]
        self.n_workers = max(1, min(workers, len(shared))) if shared else 0
        self.stats: dict[str, Any] = {}
        self._solo: dict[str, int] = {}
        self._ctx = mp.get_context("spawn")

    def _clock_offset(self) -> float:
        """Most clocks are a little off; one in ten never got set (no RTC, no
        NTP yet) and still thinks it is 2000-01-01."""
        if self.rng.random() < 0.1:
            return RTC_UNSET_EPOCH - time.time()
        return round(self.rng.uniform(-120, 120), 1)

    def _spawn(self, group: list[dict[str, Any]], name: str) -> int:
        parent, child = self._ctx.Pipe()
        p = self._ctx.Process(
            target=worker.run, args=(child, group, self.url, str(self.dir / f"{name}.log")), daemon=True
        )
        # Workers ignore SIGINT from birth (a terminal's Ctrl-C reaches the whole
        # process group): the parent stops them, so no worker dies mid-exchange
        # printing a KeyboardInterrupt traceback. A spawned interpreter keeps an
        # ignored SIGINT ignored.
        with _sigint_ignored():
            p.start()
        self.workers.append((p, parent))
        self._names.append(name)
        return len(self.workers) - 1

    def _ready(self, i: int, timeout_s: float) -> None:
        _p, conn = self.workers[i]
        if not conn.poll(timeout_s):
            raise RuntimeError("a simulator worker did not start in time (see its .log)")
        _, info = conn.recv()
        self.threads[self._names[i]] = int(info["threads"])

    def start(self, timeout_s: float = 120.0) -> None:
        shared = self.specs[len(self.killable) :]
        started = [self._spawn(shared[i :: self.n_workers], f"worker{i}") for i in range(self.n_workers)]
        for spec in self.specs[: len(self.killable)]:
            self._solo[str(spec["id"])] = self._spawn([spec], f"solo-{spec['id']}")
            started.append(self._solo[spec["id"]])
        for i in started:
            self._ready(i, timeout_s)

    def power_cut(self, device: str, timeout_s: float = 60.0) -> None:
        """SIGKILL the device's process (no goodbye: the broker sends its last will),
        then boot it again on the same state directory."""
        i = self._solo[device]
        p, conn = self.workers[i]
        p.kill()
        p.join(10)
        conn.close()
        self.workers[i] = (p, None)
        spec = next(s for s in self.specs if s["id"] == device)
        self._solo[device] = j = self._spawn([spec], f"solo-{device}")
        self._ready(j, timeout_s)

    def stop(self) -> None:
        for p, conn in self.workers:
            if conn is not None and p.is_alive():
                with contextlib.suppress(OSError):  # a worker that died already
                    conn.send("stop")
        for p, conn in self.workers:
            try:
                if conn is not None and p.is_alive() and conn.poll(60):
                    _, stats = conn.recv()
                    self.stats.update(stats)
            except (OSError, EOFError):
                pass
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(10)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
