"""Scenarios: each drives the fleet like an operator would and checks the outcome.

Each returns a dict with ``ok`` (did the fleet do what it must), ``checks``
(what was verified) and whatever the report plots.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devicerunner.fleet.rollout import COUNT_KEYS, Policy, RolloutController
from devicerunner.transport import operator, topics
from devicerunner.trust import bundle, manifest
from sim import apps
from sim.agent import RemoteFleet
from sim.fleet import QUIRKY, Fleet, Watcher
from sim.netfault import FaultProxy, Faults

P = "dr/v1"


class Ctx:
    def __init__(
        self,
        fleet: Fleet | RemoteFleet,
        watcher: Watcher,
        restart_broker: Callable[[float], None] | None = None,
        proxy: FaultProxy | None = None,
    ) -> None:
        self.fleet, self.w = fleet, watcher
        self.s = watcher.s
        self.sequence = 0
        self.config_version = 0
        self.restart_broker = restart_broker
        """Stops the broker for the given seconds and starts it again (None: not ours to restart)."""
        self.proxy = proxy
        """The fault-injecting proxy the devices reach the broker through (None: they connect directly)."""

    def next_sequence(self) -> int:
        self.sequence += 1
        return self.sequence

    def next_config_version(self) -> int:
        self.config_version += 1
        return self.config_version

    def on_config(self, version: int) -> Callable[[str, dict[str, Any]], bool]:
        def committed(_d: str, st: dict[str, Any]) -> bool:
            a = (st.get("apps") or {}).get("app") or {}
            return a.get("config_version") == version and a.get("config_phase") == "COMMITTED"

        return committed

    def rollout(
        self,
        data: bytes,
        steps: tuple[int, ...],
        abort_pct: float,
        min_devices: int,
        step_wait_s: float = 20.0,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        events: list[dict[str, Any]] = []

        def emit(ev: dict[str, Any]) -> None:
            ev["t"] = round(time.time() - self.w.t0, 2)
            events.append(ev)
            if ev["event"] in ("published", "step_done", "paused", "completed", "incomplete"):
                shown = ("version", "sequence", "devices", "step", *COUNT_KEYS, "reason")
                print(
                    f"    rollout {ev['event']}: " + ", ".join(f"{k}={ev[k]}" for k in shown if k in ev),
                    flush=True,
                )

        policy = Policy(steps, step_wait_s, abort_pct, min_devices, device_timeout_s=40.0)
        result = RolloutController(self.s, P, data, self.fleet.keys.rollout, policy, emit).run(discover_s=0.5)
        return result, events

    def settled(self, events: list[dict[str, Any]], result: dict[str, Any], **counts: int) -> None:
        """The fleet once in-flight updates settled (after the controller stopped
        watching): the last point of the report's rollout chart, with the same
        numbers the scenario's checks print."""
        events.append(
            {
                "event": "settled",
                "t": round(time.time() - self.w.t0, 2),
                "eligible": result["eligible"],
                **counts,
            }
        )

    def reported(self, phase: str, seq: int) -> set[str]:
        """Devices that sent a ``phase`` event for release ``seq``."""
        return {
            e["device"] for e in list(self.w.events) if e.get("sequence") == seq and e.get("phase") == phase
        }

    def on_seq(self, seq: int) -> Callable[[str, dict[str, Any]], bool]:
        return lambda _d, st: ((st.get("apps") or {}).get("app") or {}).get("sequence") == seq


def happy(ctx: Ctx) -> dict[str, Any]:
    seq = ctx.next_sequence()
    data = ctx.fleet.keys.bundle(apps.good(f"v{seq}"), seq, f"1.{seq}.0")
    result, events = ctx.rollout(data, (10, 50, 100), abort_pct=20, min_devices=3)
    n = ctx.fleet.n
    ctx.w.wait(lambda: ctx.w.count(ctx.on_seq(seq)) == n, 30)
    committed = ctx.w.count(ctx.on_seq(seq))
    ctx.settled(events, result, committed=committed)
    return {
        "ok": result["result"] == "completed" and committed == n,
        "sequence": seq,
        "rollout": result,
        "rollout_events": events,
        "checks": [f"{committed}/{n} devices committed sequence {seq}"],
    }


