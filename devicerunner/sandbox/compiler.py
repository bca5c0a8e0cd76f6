"""Compile a candidate module in a child process, bounded in memory and time.

Compiling is the one step of an update whose cost the module's author
controls before any of the device's run-time limits apply: a signed,
perfectly valid module of a million trivial functions needs ~5 GB and
~25 s to compile. Done inside the daemon, that aborts it (and every app
with it) on a small device, at every restart. So a candidate is compiled
here, in a child process that caps its own address space (RLIMIT_AS) and
CPU time (RLIMIT_CPU) before it reads the module, and that the parent
kills at a wall-clock deadline. The child writes the serialized artifact
to stdout; the parent keeps it in its HMAC-protected compile cache and
deserializes it (devicerunner.sandbox).

This module owns the engine configuration (every setting that changes
compiled code), so the child and the daemon build identical engines: a
serialized module is only accepted by an engine with the same settings.
It imports nothing of the project, so the child starts in ~0.1 s.

Child protocol: ``python -m devicerunner.sandbox.compiler MEMORY_BYTES CPU_S``;
stdin: the module; stdout: 4-byte big-endian length, JSON metadata
(imports and exports), serialized module; exit 0. An invalid module exits
``EXIT_INVALID`` with the reason on stderr. Running out of memory aborts
the child (SIGABRT from wasmtime's allocator, or ``EXIT_NO_MEMORY`` from
Python's), running out of CPU kills it (SIGXCPU, then SIGKILL).
"""

from __future__ import annotations

import ctypes
import json
import resource
import signal
import sys
from typing import Any

import wasmtime

ENGINE_CONFIG = "epoch=1;opt=speed;may_move=0;v3"
"""Every engine setting that changes compiled code; part of the cache key."""
EXIT_INVALID = 3
EXIT_NO_MEMORY = 4
PR_SET_PDEATHSIG = 1


def engine_config() -> wasmtime.Config:
    cfg = wasmtime.Config()
    cfg.epoch_interruption = True
    cfg.cranelift_opt_level = "speed"
    # Linear memory never moves (it is reserved up front), so the fast
    # path may cache its base address; growth past the reservation fails.
    cfg.memory_may_move = False
    return cfg


def _kind(t: Any) -> tuple[str, list[str], list[str]]:
    if isinstance(t, wasmtime.FuncType):
        return "func", [str(x) for x in t.params], [str(x) for x in t.results]
    if isinstance(t, wasmtime.MemoryType):
        return "memory", [], []
    if isinstance(t, wasmtime.TableType):
        return "table", [], []
    return "global", [], []


def memory_pages(module: wasmtime.Module) -> int:
    """Initial size, in 64 KiB pages, of the exported memory (0 if none)."""
    for e in module.exports:
        if e.name == "memory" and isinstance(e.type, wasmtime.MemoryType):
            return int(e.type.limits.min)
    return 0


def describe(module: wasmtime.Module) -> dict[str, Any]:
    return {
        "imports": [[i.module, i.name or "", *_kind(i.type)] for i in module.imports],
        "exports": {e.name: list(_kind(e.type)) for e in module.exports},
        "memory_pages": memory_pages(module),
    }


def pack(meta: dict[str, Any], serialized: bytes) -> bytes:
    header = json.dumps(meta).encode()
    return len(header).to_bytes(4, "big") + header + serialized


def unpack(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """Raises ValueError on a payload that is not ``pack``'s output."""
    if len(payload) < 4:
        raise ValueError("compiled payload truncated")
    n = int.from_bytes(payload[:4], "big")
    if n > len(payload) - 4:
        raise ValueError("compiled payload header overruns it")
    meta = json.loads(payload[4 : 4 + n])
    if not isinstance(meta, dict):
        raise ValueError("compiled payload header is not an object")
    return meta, payload[4 + n :]


def _die_with_parent() -> None:
    """A daemon killed mid-compile must not leave its compiler running."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    _die_with_parent()
    memory_bytes, cpu_s = int(argv[0]), int(argv[1])
    engine = wasmtime.Engine(engine_config())
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    try:
        wasm = sys.stdin.buffer.read()
        try:
            module = wasmtime.Module(engine, wasm)
        except wasmtime.WasmtimeError as e:
            text = str(e).strip()
            sys.stderr.write(text.splitlines()[0] if text else type(e).__name__)
            return EXIT_INVALID
        out = pack(describe(module), bytes(module.serialize()))
    except MemoryError:
        return EXIT_NO_MEMORY
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
