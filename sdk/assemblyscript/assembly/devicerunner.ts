// devicerunner App ABI v1 for AssemblyScript: @external declarations of every
// host import, UTF-8 helpers (AssemblyScript strings are UTF-16), typed kv and
// telemetry helpers, and an abort handler that writes the message to the
// device log before trapping.
//
// The abort handler replaces AssemblyScript's default `env.abort` import
// (which the device does not provide): build with
//   asc assembly/index.ts --use abort=assembly/devicerunner/abortHandler ...
// as the template's asconfig.json does.

// -- raw imports --------------------------------------------------------------

@external("log", "write") declare function log_write(level: i32, ptr: usize, len: i32): i32;
@external("clock", "now_ms") declare function clock_now_ms(): i64;
@external("clock", "monotonic_us") declare function clock_monotonic_us(): i64;
@external("sensors", "find") declare function sensors_find(ptr: usize, len: i32): i32;
@external("sensors", "count") declare function sensors_count(): i32;
@external("sensors", "name") declare function sensors_name(id: i32, out: usize, cap: i32): i32;
@external("sensors", "read") declare function sensors_read(id: i32, out: usize): i32;
@external("sensors", "read_batch") declare function sensors_read_batch(id: i32, out: usize, maxSamples: i32): i32;
@external("actuators", "find") declare function actuators_find(ptr: usize, len: i32): i32;
@external("actuators", "set") declare function actuators_set(id: i32, value: f64): i32;
@external("kv", "get") declare function kv_get(kptr: usize, klen: i32, vptr: usize, vcap: i32): i32;
@external("kv", "set") declare function kv_set(kptr: usize, klen: i32, vptr: usize, vlen: i32): i32;
@external("kv", "delete") declare function kv_delete(kptr: usize, klen: i32): i32;
@external("telemetry", "publish") declare function telemetry_publish(nptr: usize, nlen: i32, pptr: usize, plen: i32): i32;

// -- status codes ---------------------------------------------------------------

/** What host functions return (docs/abi.md, "Error codes"). */
export enum Status {
  Ok = 0,
  NotFound = -1,
  Bounds = -2,
  Quota = -3,
  Stale = -4,
  Offline = -5,
  RateLimited = -6,
  TooLarge = -7,
  BufTooSmall = -8,
  Invalid = -9,
  Io = -10,
}

export enum Level { Debug = 0, Info = 1, Warn = 2, Error = 3 }

// -- UTF-8 --------------------------------------------------------------------

/** A string as UTF-8 bytes, ready to pass as (ptr, len). */
export class Utf8 {
  readonly buf: ArrayBuffer;
  constructor(s: string) { this.buf = String.UTF8.encode(s); }
  get ptr(): usize { return changetype<usize>(this.buf); }
  get len(): i32 { return this.buf.byteLength; }
}

export function utf8(s: string): Utf8 { return new Utf8(s); }

export function fromUtf8(ptr: usize, len: i32): string { return String.UTF8.decodeUnsafe(ptr, <usize>len); }

/** `v` with `digits` decimals (AssemblyScript has no toFixed). */
export function fixed(v: f64, digits: i32 = 2): string {
  if (!isFinite(v)) return "null"; // JSON has no NaN/Infinity
  let scale = Math.pow(10, <f64>digits);
  let n = Math.round(Math.abs(v) * scale);
  let whole = <i64>Math.floor(n / scale);
  let frac = <i64>(n - <f64>whole * scale);
  let s = (v < 0 && n != 0 ? "-" : "") + whole.toString();
  if (digits > 0) s += "." + frac.toString().padStart(digits, "0");
  return s;
}

// -- log ------------------------------------------------------------------------

export function log(level: Level, msg: string): Status {
  let b = utf8(msg);
  return <Status>log_write(<i32>level, b.ptr, b.len);
}
export function debug(msg: string): Status { return log(Level.Debug, msg); }
export function info(msg: string): Status { return log(Level.Info, msg); }
export function warn(msg: string): Status { return log(Level.Warn, msg); }
export function error(msg: string): Status { return log(Level.Error, msg); }