def bad_release(ctx: Ctx) -> dict[str, Any]:
    base = ctx.sequence
    seq = ctx.next_sequence()
    data = ctx.fleet.keys.bundle(apps.bad_on_quirk(), seq, f"1.{seq}.0-bad")
    result, events = ctx.rollout(data, (10, 30, 60, 100), abort_pct=15, min_devices=3)
    time.sleep(3)  # let in-flight trials finish
    rolled = [e for e in ctx.w.events if e.get("phase") == "ROLLED_BACK" and e.get("sequence") == seq]
    by_hw = Counter(e.get("hardware") for e in rolled)
    on_new = ctx.w.count(ctx.on_seq(seq))
    quirky_on_new = ctx.w.count(lambda d, st: ctx.on_seq(seq)(d, st) and st.get("hardware") == QUIRKY)
    on_old = ctx.w.count(ctx.on_seq(base))
    ctx.settled(events, result, committed=on_new, failed=len({e["device"] for e in rolled}))
    ok = result["result"] == "paused" and bool(rolled) and set(by_hw) == {QUIRKY} and quirky_on_new == 0
    return {
        "ok": ok,
        "sequence": seq,
        "rollout": result,
        "rollout_events": events,
        "rollbacks_by_hardware": dict(by_hw),
        "checks": [
            f"rollout {result['result']} at {result['step']}%: {result.get('reason', '')}",
            f"rolled back on: {dict(by_hw)} (the variant with the bug: {QUIRKY})",
            f"{on_new} device(s) kept the new release (none of them {QUIRKY}), {on_old} on the old one",
        ],
    }


def bad_config(ctx: Ctx) -> dict[str, Any]:
    """A config change that breaks the app on one hardware variant, rolled out in
    stages: the rollout pauses and only those devices go back to the previous config."""
    keys, n = ctx.fleet.keys, ctx.fleet.n
    seq = ctx.next_sequence()  # the app that reads its gain from config, everywhere
    module = apps.configured(f"c{seq}")
    caps = ("log", "clock", "sensors", "config")
    operator.publish_bundle(ctx.s, keys.bundle(module, seq, f"1.{seq}.0", percent=100, capabilities=caps), P)
    ctx.w.wait(lambda: ctx.w.count(ctx.on_seq(seq)) == n, 60)
    good = ctx.next_config_version()
    with operator.Session(ctx.s) as sess:
        sess.publish_many(
            [(topics.config(P, "app", "stable"), keys.config_doc(good, {"gain": "2"}))], retain=True
        )
    ctx.w.wait(lambda: ctx.w.count(ctx.on_config(good)) == n, 40)
    on_good_before = ctx.w.count(ctx.on_config(good))
    bad = ctx.next_config_version()
    result, events = ctx.rollout(
        keys.config_doc(bad, {"gain": "50"}, percent=0), (10, 30, 60, 100), abort_pct=15, min_devices=3
    )

    def settled(_d: str, st: dict[str, Any]) -> bool:
        return not ((st.get("apps") or {}).get("app") or {}).get("config_on_trial")

    ctx.w.wait(lambda: ctx.w.count(settled) == n, 15)  # in-flight trials end
    rolled = [
        e for e in ctx.w.events if e.get("phase") == "CONFIG_ROLLED_BACK" and e.get("config_version") == bad
    ]
    by_hw = Counter(e.get("hardware") for e in rolled)

    def quirky(pred: Callable[[str, dict[str, Any]], bool]) -> Callable[[str, dict[str, Any]], bool]:
        return lambda d, st: pred(d, st) and st.get("hardware") == QUIRKY

    quirky_on_bad = ctx.w.count(quirky(ctx.on_config(bad)))
    rolled_devices = {e["device"] for e in rolled}
    back_on_good = sum(1 for d in rolled_devices if (ctx.w.app_of(d).get("config_version") == good))
    on_bad = ctx.w.count(ctx.on_config(bad))
    ctx.settled(events, result, committed=on_bad, failed=len(rolled_devices))
    ok = (
        on_good_before == n
        and result["result"] == "paused"
        and bool(rolled)
        and set(by_hw) == {QUIRKY}
        and quirky_on_bad == 0
        and back_on_good == len(rolled_devices)
    )
    return {
        "ok": ok,
        "sequence": seq,
        "config_version": bad,
        "rollout": result,
        "rollout_events": events,
        "rollbacks_by_hardware": dict(by_hw),
        "checks": [
            f"{on_good_before}/{n} devices committed config v{good} (gain 2) on release {seq}",
            f"config v{bad} (gain 50) rollout {result['result']} at {result['step']}%: "
            f"{result.get('reason', '')}",
            f"rolled back on: {dict(by_hw)} (the variant the config breaks: {QUIRKY}); "
            f"{back_on_good}/{len(rolled_devices)} of them run config v{good} again",
            f"{on_bad} device(s) kept config v{bad} (none of them {QUIRKY})",
        ],
    }


