"""The simulator's report tells the truth: markers where steps start, the
counts the summary prints, durations on one clock, whole reasons, whole numbers."""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from sim import report

REASON = (
    "trial failed: dr_tick trapped: wasm `unreachable` instruction executed in the quirk path of the "
    "thermostat's sensor fusion after 14 ticks (allowed 0): error while executing at wasm backtrace"
)


def _sc() -> dict:  # type: ignore[type-arg]
    p = {"failed": 0, "timed_out": 0, "pending": 0}
    return {
        "name": "bad-release",
        "rollout_events": [
            {"event": "published", "t": 0.5},
            {"event": "step", "t": 1.0, "step": 10, "eligible": 2, "committed": 0, **p},
            {"event": "progress", "t": 1.0, "step": 10, "eligible": 2, "committed": 0, **p},
            {"event": "progress", "t": 3.0, "step": 10, "eligible": 2, "committed": 2, **p},
            {"event": "step_done", "t": 3.0, "step": 10, "eligible": 2, "committed": 2, **p},
            {"event": "step", "t": 3.2, "step": 50, "eligible": 12, "committed": 2, **p},
            {"event": "progress", "t": 6.0, "step": 50, "eligible": 12, "committed": 3, **{**p, "failed": 3}},
            {"event": "paused", "t": 6.1, "step": 50, "eligible": 12, "committed": 3, **{**p, "failed": 3}},
            {"event": "settled", "t": 9.5, "eligible": 12, "committed": 9, "failed": 3},
        ],
    }


def test_step_markers_sit_at_the_start_of_each_step_not_at_its_end() -> None:
    _points, markers = report._rollout_series(_sc())
    assert [(t, label.strip()) for t, label, _ in markers] == [
        (1.0, "10%"),
        (3.2, "50%"),
        (6.1, "PAUSED"),
        (9.5, "settled"),
    ]


def test_rollout_chart_ends_on_the_counts_the_summary_prints_not_at_the_pause() -> None:
    """The chart stopped at the pause (3 committed) while the table said 9 kept the release."""
    points, _ = report._rollout_series(_sc())
    assert (points[-1]["committed"], points[-1]["failed"]) == (9, 3)


def test_rollout_chart_counts_devices_in_whole_numbers() -> None:
    sc = {
        "name": "tiny",
        "rollout_events": [
            {"event": "progress", "t": 0.0, "eligible": 1, "committed": 0},
            {"event": "progress", "t": 1.0, "eligible": 1, "committed": 1},
        ],
    }
    fig = report._rollout_chart(plt, MaxNLocator, sc)
    try:
        ticks = fig.axes[0].get_yticks()
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(fig)


def test_phase_durations_from_clocks_that_disagree_are_never_negative() -> None:
    """`t` is when the watcher received an event (out of order after a reconnect);
    durations come from the device's own timestamps and measured seconds."""
    ev = [
        {"device": "d", "sequence": 2, "phase": "DOWNLOADING", "ts": 100.0, "t": 9.0},
        {"device": "d", "sequence": 2, "phase": "DOWNLOADED", "ts": 104.0, "seconds": 3.5, "t": 5.0},
        {"device": "d", "sequence": 2, "phase": "STAGED", "ts": 104.2, "t": 5.1},
        {"device": "d", "sequence": 2, "phase": "TRIAL", "ts": 104.5, "t": 5.2},
        {"device": "d", "sequence": 2, "phase": "COMMITTED", "ts": 106.5, "t": 5.3},
    ]
    d = report._phase_durations(ev)
    assert d == {"download": [3.5], "stage": [0.5], "trial": [2.0]}


def test_rollback_reason_is_shown_whole(tmp_path: Path) -> None:
    """It was cut mid-word at 80 characters."""
    data = {
        "devices": 1,
        "broker": "x",
        "seed": 1,
        "duration_s": 1.0,
        "scenarios": [{"name": "bad-release", "ok": True, "checks": ["c"], "seconds": 1.0, "t_start": 0}],
        "events": [
            {"device": "d", "sequence": 2, "phase": "ROLLED_BACK", "hardware": "stb-b", "reason_text": REASON}
        ],
        "timeline": [],
    }
    sp, hp = report.write(tmp_path, data)
    assert json.loads(sp.read_text())["rollbacks_by_hardware"] == {"stb-b": {REASON: 1}}
    assert html.escape(REASON) in hp.read_text()


def test_fleet_benchmark_prints_json_not_a_python_dict() -> None:
    """`python -m bench.fleet` printed a Python dict (single quotes, None): no tool could read it."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    r = subprocess.run(
        [sys.executable, "-m", "bench.fleet", "4"], capture_output=True, text=True, cwd=ROOT, timeout=240
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["devices"] == 4 and rows[0]["committed"] == 4
