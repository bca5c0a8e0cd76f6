"""summary.json and a self-contained report.html (plots inline as PNG).

Plots need matplotlib (``pip install 'devicerunner[report]'``); without it
the report still has every table, and says what to install for the plots.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(data: dict[str, Any]) -> list[tuple[str, str]] | None:
    """The plots, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    out = []
    tl = data["timeline"]
    keys: list[str] = []
    for s in tl:  # in order of first appearance
        keys += [k for k in s["versions"] if k not in keys]
    if tl and keys:
        fig, ax = plt.subplots(figsize=(9, 3.5))
        ts = [s["t"] for s in tl]
        ax.stackplot(ts, [[s["versions"].get(k, 0) for s in tl] for k in keys], labels=keys, alpha=0.85)
        for sc in data["scenarios"]:
            ax.axvline(sc["t_start"], color="k", lw=0.6, ls=":")
            ax.text(sc["t_start"], ax.get_ylim()[1] * 0.97, f" {sc['name']}", fontsize=8, va="top")
        ax.set_xlabel("seconds")
        ax.set_ylabel("devices")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("Versions across the fleet over time")
        ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
        out.append(("Versions across the fleet", _png(fig)))
        plt.close(fig)
    for sc in data["scenarios"]:
        fig = _rollout_chart(plt, MaxNLocator, sc)
        if fig is not None:
            out.append((f"Rollout: {sc['name']}", _png(fig)))
            plt.close(fig)
    phases = _phase_durations(data["events"])
    if any(phases.values()):
        fig, ax = plt.subplots(figsize=(7, 3))
        names = [k for k in phases if phases[k]]
        ax.boxplot([phases[k] for k in names], vert=False)
        ax.set_yticks(range(1, len(names) + 1), names)
        ax.set_xlabel("seconds")
        ax.set_title("Per-phase durations (all devices, all releases)")
        out.append(("Per-phase durations", _png(fig)))
        plt.close(fig)
    rb = _rollbacks_by_hw(data["events"])
    if rb:
        fig, ax = plt.subplots(figsize=(6, 2.5))
        hws = sorted(rb)
        ax.barh(hws, [sum(rb[h].values()) for h in hws], color="tab:red")
        ax.set_xlabel("rollbacks")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("Rollbacks by hardware variant")
        out.append(("Rollbacks by hardware variant", _png(fig)))
        plt.close(fig)
    spread = data.get("reconnect_spread")
    if spread and spread.get("offsets_s"):
        fig, ax = plt.subplots(figsize=(6, 2.5))
        ax.hist(spread["offsets_s"], bins=20)
        ax.set_xlabel("seconds after the broker came back")
        ax.set_ylabel("devices")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("Reconnection spread")
        out.append(("Reconnection spread", _png(fig)))
        plt.close(fig)
    return out


def _rollout_series(sc: dict[str, Any]) -> tuple[list[dict[str, Any]], list[tuple[float, str, bool]]]:
    """The rollout chart's points (progress while the controller watched, then
    the fleet as the scenario found it once in-flight trials settled: the
    numbers its checks print) and its markers ``(t, label, paused)``: a step's
    marker at its start, so the region right of "10%" is the 10% step."""
    evs = sc.get("rollout_events", [])
    points = [e for e in evs if e["event"] in ("progress", "settled")]
    labels = {"paused": " PAUSED", "settled": " settled"}
    markers = [
        (e["t"], labels.get(e["event"], f" {e.get('step')}%"), e["event"] == "paused")
        for e in evs
        if e["event"] in ("step", "paused", "settled")
    ]
    return points, markers


def _rollout_chart(plt: Any, locator: Any, sc: dict[str, Any]) -> Any:
    points, markers = _rollout_series(sc)
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(9, 3))
    t = [e["t"] for e in points]
    for key, color in (
        ("eligible", "tab:blue"),
        ("committed", "tab:green"),
        ("failed", "tab:red"),
        ("timed_out", "tab:orange"),
    ):
        ax.step(t, [e.get(key, 0) for e in points], where="post", label=key.replace("_", " "), color=color)
    ax.yaxis.set_major_locator(locator(integer=True))
    top = max(1, *(e.get("eligible", 0) for e in points)) * 1.15
    ax.set_ylim(0, top)
    for x, label, paused in markers:
        ax.axvline(x, color="tab:red" if paused else "grey", lw=1, ls="-" if paused else "--")
        ax.text(x, top * 0.92, label, fontsize=8, color="tab:red" if paused else "k")
    ax.set_title(f"Rollout steps: {sc['name']}")
    ax.set_xlabel("seconds")
    ax.set_ylabel("devices")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    return fig