def tampered(ctx: Ctx) -> dict[str, Any]:
    seq = ctx.next_sequence()
    data = ctx.fleet.keys.bundle(apps.good(f"t{seq}") + b"", seq, f"1.{seq}.0", percent=100)
    man, module = bundle.unpack(data)
    m = manifest.parse_manifest(man)
    a = m.artifact
    chunks = [
        (topics.chunk(P, a.sha256, i), module[a.offsets[i] : a.offsets[i] + a.sizes[i]])
        for i in range(len(a.chunks))
    ]
    chunks[0] = (chunks[0][0], b"\0" * len(chunks[0][1]))  # someone on the broker swapped a chunk
    with operator.Session(ctx.s) as sess:
        sess.publish_many(chunks, retain=True)
        sess.publish_many([(topics.release(P, "app", "stable"), man)], retain=True)
    n = ctx.fleet.n
    ctx.w.wait(lambda: len(ctx.reported("REJECTED", seq)) == n, 30)
    rejected = ctx.reported("REJECTED", seq)
    reasons = Counter(
        e.get("reason") for e in ctx.w.events if e.get("sequence") == seq and e.get("phase") == "REJECTED"
    )
    running = ctx.w.count(ctx.on_seq(seq))
    return {
        "ok": len(rejected) == n and running == 0,
        "sequence": seq,
        "checks": [f"{len(rejected)}/{n} devices rejected it ({dict(reasons)}); {running} run it"],
    }


def key_rotation(ctx: Ctx) -> dict[str, Any]:
    keys = ctx.fleet.keys
    old_release = list(keys.release)
    new_release = [Ed25519PrivateKey.generate() for _ in range(2)]
    keys.release, keys.version = new_release, keys.version + 1
    root2 = keys.root_bytes()
    operator.publish_root(ctx.s, root2, P)
    n = ctx.fleet.n
    ctx.w.wait(lambda: ctx.w.count(lambda _d, st: st.get("root_version") == keys.version) == n, 30)
    rotated = ctx.w.count(lambda _d, st: st.get("root_version") == keys.version)
    # a release signed by the retired keys is refused everywhere
    seq_old = ctx.next_sequence()
    operator.publish_bundle(
        ctx.s,
        keys.bundle(apps.good(f"r{seq_old}"), seq_old, f"1.{seq_old}.0", percent=100, signers=old_release),
        P,
    )
    ctx.w.wait(lambda: len(ctx.reported("REJECTED", seq_old)) == n, 30)
    refused = ctx.reported("REJECTED", seq_old)
    # one signed by the new keys is taken
    seq = ctx.next_sequence()
    operator.publish_bundle(ctx.s, keys.bundle(apps.good(f"n{seq}"), seq, f"1.{seq}.0", percent=100), P)
    ctx.w.wait(lambda: ctx.w.count(ctx.on_seq(seq)) == n, 40)
    taken = ctx.w.count(ctx.on_seq(seq))
    return {
        "ok": rotated == n and len(refused) == n and taken == n,
        "sequence": seq,
        "checks": [
            f"{rotated}/{n} devices rotated to root v{keys.version}",
            f"{len(refused)}/{n} refused the release signed by the retired keys",
            f"{taken}/{n} committed the release signed by the new keys",
        ],
    }


