"""Run every benchmark and print one table:  python -m bench.run [--quick]

Fixed iteration counts and warm-ups; medians and p99; each fast-path figure
is compared with the stock path *in the same run* (a ratio), because these
shared machines vary 10-40% from run to run. Targets are those of the
fast-path issue; a miss is printed as MISS, never hidden.
"""

from __future__ import annotations

import platform
import sys
import time

from bench import boundary, ota, sensor_read, tick


def main() -> int:
    quick = "--quick" in sys.argv
    n = 2000 if quick else 20_000
    print(
        f"# devicerunner benchmarks {time.strftime('%Y-%m-%d %H:%M')}, Python {platform.python_version()}, "
        f"{platform.machine()}, {'quick' if quick else 'full'} run"
    )
    stock = {s.name.split(" (")[0]: s for s in boundary.crossings("stock", n)}
    fast = {s.name.split(" (")[0]: s for s in boundary.crossings("fast", n)}
    cold = boundary.cold_start(20 if quick else 100)
    swap, missed = boundary.swap_pause(50 if quick else 300)
    cpu, rss = boundary.daemon_idle(3.0 if quick else 10.0)
    tail = boundary.long_tail(10_000 if quick else 100_000)
    per_app = boundary.memory_per_app(20 if quick else 50)

    rows = []

    def target(name: str, value: float, unit: str, ok: bool, goal: str, ratio: str = "") -> None:
        rows.append((name, f"{value:.2f} {unit}", ratio, goal, "pass" if ok else "MISS"))

    for key, limit, min_ratio in (("wasm->host call", 1.5, 15), ("host->wasm export call", 4.0, 5)):
        f, s = fast[key], stock[key]
        r = s.median / f.median
        target(
            f"{key} (median; p99 {f.p99:.1f} us)",
            f.median,
            "us",
            f.median <= limit and r >= min_ratio,
            f"<= {limit} us, >= {min_ratio}x",
            f"{r:.1f}x",
        )
    f, s = fast["thermostat tick"], stock["thermostat tick"]
    r = s.median / f.median
    target(
        f"thermostat tick (median; p99 {f.p99:.1f} us)", f.median, "us", r >= 10, ">= 10x stock", f"{r:.1f}x"
    )
    target(
        f"cold start from cache (median; p99 {cold.p99 / 1000:.2f} ms)",
        cold.median / 1000,
        "ms",
        cold.median <= 1000,
        "<= 1 ms",
    )
    target(
        f"swap pause p99 (median {swap.median / 1000:.2f} ms; {missed} missed ticks)",
        swap.p99 / 1000,
        "ms",
        swap.p99 <= 1000 and missed == 0,
        "p99 <= 1 ms, 0 missed",
    )
    target(f"3 apps at 10 Hz: CPU of one core (max RSS {rss / 1024:.0f} MiB)", cpu, "%", cpu < 2.0, "< 2%")

    print(f"\n{'target':<62} {'measured':>12} {'vs stock':>9}  {'goal':<22} result")
    for name, val, ratio, goal, res in rows:
        print(f"{name:<62} {val:>12} {ratio:>9}  {goal:<22} {res}")

    print(f"\n{'benchmark':<48} {'median':>10} {'p99':>10}")
    extra = [*stock.values(), *fast.values(), cold, swap, tail]
    extra += [*tick.run(n), *sensor_read.run(n), *ota.run(3 if quick else 9)]
    for s in extra:
        print(s.row())
    print(f"memory per additional thermostat instance: {per_app:.0f} KiB RSS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