def _phase_durations(events: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Seconds per phase, per device and release, on one clock: the device's own
    (its event timestamps; download: the device's measured ``seconds``). An end
    pairs with the latest start before it; nothing is ever negative."""
    seen: dict[tuple[str, int], list[tuple[float, str, dict[str, Any]]]] = defaultdict(list)
    for e in events:
        if e.get("sequence") is not None and isinstance(e.get("ts"), int | float):
            seen[(e["device"], e["sequence"])].append((float(e["ts"]), e["phase"], e))
    out: dict[str, list[float]] = {"download": [], "stage": [], "trial": []}
    for evs in seen.values():
        evs.sort(key=lambda x: x[0])
        last: dict[str, float] = {}
        for ts, phase, e in evs:
            if phase == "DOWNLOADED":
                secs = e.get("seconds")
                if isinstance(secs, int | float) and secs >= 0:
                    out["download"].append(float(secs))
                elif "DOWNLOADING" in last:
                    out["download"].append(ts - last["DOWNLOADING"])
            elif phase == "TRIAL" and "DOWNLOADED" in last:
                out["stage"].append(ts - last.pop("DOWNLOADED"))
            elif phase in ("COMMITTED", "ROLLED_BACK") and "TRIAL" in last:
                out["trial"].append(ts - last.pop("TRIAL"))
            last[phase] = ts
    return out


def _rollbacks_by_hw(events: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """hardware -> the whole rollback reason -> devices (the page wraps it, never cuts it)."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for e in events:
        if e.get("phase") in ("ROLLED_BACK", "CONFIG_ROLLED_BACK"):  # a release or a config
            out[e.get("hardware") or "?"][e.get("reason_text") or e.get("reason") or ""] += 1
    return {k: dict(v) for k, v in out.items()}


def write(report_dir: Path, data: dict[str, Any]) -> tuple[Path, Path]:
    report_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "devices": data["devices"],
        "broker": data["broker"],
        "seed": data["seed"],
        "duration_s": data["duration_s"],
        "ok": all(s["ok"] for s in data["scenarios"]),
        "scenarios": [{k: v for k, v in s.items() if k != "rollout_events"} for s in data["scenarios"]],
        "rollbacks_by_hardware": _rollbacks_by_hw(data["events"]),
        "phase_durations_s": {
            k: (round(sorted(v)[len(v) // 2], 3) if v else None)
            for k, v in _phase_durations(data["events"]).items()
        },
        "reconnect_spread": data.get("reconnect_spread"),
        "interrupted": bool(data.get("interrupted")),
    }
    sp = report_dir / "summary.json"
    sp.write_text(json.dumps(summary, indent=2, default=str))
    plots = _plots(data)
    rows = "".join(
        f"<tr><td>{html.escape(s['name'])}</td><td class={'ok' if s['ok'] else 'bad'}>{'ok' if s['ok'] else 'FAILED'}"
        f"</td><td>{'<br>'.join(html.escape(c) for c in s['checks'])}</td><td>{s['seconds']:.1f}</td></tr>"
        for s in data["scenarios"]
    )
    if plots is None:
        figs = "<p>Plots need matplotlib: <code>pip install 'devicerunner[report]'</code></p>"
    else:
        figs = "".join(f"<h2>{html.escape(t)}</h2><img src='data:image/png;base64,{b}'>" for t, b in plots)
    rb = _rollbacks_by_hw(data["events"])
    rbrows = "".join(
        f"<tr><td>{html.escape(hw)}</td><td>{n}</td><td>{html.escape(why)}</td></tr>"
        for hw, d in sorted(rb.items())
        for why, n in d.items()
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>devicerunner fleet simulation</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}} td,th{{border:1px solid #ccc;padding:4px 8px;
vertical-align:top;overflow-wrap:anywhere}} table{{border-collapse:collapse}} .ok{{color:green}} .bad{{color:#b00;font-weight:bold}}</style>
</head><body><h1>Fleet simulation</h1>
<p>{data["devices"]} devices, broker {html.escape(data["broker"])}, seed {data["seed"]},
{data["duration_s"]:.0f} s.</p>
<table><tr><th>scenario</th><th>result</th><th>what was checked</th><th>s</th></tr>{rows}</table>
<h2>Rollback reasons by hardware variant</h2>
<table><tr><th>hardware</th><th>devices</th><th>reason</th></tr>{rbrows or "<tr><td colspan=3>none</td></tr>"}</table>
{figs}</body></html>"""
    hp = report_dir / "report.html"
    hp.write_text(page)
    return sp, hp
