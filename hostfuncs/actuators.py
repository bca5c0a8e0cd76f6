"""Capability ``actuators``: find by name, set a value (f64)."""

from __future__ import annotations

import math

from firmware_shims.base import Status
from hostfuncs import codes
from hostfuncs.context import AppContext
from hostfuncs.registry import hostfunc

MAX_NAME = 64


@hostfunc(
    "actuators",
    "find",
    ("i32", "i32"),
    ("i32",),
    args={
        "ptr": "address of the actuator's name (UTF-8)",
        "length": "the name's length in bytes (at most 64)",
    },
    returns="the actuator's id (>= 0, stable while the app runs); ERR_NOT_FOUND, ERR_TOO_LARGE, "
    "ERR_INVALID (not UTF-8), ERR_BOUNDS",
)
def find(ctx: AppContext, ptr: int, length: int) -> int:
    """Id (>= 0) of the actuator named by the UTF-8 bytes at `ptr`, or ERR_NOT_FOUND."""
    if length & 0xFFFFFFFF > MAX_NAME:
        return codes.ERR_TOO_LARGE
    try:
        name = ctx.memory.read(ptr, length).decode("utf-8")
    except UnicodeDecodeError:
        return codes.ERR_INVALID
    return ctx.actuator_ids.get(name, codes.ERR_NOT_FOUND)


@hostfunc(
    "actuators",
    "set",
    ("i32", "f64"),
    ("i32",),
    args={
        "actuator_id": "an id from `actuators.find`",
        "value": "the target value, in the actuator's unit (e.g. 0.0 off / 1.0 on for a relay); finite",
    },
    returns="0 (the driver queued the write); ERR_NOT_FOUND (bad id), ERR_INVALID (NaN or infinite), "
    "ERR_OFFLINE",
)
def set_(ctx: AppContext, actuator_id: int, value: float) -> int:
    """Drive actuator `id` to `value`. 0, ERR_INVALID for NaN/inf, ERR_OFFLINE."""
    if not 0 <= actuator_id < len(ctx.actuator_list):
        return codes.ERR_NOT_FOUND
    if not math.isfinite(value):
        return codes.ERR_INVALID
    status = ctx.actuator_list[actuator_id].set(value)
    return codes.OK if status == Status.OK else codes.ERR_OFFLINE
