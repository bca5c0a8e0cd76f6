//! devicerunner App ABI v1 for Zig: the host imports, errors as an error set,
//! typed kv and telemetry helpers. No allocator needed; no libc, no WASI.
//!
//! Build for wasm32-freestanding with no entry point and the three exports
//! (see build.zig / build.sh): freestanding avoids the WASI target's 16 MiB
//! default stack (257 initial pages, over the default memory limit).
const std = @import("std");

const sys = struct {
    extern "log" fn write(level: i32, ptr: [*]const u8, len: usize) i32;
    extern "clock" fn now_ms() i64;
    extern "clock" fn monotonic_us() i64;
    extern "sensors" fn find(ptr: [*]const u8, len: usize) i32;
    extern "sensors" fn count() i32;
    extern "sensors" fn name(id: i32, out: [*]u8, cap: usize) i32;
    extern "sensors" fn read(id: i32, out: *f64) i32;
    extern "sensors" fn read_batch(id: i32, out: [*]f64, max_samples: usize) i32;
    const act = struct {
        extern "actuators" fn find(ptr: [*]const u8, len: usize) i32;
        extern "actuators" fn set(id: i32, value: f64) i32;
    };
    const kv = struct {
        extern "kv" fn get(kptr: [*]const u8, klen: usize, vptr: [*]u8, vcap: usize) i32;
        extern "kv" fn set(kptr: [*]const u8, klen: usize, vptr: [*]const u8, vlen: usize) i32;
        extern "kv" fn delete(kptr: [*]const u8, klen: usize) i32;
    };
    extern "telemetry" fn publish(nptr: [*]const u8, nlen: usize, pptr: [*]const u8, plen: usize) i32;
};

/// Expected failures reported by the host (docs/abi.md, "Error codes").
pub const Error = error{
    NotFound,
    Bounds,
    Quota,
    Stale,
    Offline,
    RateLimited,
    TooLarge,
    BufTooSmall,
    Invalid,
    Io,
    Unknown,
};

pub fn errorFromCode(rc: i32) Error {
    return switch (rc) {
        -1 => error.NotFound,
        -2 => error.Bounds,
        -3 => error.Quota,
        -4 => error.Stale,
        -5 => error.Offline,
        -6 => error.RateLimited,
        -7 => error.TooLarge,
        -8 => error.BufTooSmall,
        -9 => error.Invalid,
        -10 => error.Io,
        else => error.Unknown,
    };
}

/// The host's code for `err` (negative), to return from dr_tick.
pub fn code(err: anyerror) i32 {
    return switch (err) {
        error.NotFound => -1,
        error.Bounds => -2,
        error.Quota => -3,
        error.Stale => -4,
        error.Offline => -5,
        error.RateLimited => -6,
        error.TooLarge => -7,
        error.BufTooSmall => -8,
        error.Invalid => -9,
        error.Io => -10,
        else => -100,
    };
}

fn check(rc: i32) Error!u32 {
    if (rc < 0) return errorFromCode(rc);
    return @intCast(rc);
}

// -- log ------------------------------------------------------------------------

pub const Level = enum(i32) { debug = 0, info = 1, warn = 2, err = 3 };

pub fn log(level: Level, msg: []const u8) void {
    _ = sys.write(@backingInt(level), msg.ptr, msg.len);
}

/// Format into a 1 KiB stack buffer (longer lines are cut) and log.
pub fn logf(level: Level, comptime fmt: []const u8, args: anytype) void {
    var buf: [1024]u8 = undefined;
    const line = std.fmt.bufPrint(&buf, fmt, args) catch buf[0..];
    log(level, line);
}

// -- clock ----------------------------------------------------------------------

pub fn nowMs() i64 {
    return sys.now_ms();
}

pub fn monotonicUs() i64 {
    return sys.monotonic_us();
}

// -- sensors and actuators -----------------------------------------------------

/// A sample; `fresh` is false when the host said ERR_STALE (value still valid).
pub const Sample = struct { value: f64, fresh: bool };

pub const Sensor = struct {
    id: i32,

    pub fn find(sensor_name: []const u8) Error!Sensor {
        return .{ .id = @intCast(try check(sys.find(sensor_name.ptr, sensor_name.len))) };
    }

    pub fn count() u32 {
        return @intCast(@max(sys.count(), 0));
    }

    pub fn name(self: Sensor, out: []u8) Error![]u8 {
        const n = try check(sys.name(self.id, out.ptr, out.len));
        return out[0..n];
    }

    pub fn read(self: Sensor) Error!Sample {
        var v: f64 = 0;
        const rc = sys.read(self.id, &v);
        if (rc == 0) return .{ .value = v, .fresh = true };
        if (rc == -4) return .{ .value = v, .fresh = false };
        return errorFromCode(rc);
    }

    /// Unread samples, oldest first; the filled part of `out`.
    pub fn readBatch(self: Sensor, out: []f64) Error![]f64 {
        const n = try check(sys.read_batch(self.id, out.ptr, @min(out.len, 4096)));
        return out[0..n];
    }
};

pub const Actuator = struct {
    id: i32,

    pub fn find(actuator_name: []const u8) Error!Actuator {
        return .{ .id = @intCast(try check(sys.act.find(actuator_name.ptr, actuator_name.len))) };
    }

    pub fn set(self: Actuator, value: f64) Error!void {
        _ = try check(sys.act.set(self.id, value));
    }
};

// -- kv ---------------------------------------------------------------------------

pub const kv = struct {
    /// The value of `key` copied into `out`; the filled part.
    pub fn get(key: []const u8, out: []u8) Error![]u8 {
        const n = try check(sys.kv.get(key.ptr, key.len, out.ptr, out.len));
        return out[0..n];
    }

    pub fn set(key: []const u8, value: []const u8) Error!void {
        _ = try check(sys.kv.set(key.ptr, key.len, value.ptr, value.len));
    }

    pub fn delete(key: []const u8) Error!void {
        _ = try check(sys.kv.delete(key.ptr, key.len));
    }

    /// A number stored by `setValue` (its bytes, little-endian).
    pub fn getValue(comptime T: type, key: []const u8) Error!T {
        var bytes: [@sizeOf(T)]u8 = undefined;
        const got = get(key, &bytes) catch |e| return if (e == error.BufTooSmall) error.Invalid else e;
        if (got.len != bytes.len) return error.Invalid;
        return @bitCast(bytes);
    }

    pub fn setValue(comptime T: type, key: []const u8, v: T) Error!void {
        const bytes: [@sizeOf(T)]u8 = @bitCast(v);
        return set(key, &bytes);
    }
};

// -- telemetry ------------------------------------------------------------------

/// Queue `payload` (at most 4 KiB) under `name` ([A-Za-z0-9_.-]{1,64}).
pub fn publish(name: []const u8, payload: []const u8) Error!void {
    _ = try check(sys.publish(name.ptr, name.len, payload.ptr, payload.len));
}

/// Format the payload into a 4 KiB stack buffer and publish it.
pub fn publishf(name: []const u8, comptime fmt: []const u8, args: anytype) Error!void {
    var buf: [4096]u8 = undefined;
    const payload = std.fmt.bufPrint(&buf, fmt, args) catch return error.TooLarge;
    return publish(name, payload);
}
