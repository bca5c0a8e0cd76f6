"""Flash wear of app kv stores: bytes the kv flusher writes per day.

The store, its file backend and the flusher are the daemon's own (a real lane,
real atomic writes with fsync into a temp directory); the app is replaced by
``KvStore.set`` calls at its tick rate (10 Hz, the default tick interval), so
what is measured is the persistence policy, not Wasm. Bytes are counted at the
backend (every snapshot handed to the disk) and extrapolated to a day.

Scenarios:
- ``full-quota``: the default 64 KiB quota filled with 4-byte keys, one value
  rewritten every tick (the issue's 40 GiB/day case);
- ``counter``: one 4-byte counter changed every tick;
- ``same-value``: one key set to the same value every tick (nothing changes).

Run: ``python -m bench.kv_wear [seconds per scenario, default 15]``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from devicerunner.device.kvfile import FileKvBackend, KvFlusher
from devicerunner.runtime.lanes import Executor
from hostfuncs import codes
from hostfuncs.kv import KvStore

TICK_S = 0.1
QUOTA = 64 * 1024


class CountingBackend(FileKvBackend):
    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.bytes = 0
        self.saves = 0

    def save(self, data: bytes) -> None:
        super().save(data)
        self.bytes += len(data)
        self.saves += 1


def _fill(store: KvStore) -> int:
    i = 0
    while store.set(i.to_bytes(4, "big"), b"\0\0\0\0") == codes.OK:
        i += 1
    return i


def scenario(name: str, seconds: float) -> tuple[float, int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        backend = CountingBackend(Path(tmp) / "kv")
        store = KvStore(QUOTA, backend)
        ex = Executor(1, "kv-bench")
        flusher = KvFlusher(ex.lane("kv"))
        flusher.add(store)
        keys = _fill(store) if name == "full-quota" else 1
        flusher.start()
        flusher.flush_all()  # the filled store once: not counted below
        backend.bytes = backend.saves = 0
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < seconds:
            n += 1
            if name == "full-quota":
                store.set((n % keys).to_bytes(4, "big"), n.to_bytes(4, "little"))
            elif name == "counter":
                store.set(b"count", n.to_bytes(4, "little"))
            else:
                store.set(b"setpoint", b"22.0")
            time.sleep(max(0.0, t0 + n * TICK_S - time.monotonic()))
        elapsed = time.monotonic() - t0
        flusher.stop()
        ex.shutdown()
        per_day = backend.bytes / elapsed * 86400
        return per_day, backend.saves, len(backend.load() or b"")


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 15.0
    print(f"{'scenario':<12} {'bytes/day':>16} {'saves':>6} {'snapshot':>9}   ({seconds:.0f} s each, 10 Hz)")
    for name in ("full-quota", "counter", "same-value"):
        per_day, saves, size = scenario(name, seconds)
        print(f"{name:<12} {per_day:>16,.0f} {saves:>6} {size:>9,}   = {per_day / 2**30:.2f} GiB/day")


if __name__ == "__main__":
    main()
