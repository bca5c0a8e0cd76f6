"""Run every benchmark and print one table: python -m bench.run [--quick]"""

from __future__ import annotations

import platform
import sys
import time

from bench import ota, sensor_read, tick


def main() -> int:
    quick = "--quick" in sys.argv
    print(
        f"# devicerunner benchmarks, {time.strftime('%Y-%m-%d %H:%M')}, Python {platform.python_version()}, "
        f"{platform.machine()}"
    )
    print(f"{'benchmark':<48} {'median':>10} {'p99':>10}")
    stats = [
        *tick.run(2000 if quick else 20_000),
        *sensor_read.run(2000 if quick else 20_000),
        *ota.run(3 if quick else 9),
    ]
    for s in stats:
        print(s.row())
    base, thermo = stats[0], stats[1]
    print(f"\nthermostat tick / empty tick: {thermo.median / base.median:.2f}x (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