/** Replaces AssemblyScript's `env.abort`: log where and why, then trap. */
export function abortHandler(message: string | null, fileName: string | null, line: u32, column: u32): void {
  let m = message !== null ? message : "abort";
  let f = fileName !== null ? fileName : "?";
  log(Level.Error, "abort: " + m + " at " + f + ":" + line.toString() + ":" + column.toString());
  unreachable();
}

// -- clock ----------------------------------------------------------------------

export function nowMs(): i64 { return clock_now_ms(); }
export function monotonicUs(): i64 { return clock_monotonic_us(); }

// -- sensors and actuators -----------------------------------------------------

const scratch = memory.data(8);

/** A read: `status` is Ok or Stale (value valid), or an error (value 0). */
export class Reading {
  constructor(public status: Status, public value: f64) {}
  get fresh(): bool { return this.status == Status.Ok; }
}

export class Sensor {
  constructor(public readonly id: i32) {}
  static find(name: string): Sensor { let b = utf8(name); return new Sensor(sensors_find(b.ptr, b.len)); }
  static count(): i32 { return sensors_count(); }
  get valid(): bool { return this.id >= 0; }
  name(): string {
    let buf = new ArrayBuffer(64);
    let n = sensors_name(this.id, changetype<usize>(buf), 64);
    return n < 0 ? "" : fromUtf8(changetype<usize>(buf), n);
  }
  read(): Reading {
    let rc = sensors_read(this.id, scratch);
    let ok = rc == Status.Ok || rc == Status.Stale;
    return new Reading(<Status>rc, ok ? load<f64>(scratch) : 0.0);
  }
  /** Unread samples, oldest first, into `out`; their count or a negative Status. */
  readBatch(out: Float64Array): i32 {
    return sensors_read_batch(this.id, out.dataStart, min(out.length, 4096));
  }
}

export class Actuator {
  constructor(public readonly id: i32) {}
  static find(name: string): Actuator { let b = utf8(name); return new Actuator(actuators_find(b.ptr, b.len)); }
  get valid(): bool { return this.id >= 0; }
  set(value: f64): Status { return <Status>actuators_set(this.id, value); }
}

// -- kv ---------------------------------------------------------------------------

export namespace kv {
  /** Copy the value of `key` into `out`; its length or a negative Status. */
  export function get(key: string, out: ArrayBuffer): i32 {
    let k = utf8(key);
    return kv_get(k.ptr, k.len, changetype<usize>(out), out.byteLength);
  }
  export function set(key: string, value: ArrayBuffer): Status {
    let k = utf8(key);
    return <Status>kv_set(k.ptr, k.len, changetype<usize>(value), value.byteLength);
  }
  export function remove(key: string): Status { let k = utf8(key); return <Status>kv_delete(k.ptr, k.len); }
  export function getString(key: string): string | null {
    let buf = new ArrayBuffer(1024);
    let n = get(key, buf);
    return n < 0 ? null : fromUtf8(changetype<usize>(buf), n);
  }
  export function setString(key: string, value: string): Status { return set(key, String.UTF8.encode(value)); }
  /** An f64 stored by setF64 (8 bytes little-endian), or `fallback`. */
  export function getF64(key: string, fallback: f64): f64 {
    let k = utf8(key);
    return kv_get(k.ptr, k.len, scratch, 8) == 8 ? load<f64>(scratch) : fallback;
  }
  export function setF64(key: string, v: f64): Status {
    let k = utf8(key);
    store<f64>(scratch, v);
    return <Status>kv_set(k.ptr, k.len, scratch, 8);
  }
  export function getI64(key: string, fallback: i64): i64 {
    let k = utf8(key);
    return kv_get(k.ptr, k.len, scratch, 8) == 8 ? load<i64>(scratch) : fallback;
  }
  export function setI64(key: string, v: i64): Status {
    let k = utf8(key);
    store<i64>(scratch, v);
    return <Status>kv_set(k.ptr, k.len, scratch, 8);
  }
}

// -- telemetry ------------------------------------------------------------------

/** Queue `payload` (UTF-8, at most 4 KiB) under `name` ([A-Za-z0-9_.-]{1,64}). */
export function publish(name: string, payload: string): Status {
  let n = utf8(name);
  let p = utf8(payload);
  return <Status>telemetry_publish(n.ptr, n.len, p.ptr, p.len);
}