def broker_outage(ctx: Ctx) -> dict[str, Any]:
    if ctx.restart_broker is None:
        return {
            "ok": False,
            "skipped": True,
            "checks": ["skipped: needs a broker the simulator controls (run without --broker)"],
        }
    seq = ctx.next_sequence()
    data = ctx.fleet.keys.bundle(apps.good(f"o{seq}") + b"", seq, f"1.{seq}.0", percent=100)
    operator.publish_bundle(ctx.s, data, P)
    time.sleep(0.3)  # mid-rollout: some devices are downloading or on trial
    t_down = time.time()
    ctx.restart_broker(3.0)
    t_up = time.time()
    # An in-memory broker loses retained messages on restart; the operator publishes again.
    operator.publish_root(ctx.s, ctx.fleet.keys.root_bytes(), P)
    operator.publish_bundle(ctx.s, data, P)
    n = ctx.fleet.n
    ctx.w.wait(lambda: ctx.w.count(ctx.on_seq(seq)) == n, 60)
    committed = ctx.w.count(ctx.on_seq(seq))
    back = sorted(t - t_up for t in ctx.w.first_status_after(t_up).values())
    spread = {
        "devices_back": len(back),
        "first_s": round(back[0], 2) if back else None,
        "last_s": round(back[-1], 2) if back else None,
        "median_s": round(back[len(back) // 2], 2) if back else None,
        "offsets_s": [round(x, 3) for x in back],
    }
    return {
        "ok": committed == n and len(back) == n and (back[-1] - back[0] > 0.5 if len(back) > 2 else True),
        "sequence": seq,
        "reconnect_spread": spread,
        "checks": [
            f"broker down {t_up - t_down:.1f} s mid-rollout",
            f"{len(back)}/{n} devices reconnected, spread over {spread['first_s']}..{spread['last_s']} s "
            f"after the broker returned (median {spread['median_s']} s): full jitter, not lockstep",
            f"{committed}/{n} committed sequence {seq}",
        ],
    }


def power_loss(ctx: Ctx) -> dict[str, Any]:
    victims = list(ctx.fleet.killable)
    if not victims:
        return {"ok": False, "skipped": True, "checks": ["skipped: the fleet has no killable devices"]}
    base = ctx.sequence
    seq = ctx.next_sequence()
    data = ctx.fleet.keys.bundle(apps.good(f"p{seq}"), seq, f"1.{seq}.0", percent=100)
    operator.publish_bundle(ctx.s, data, P)
    rng = ctx.fleet.rng
    cuts = 0
    t_end = time.monotonic() + 4.0  # cut power at random instants while the fleet updates
    for dev in victims * 2:
        time.sleep(rng.uniform(0.0, 0.8))
        if time.monotonic() > t_end:
            break
        ctx.fleet.power_cut(dev)
        cuts += 1
    n = ctx.fleet.n

    def settled(_d: str, st: dict[str, Any]) -> bool:
        a = (st.get("apps") or {}).get("app") or {}
        return (
            bool(st.get("online"))
            and bool(a.get("running"))
            and a.get("phase") in ("COMMITTED", "ROLLED_BACK")
            and a.get("sequence") in (base, seq)
            and not a.get("pending_sequence")
        )

    ctx.w.wait(lambda: ctx.w.count(settled) == n and ctx.w.count(ctx.on_seq(seq)) >= n - len(victims), 90)
    ok_n = ctx.w.count(settled)
    on_new = ctx.w.count(ctx.on_seq(seq))
    cut_state = {d: (ctx.w.app_of(d).get("sequence"), ctx.w.app_of(d).get("phase")) for d in victims}
    return {
        "ok": ok_n == n and on_new >= n - len(victims),
        "sequence": seq,
        "power_cuts": cuts,
        "checks": [
            f"{cuts} power cuts (SIGKILL + reboot) on {len(victims)} devices during the update",
            f"{ok_n}/{n} devices settled on a verified version (old {base} or new {seq}), none mid-update",
            f"{on_new}/{n} on the new release; the cut devices (sequence, phase): {cut_state}",
        ],
    }


def _median(xs: list[float]) -> float:
    return xs[len(xs) // 2] if xs else 0.0


FLAKY = Faults(
    latency_ms=40, jitter_ms=30, disconnects_per_min=10, stalls_per_min=4, refuse=0.2, kib_per_s=16
)
"""A bad link: ~40 ms latency, 16 KiB/s, a reset every ~6 s and a silent stall every
~15 s per connection, one connection attempt in five refused."""
FLAKY_MIN_S = 12.0
"""The fleet lives with the bad link at least this long, however fast it updates."""


def flaky_network(ctx: Ctx) -> dict[str, Any]:
    proxy = ctx.proxy
    if proxy is None:
        return {
            "ok": False,
            "skipped": True,
            "checks": ["skipped: the devices do not connect through the proxy"],
        }
    seq = ctx.next_sequence()
    # 40 KiB: ten chunks, so a broken connection leaves a download to resume.
    data = ctx.fleet.keys.bundle(apps.good(f"f{seq}", pad_kib=40), seq, f"1.{seq}.0", percent=100)
    before = Counter(proxy.stats)
    proxy.set_faults(FLAKY)
    t_bad = time.monotonic()
    try:
        time.sleep(2.0)  # the links are already bad when the release comes
        t0 = time.monotonic()
        operator.publish_bundle(ctx.s, data, P)
        n = ctx.fleet.n
        ctx.w.wait(lambda: ctx.w.count(ctx.on_seq(seq)) == n, 120)
        took = time.monotonic() - t0
        time.sleep(max(0.0, FLAKY_MIN_S - (time.monotonic() - t_bad)))
    finally:
        proxy.set_faults(Faults())
    committed = ctx.w.count(ctx.on_seq(seq))
    injected = {k: v - before.get(k, 0) for k, v in proxy.stats.items() if v - before.get(k, 0)}
    took_dl = sorted(
        float(e.get("seconds") or 0)
        for e in ctx.w.events
        if e.get("sequence") == seq and e.get("phase") == "DOWNLOADED"
    )
    failed = [
        e for e in ctx.w.events if e.get("sequence") == seq and e.get("phase") in ("REJECTED", "ROLLED_BACK")
    ]
    faults = injected.get("disconnects", 0) + injected.get("stalls", 0) + injected.get("refused", 0)
    return {
        "ok": committed == n and not failed and faults > 0,
        "sequence": seq,
        "network_faults": injected,
        "download_seconds": took_dl,
        "checks": [
            f"through the proxy for {time.monotonic() - t_bad:.0f} s: "
            f"{injected.get('disconnects', 0)} resets, "
            f"{injected.get('stalls', 0)} silent stalls, {injected.get('refused', 0)} refused connections, "
            f"{FLAKY.latency_ms:.0f}±{FLAKY.jitter_ms:.0f} ms latency, {FLAKY.kib_per_s:.0f} KiB/s",
            f"{committed}/{n} committed sequence {seq} in {took:.1f} s; its 40 KiB (10 chunks, ~2.5 s on a "
            f"clean 16 KiB/s link) took median {_median(took_dl):.1f} s, "
            f"at most {max(took_dl, default=0):.1f} s",
            f"{len(failed)} rejected or rolled back",
            *(f"  {e['device']} {e['phase']}: {e.get('reason_text') or e.get('reason')}" for e in failed[:5]),
        ],
    }


SCENARIOS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "happy": happy,
    "bad-release": bad_release,
    "tampered": tampered,
    "broker-outage": broker_outage,
    "power-loss": power_loss,
    "key-rotation": key_rotation,
    "flaky-network": flaky_network,
    "bad-config": bad_config,
}
DEMO = ("happy", "bad-release", "tampered")
