"""Capability ``sensors``: find by name, read the latest value, read batches.

Reads return what the shim already holds (O(1), never waiting on hardware).
A value is written as little-endian f64 into the app's memory, and it is
always finite: a sensor with no sample yet (or a driver reporting NaN)
answers ERR_OFFLINE and writes nothing; ERR_STALE comes with the newest
real value.
"""

from __future__ import annotations

import math
import struct

from firmware_shims.base import Status
from hostfuncs import codes
from hostfuncs.context import AppContext
from hostfuncs.memory import check_range
from hostfuncs.registry import hostfunc

MAX_NAME = 64
MAX_BATCH = 4096
_F64 = struct.Struct("<d")
_STATUS_CODE = {Status.OK: codes.OK, Status.STALE: codes.ERR_STALE, Status.OFFLINE: codes.ERR_OFFLINE}


@hostfunc(
    "sensors",
    "find",
    ("i32", "i32"),
    ("i32",),
    args={"ptr": "address of the sensor's name (UTF-8)", "length": "the name's length in bytes (at most 64)"},
    returns="the sensor's id (>= 0, stable while the app runs); ERR_NOT_FOUND, ERR_TOO_LARGE, "
    "ERR_INVALID (not UTF-8), ERR_BOUNDS",
)
def find(ctx: AppContext, ptr: int, length: int) -> int:
    """Id (>= 0) of the sensor named by the UTF-8 bytes at `ptr`, or ERR_NOT_FOUND."""
    if length & 0xFFFFFFFF > MAX_NAME:
        return codes.ERR_TOO_LARGE
    try:
        name = ctx.memory.read(ptr, length).decode("utf-8")
    except UnicodeDecodeError:
        return codes.ERR_INVALID
    return ctx.sensor_ids.get(name, codes.ERR_NOT_FOUND)


@hostfunc(
    "sensors",
    "read",
    ("i32", "i32"),
    ("i32",),
    args={
        "sensor_id": "an id from `sensors.find` (or 0..count-1)",
        "out_ptr": "address of 8 bytes that receive the value (f64, little-endian, in the sensor's unit)",
    },
    returns="0 (fresh value written); ERR_STALE (the newest value is older than the sensor's "
    "`max_age_ms`: it is still written, and it is always a finite number); ERR_OFFLINE (unreachable, "
    "or no sample yet: nothing written); ERR_NOT_FOUND, ERR_BOUNDS",
)
def read(ctx: AppContext, sensor_id: int, out_ptr: int) -> int:
    """Write the latest value (f64) at `out_ptr`. 0, ERR_STALE (value still written), ERR_OFFLINE (none)."""
    if not 0 <= sensor_id < len(ctx.sensor_list):
        return codes.ERR_NOT_FOUND
    ctx.stats.sensor_reads += 1
    r = ctx.sensor_list[sensor_id].read()
    if r.status == Status.OFFLINE or not math.isfinite(r.value):
        # Never sampled (a stale reading with no value yet) or a driver's
        # NaN: nothing to give. The app never receives a NaN it could write
        # into JSON telemetry.
        return codes.ERR_OFFLINE
    ctx.memory.write(out_ptr, _F64.pack(r.value))
    return _STATUS_CODE[r.status]


@hostfunc(
    "sensors",
    "read_batch",
    ("i32", "i32", "i32"),
    ("i32",),
    args={
        "sensor_id": "an id from `sensors.find`",
        "out_ptr": "address of an array of `max_n` f64 (8 bytes each)",
        "max_n": "the array's capacity as a number of samples, not bytes (0..4096)",
    },
    returns="how many samples were written (0 if none is new); each sample is returned once per "
    "app, oldest first, and samples past `max_n` wait for the next call; ERR_OFFLINE, "
    "ERR_NOT_FOUND, ERR_TOO_LARGE (max_n > 4096), ERR_BOUNDS (checked first: no sample is consumed)",
)
def read_batch(ctx: AppContext, sensor_id: int, out_ptr: int, max_n: int) -> int:
    """Write up to `max` samples not yet returned (f64 each, oldest first); count, or an error."""
    if not 0 <= sensor_id < len(ctx.sensor_list):
        return codes.ERR_NOT_FOUND
    if not 0 <= max_n <= MAX_BATCH:
        return codes.ERR_TOO_LARGE if max_n > MAX_BATCH else codes.ERR_INVALID
    # Check the whole buffer first: a bad pointer must not consume samples.
    check_range(out_ptr, max_n * 8, ctx.memory.size())
    sensor = ctx.sensor_list[sensor_id]
    if sensor.read().status == Status.OFFLINE:
        return codes.ERR_OFFLINE
    values, seq = sensor.samples_since(ctx.sensor_cursor[sensor_id], max_n)
    ctx.stats.sensor_reads += 1
    values = [v for v in values if math.isfinite(v)]  # a driver's NaN is no sample
    if values:
        ctx.memory.write(out_ptr, struct.pack(f"<{len(values)}d", *values))
    ctx.sensor_cursor[sensor_id] = seq
    return len(values)


@hostfunc(
    "sensors",
    "count",
    (),
    ("i32",),
    args={},
    returns="how many sensors the app may read; their ids are 0..count-1",
)
def count(ctx: AppContext) -> int:
    """Number of sensors this app may read (ids are 0..count-1)."""
    return len(ctx.sensor_list)


@hostfunc(
    "sensors",
    "name",
    ("i32", "i32", "i32"),
    ("i32",),
    args={
        "sensor_id": "0..count-1",
        "out_ptr": "address of the buffer that receives the name (UTF-8, not NUL-terminated)",
        "cap": "the buffer's capacity in bytes (names are at most 64)",
    },
    returns="the name's length in bytes; ERR_NOT_FOUND, ERR_BUF_TOO_SMALL (nothing written), ERR_BOUNDS",
)
def name(ctx: AppContext, sensor_id: int, out_ptr: int, cap: int) -> int:
    """Write sensor `id`'s name (UTF-8) at `out_ptr`; its length, or ERR_BUF_TOO_SMALL."""
    if not 0 <= sensor_id < len(ctx.sensor_list):
        return codes.ERR_NOT_FOUND
    data = ctx.sensor_list[sensor_id].name.encode()
    if len(data) > cap & 0xFFFFFFFF:
        return codes.ERR_BUF_TOO_SMALL
    ctx.memory.write(out_ptr, data)
    return len(data)
