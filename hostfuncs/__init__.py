"""Host functions: one module per capability, declared once in a registry.

Importing this package registers every capability's functions in
``hostfuncs.registry.REGISTRY``; the sandbox's linker and docs/abi.md are
both generated from that one table.
"""

from hostfuncs import actuators, clock, config, kv, log, messages, sensors, telemetry, wasi  # noqa: F401
from hostfuncs.registry import CAPABILITIES, REGISTRY, HostFunc

__all__ = ["CAPABILITIES", "REGISTRY", "HostFunc"]
