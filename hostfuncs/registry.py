"""The one table of host functions.

Every host function is declared here once, by the capability module that
implements it, with its Wasm signature. The sandbox's linker defines
exactly the entries whose capability is in an app's grant, and docs/abi.md
is generated from the same table (a test checks they agree).

Invariants:
- ``(module, name)`` is unique; a duplicate registration is a bug and raises.
- Every Wasm parameter is named and explained (``args``, checked against the
  implementation's parameter names) and so is the result (``returns``):
  an app author reads them in docs/abi.md instead of guessing.
- An implementation takes ``(ctx, *wasm_args)`` and returns the declared
  results. It must not block (no I/O, no locks held across waits) and must
  treat every pointer as hostile (see ``hostfuncs.memory``).
- This module is pure: it holds data, it never touches the outside world.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
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
    "messages": "messages",
    "config": "config",
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
    param_names: tuple[str, ...] = ()
    param_docs: tuple[str, ...] = ()
    """Name and meaning (with units) of each parameter, in order."""
    returns: str = ""
    """What the result means: values and error codes."""

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    @property
    def signature(self) -> str:
        return f"({', '.join(self.params)}) -> ({', '.join(self.results)})"

    @property
    def named_signature(self) -> str:
        args = ", ".join(f"{n}: {t}" for n, t in zip(self.param_names, self.params, strict=True))
        return f"{self.qualname}({args}) -> {', '.join(self.results) or '()'}"


REGISTRY: dict[tuple[str, str], HostFunc] = {}


def hostfunc(
    capability: str,
    name: str,
    params: tuple[ValType, ...],
    results: tuple[ValType, ...],
    *,
    args: Mapping[str, str],
    returns: str,
    on_bounds: int = -2,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``impl`` as ``<namespace of capability>.name``.

    ``args`` names and explains every Wasm parameter, in order, with the
    same names as ``impl``'s parameters after ``ctx``; ``returns`` says what
    the result means. docs/abi.md is generated from them, so an app author
    never has to guess which argument is the level or whether a count is
    of bytes or samples."""
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
        names = tuple(inspect.signature(impl).parameters)[1:]  # after ctx
        if len(names) != len(params) or tuple(args) != names:
            raise ValueError(
                f"host function {module}.{name}: args {tuple(args)} must name the parameters "
                f"{names} in order, one per Wasm param {params}"
            )
        if not returns and results:
            raise ValueError(f"host function {module}.{name}: say what it returns")
        doc = (impl.__doc__ or "").strip().splitlines()
        REGISTRY[key] = HostFunc(
            capability,
            module,
            name,
            params,
            results,
            impl,
            doc[0] if doc else "",
            on_bounds,
            names,
            tuple(args.values()),
            returns,
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
        args = ", ".join(f"{n}: {t}" for n, t in zip(f.param_names, f.params, strict=True))
        sig = f"({args}) -> ({', '.join(f.results)})"
        lines.append(f"| [`{f.qualname}`](#{_anchor(f)}) | `{sig}` | `{f.capability}` | {f.doc} |")
    return "\n".join(lines)


def _anchor(f: HostFunc) -> str:
    # GitHub's anchor for a "#### `module.name`" heading: punctuation but _ dropped
    return f"{f.module}{f.name}".lower()


def abi_details() -> str:
    """One section per host function: each parameter's name, type and
    meaning, and what the result means."""
    out: list[str] = []
    for f in sorted(REGISTRY.values(), key=lambda f: (f.capability, f.name)):
        out += [f"#### `{f.qualname}`", ""]
        out += [f"`{f.named_signature}`", "", f.doc, ""]
        if f.param_names:
            out += ["| parameter | type | meaning |", "|---|---|---|"]
            for n, t, d in zip(f.param_names, f.params, f.param_docs, strict=True):
                out.append(f"| `{n}` | `{t}` | {d} |")
            out.append("")
        out += [f"Returns: {f.returns or 'nothing'}", ""]
    return "\n".join(out).rstrip()
