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
        ax.set_title("Versions across the fleet over time")
        ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
        out.append(("Versions across the fleet", _png(fig)))
        plt.close(fig)
    for sc in data["scenarios"]:
        evs = [e for e in sc.get("rollout_events", []) if e["event"] == "progress"]
        if not evs:
            continue
        fig, ax = plt.subplots(figsize=(9, 3))
        t = [e["t"] for e in evs]
        for key, color in (("eligible", "tab:blue"), ("committed", "tab:green"), ("failed", "tab:red")):
            ax.step(t, [e[key] for e in evs], where="post", label=key, color=color)
        for e in sc["rollout_events"]:
            if e["event"] in ("step_done", "paused"):
                ax.axvline(
                    e["t"],
                    color="tab:red" if e["event"] == "paused" else "grey",
                    lw=1,
                    ls="-" if e["event"] == "paused" else "--",
                )
                ax.text(
                    e["t"],
                    ax.get_ylim()[1] * 0.9,
                    f" {e['step']}%" + (" PAUSED" if e["event"] == "paused" else ""),
                    fontsize=8,
                    color="tab:red" if e["event"] == "paused" else "k",
                )
        ax.set_title(f"Rollout steps: {sc['name']}")
        ax.set_xlabel("seconds")
        ax.legend(fontsize=8)
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
        ax.set_title("Rollbacks by hardware variant")
        out.append(("Rollbacks by hardware variant", _png(fig)))
        plt.close(fig)
    spread = data.get("reconnect_spread")
    if spread and spread.get("offsets_s"):
        fig, ax = plt.subplots(figsize=(6, 2.5))
        ax.hist(spread["offsets_s"], bins=20)
        ax.set_xlabel("seconds after the broker came back")
        ax.set_title("Reconnection spread")
        out.append(("Reconnection spread", _png(fig)))
        plt.close(fig)
    return out


def _phase_durations(events: list[dict[str, Any]]) -> dict[str, list[float]]:
    seen: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for e in events:
        if e.get("sequence") is not None and "t" in e:
            seen[(e["device"], e["sequence"])].setdefault(e["phase"], e["t"])
    out: dict[str, list[float]] = {"download": [], "stage": [], "trial": []}
    for ph in seen.values():
        if "DOWNLOADING" in ph and "DOWNLOADED" in ph:
            out["download"].append(ph["DOWNLOADED"] - ph["DOWNLOADING"])
        if "DOWNLOADED" in ph and "TRIAL" in ph:
            out["stage"].append(ph["TRIAL"] - ph["DOWNLOADED"])
        end = ph.get("COMMITTED", ph.get("ROLLED_BACK"))
        if "TRIAL" in ph and end is not None:
            out["trial"].append(end - ph["TRIAL"])
    return out


def _rollbacks_by_hw(events: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for e in events:
        if e.get("phase") in ("ROLLED_BACK", "CONFIG_ROLLED_BACK"):  # a release or a config
            out[e.get("hardware") or "?"][(e.get("reason_text") or "")[:80]] += 1
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
vertical-align:top}} table{{border-collapse:collapse}} .ok{{color:green}} .bad{{color:#b00;font-weight:bold}}</style>
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
