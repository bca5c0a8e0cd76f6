"""The one table of host functions.

Every host function is declared here once, by the capability module that
implements it, with its Wasm signature. The sandbox's linker defines
exactly the entries whose capability is in an app's grant, and docs/abi.md
is generated from the same table (a test checks they agree).

Invariants:
- ``(module, name)`` is unique; a duplicate registration is a bug and raises.
- An implementation takes ``(ctx, *wasm_args)`` and returns the declared
  results. It must not block (no I/O, no locks held across waits) and must
  treat every pointer as hostile (see ``hostfuncs.memory``).
- This module is pure: it holds data, it never touches the outside world.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ValType = str  # "i32" | "i64" | "f32" | "f64"
_VALID_TYPES = frozenset({"i32", "i64", "f32", "f64"})

CAPABILITIES: dict[str, str] = {
    "log": "log",
    "clock": "clock",
    "sensors": "sensors",
    "actuators": "actuators",
    "kv": "kv",
    "telemetry": "telemetry",
    "wasi": "wasi_snapshot_preview1",
}
"""Capability name -> the Wasm import namespace it unlocks."""

NAMESPACE_TO_CAPABILITY: dict[str, str] = {ns: cap for cap, ns in CAPABILITIES.items()}


@dataclass(frozen=True)
class HostFunc:
    capability: str
    module: str
    name: str
    params: tuple[ValType, ...]
    results: tuple[ValType, ...]
    impl: Callable[..., Any]
    doc: str
    on_bounds: int
    """What the call returns when the app passes an out-of-bounds pointer."""

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    @property
    def signature(self) -> str:
        return f"({', '.join(self.params)}) -> ({', '.join(self.results)})"


REGISTRY: dict[tuple[str, str], HostFunc] = {}


def hostfunc(
    capability: str,
    name: str,
    params: tuple[ValType, ...],
    results: tuple[ValType, ...],
    *,
    on_bounds: int = -2,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``impl`` as ``<namespace of capability>.name``."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}")
    for t in (*params, *results):
        if t not in _VALID_TYPES:
            raise ValueError(f"{capability}.{name}: bad value type {t!r}")
    module = CAPABILITIES[capability]

    def register(impl: Callable[..., Any]) -> Callable[..., Any]:
        key = (module, name)
        if key in REGISTRY:
            raise ValueError(f"host function {module}.{name} registered twice")
        doc = (impl.__doc__ or "").strip().splitlines()
        REGISTRY[key] = HostFunc(
            capability, module, name, params, results, impl, doc[0] if doc else "", on_bounds
        )
        return impl

    return register


def abi_table() -> str:
    """Markdown table of every host function; docs/abi.md embeds it verbatim."""
    lines = [
        "| import | signature | capability | meaning |",
        "|---|---|---|---|",
    ]
    for f in sorted(REGISTRY.values(), key=lambda f: (f.capability, f.name)):
        lines.append(f"| `{f.qualname}` | `{f.signature}` | `{f.capability}` | {f.doc} |")
    return "\n".join(lines)
