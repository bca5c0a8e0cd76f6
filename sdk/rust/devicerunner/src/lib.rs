//! devicerunner App ABI v1 for Rust: safe wrappers over the host imports,
//! `log!`/`info!`/... macros, typed kv and telemetry helpers, and the
//! [`app!`] macro that exports `dr_init`, `dr_tick` and `dr_health` for a
//! type implementing [`App`] and installs a panic hook writing the panic
//! message to the device log (a panic on wasm32-unknown-unknown is
//! otherwise a bare `unreachable` trap).
//!
//! Build for `wasm32-unknown-unknown` as a `cdylib` (see the template's
//! build.sh). No dependencies; works with Rust 1.63 (Debian 12's rustc).

use std::fmt;

mod sys {
    #[link(wasm_import_module = "log")]
    extern "C" {
        #[link_name = "write"]
        pub fn log_write(level: i32, ptr: *const u8, len: i32) -> i32;
    }
    #[link(wasm_import_module = "clock")]
    extern "C" {
        pub fn now_ms() -> i64;
        pub fn monotonic_us() -> i64;
    }
    #[link(wasm_import_module = "sensors")]
    extern "C" {
        #[link_name = "find"]
        pub fn sensors_find(ptr: *const u8, len: i32) -> i32;
        #[link_name = "count"]
        pub fn sensors_count() -> i32;
        #[link_name = "name"]
        pub fn sensors_name(id: i32, out: *mut u8, cap: i32) -> i32;
        #[link_name = "read"]
        pub fn sensors_read(id: i32, out: *mut f64) -> i32;
        #[link_name = "read_batch"]
        pub fn sensors_read_batch(id: i32, out: *mut f64, max_samples: i32) -> i32;
    }
    #[link(wasm_import_module = "actuators")]
    extern "C" {
        #[link_name = "find"]
        pub fn actuators_find(ptr: *const u8, len: i32) -> i32;
        #[link_name = "set"]
        pub fn actuators_set(id: i32, value: f64) -> i32;
    }
    #[link(wasm_import_module = "kv")]
    extern "C" {
        #[link_name = "get"]
        pub fn kv_get(kptr: *const u8, klen: i32, vptr: *mut u8, vcap: i32) -> i32;
        #[link_name = "set"]
        pub fn kv_set(kptr: *const u8, klen: i32, vptr: *const u8, vlen: i32) -> i32;
        #[link_name = "delete"]
        pub fn kv_delete(kptr: *const u8, klen: i32) -> i32;
    }
    #[link(wasm_import_module = "telemetry")]
    extern "C" {
        #[link_name = "publish"]
        pub fn telemetry_publish(nptr: *const u8, nlen: i32, pptr: *const u8, plen: i32) -> i32;
    }
}

/// An expected failure reported by the host (docs/abi.md, "Error codes").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
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
    /// A code this SDK does not know (a newer host).
    Other(i32),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn from_code(code: i32) -> Error {
        match code {
            -1 => Error::NotFound,
            -2 => Error::Bounds,
            -3 => Error::Quota,
            -4 => Error::Stale,
            -5 => Error::Offline,
            -6 => Error::RateLimited,
            -7 => Error::TooLarge,
            -8 => Error::BufTooSmall,
            -9 => Error::Invalid,
            -10 => Error::Io,
            c => Error::Other(c),
        }
    }

    pub fn code(self) -> i32 {
        match self {
            Error::NotFound => -1,
            Error::Bounds => -2,
            Error::Quota => -3,
            Error::Stale => -4,
            Error::Offline => -5,
            Error::RateLimited => -6,
            Error::TooLarge => -7,
            Error::BufTooSmall => -8,
            Error::Invalid => -9,
            Error::Io => -10,
            Error::Other(c) => c,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} ({})", self, self.code())
    }
}

/// A host result: negative is an error, anything else a count or id.
fn check(rc: i32) -> Result<i32> {
    if rc < 0 {
        Err(Error::from_code(rc))
    } else {
        Ok(rc)
    }
}

fn len(s: &[u8]) -> i32 {
    s.len().min(i32::MAX as usize) as i32
}

// -- log --------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Debug = 0,
    Info = 1,
    Warn = 2,
    Error = 3,
}

/// Write one line to the device log (cut at 1 KiB by the host).
pub fn log(level: Level, msg: &str) -> Result<()> {
    check(unsafe { sys::log_write(level as i32, msg.as_ptr(), len(msg.as_bytes())) }).map(|_| ())
}

/// `log!(Level::Info, "temp {:.1}", t)`
#[macro_export]
macro_rules! log {
    ($level:expr, $($arg:tt)+) => {{ let _ = $crate::log($level, &format!($($arg)+)); }};
}
#[macro_export]
macro_rules! debug { ($($arg:tt)+) => { $crate::log!($crate::Level::Debug, $($arg)+) }; }
#[macro_export]
macro_rules! info { ($($arg:tt)+) => { $crate::log!($crate::Level::Info, $($arg)+) }; }
#[macro_export]
macro_rules! warn { ($($arg:tt)+) => { $crate::log!($crate::Level::Warn, $($arg)+) }; }
#[macro_export]
macro_rules! error { ($($arg:tt)+) => { $crate::log!($crate::Level::Error, $($arg)+) }; }

/// Route panics to the device log at error level before the trap. The
/// [`app!`] macro calls this from `dr_init`.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let _ = log(Level::Error, &format!("panic: {}", info));
    }));
}

// -- clock ------------------------------------------------------------------

/// Wall-clock time, milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    unsafe { sys::now_ms() }
}

/// Monotonic microseconds (> 0, never goes back).
pub fn monotonic_us() -> i64 {
    unsafe { sys::monotonic_us() }
}

// -- sensors and actuators --------------------------------------------------

/// A sample: `fresh` is false when the host said ERR_STALE (the value is
/// the newest one it has, older than the sensor's max_age_ms).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub value: f64,
    pub fresh: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sensor(i32);

impl Sensor {
    pub fn find(name: &str) -> Result<Sensor> {
        check(unsafe { sys::sensors_find(name.as_ptr(), len(name.as_bytes())) }).map(Sensor)
    }

    /// Every sensor this app may read.
    pub fn all() -> Vec<Sensor> {
        (0..unsafe { sys::sensors_count() }.max(0))
            .map(Sensor)
            .collect()
    }

    pub fn name(self) -> Result<String> {
        let mut buf = [0u8; 64];
        let n = check(unsafe { sys::sensors_name(self.0, buf.as_mut_ptr(), len(&buf)) })? as usize;
        String::from_utf8(buf[..n].to_vec()).map_err(|_| Error::Invalid)
    }

    /// The newest sample. Err(Offline) when there is none to give.
    pub fn read(self) -> Result<Sample> {
        let mut v = 0.0f64;
        match unsafe { sys::sensors_read(self.0, &mut v) } {
            0 => Ok(Sample {
                value: v,
                fresh: true,
            }),
            -4 => Ok(Sample {
                value: v,
                fresh: false,
            }),
            rc => Err(Error::from_code(rc)),
        }
    }

    /// Samples not yet returned, oldest first, into `out`; how many.
    pub fn read_batch(self, out: &mut [f64]) -> Result<usize> {
        let n = out.len().min(4096) as i32;
        check(unsafe { sys::sensors_read_batch(self.0, out.as_mut_ptr(), n) }).map(|n| n as usize)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Actuator(i32);

impl Actuator {
    pub fn find(name: &str) -> Result<Actuator> {
        check(unsafe { sys::actuators_find(name.as_ptr(), len(name.as_bytes())) }).map(Actuator)
    }

    pub fn set(self, value: f64) -> Result<()> {
        check(unsafe { sys::actuators_set(self.0, value) }).map(|_| ())
    }
}

// -- kv ---------------------------------------------------------------------

pub mod kv {
    use super::{check, len, sys, Error, Result};

    /// Copy the value of `key` into `buf`; its length.
    pub fn get(key: &str, buf: &mut [u8]) -> Result<usize> {
        check(unsafe {
            sys::kv_get(
                key.as_ptr(),
                len(key.as_bytes()),
                buf.as_mut_ptr(),
                len(buf),
            )
        })
        .map(|n| n as usize)
    }

    /// The whole value of `key` (at most 64 KiB).
    pub fn get_vec(key: &str) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; 256];
        loop {
            match get(key, &mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(Error::BufTooSmall) if buf.len() < 64 * 1024 => buf.resize(buf.len() * 4, 0),
                Err(e) => return Err(e),
            }
        }
    }

    pub fn set(key: &str, value: &[u8]) -> Result<()> {
        check(unsafe {
            sys::kv_set(
                key.as_ptr(),
                len(key.as_bytes()),
                value.as_ptr(),
                len(value),
            )
        })
        .map(|_| ())
    }

    pub fn delete(key: &str) -> Result<()> {
        check(unsafe { sys::kv_delete(key.as_ptr(), len(key.as_bytes())) }).map(|_| ())
    }

    fn get8(key: &str) -> Result<[u8; 8]> {
        let mut b = [0u8; 8];
        match get(key, &mut b) {
            Ok(8) => Ok(b),
            Ok(_) | Err(Error::BufTooSmall) => Err(Error::Invalid),
            Err(e) => Err(e),
        }
    }

    /// An f64 stored by `set_f64` (8 bytes, little-endian).
    pub fn get_f64(key: &str) -> Result<f64> {
        get8(key).map(f64::from_le_bytes)
    }

    pub fn set_f64(key: &str, v: f64) -> Result<()> {
        set(key, &v.to_le_bytes())
    }

    pub fn get_i64(key: &str) -> Result<i64> {
        get8(key).map(i64::from_le_bytes)
    }

    pub fn set_i64(key: &str, v: i64) -> Result<()> {
        set(key, &v.to_le_bytes())
    }
}

// -- telemetry --------------------------------------------------------------

pub mod telemetry {
    use super::{check, len, sys, Result};

    /// Queue `payload` (at most 4 KiB) under `name` ([A-Za-z0-9_.-]{1,64}).
    pub fn publish(name: &str, payload: &[u8]) -> Result<()> {
        check(unsafe {
            sys::telemetry_publish(
                name.as_ptr(),
                len(name.as_bytes()),
                payload.as_ptr(),
                len(payload),
            )
        })
        .map(|_| ())
    }

    pub fn publish_str(name: &str, payload: &str) -> Result<()> {
        publish(name, payload.as_bytes())
    }
}

// -- the app ----------------------------------------------------------------

/// An app: built by `init` (dr_init), then `tick` every interval and
/// `healthy` at each health check. An `Err` from `tick` is counted as an
/// error by the host and logged.
pub trait App: Sized {
    fn init() -> Result<Self>;
    fn tick(&mut self) -> Result<()>;
    fn healthy(&self) -> bool {
        true
    }
}

#[doc(hidden)]
pub fn __result_code(r: Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            error!("tick failed: {}", e);
            // A non-zero result counts as an error; keep it negative like the host's codes.
            e.code().min(-1)
        }
    }
}

/// Export `dr_init`, `dr_tick` and `dr_health` for a type implementing [`App`]:
/// `devicerunner::app!(Thermostat);`
#[macro_export]
macro_rules! app {
    ($t:ty) => {
        // Wasm apps are single-threaded: the host never calls two exports at
        // once. Accessed through raw pointers (no reference to a static mut).
        static mut __DR_APP: Option<$t> = None;

        #[no_mangle]
        pub extern "C" fn dr_init() -> i32 {
            $crate::install_panic_hook();
            match <$t as $crate::App>::init() {
                Ok(app) => {
                    unsafe { *::core::ptr::addr_of_mut!(__DR_APP) = Some(app) };
                    0
                }
                Err(e) => {
                    $crate::error!("init failed: {}", e);
                    e.code().min(-1)
                }
            }
        }

        #[no_mangle]
        pub extern "C" fn dr_tick() -> i32 {
            match unsafe { (*::core::ptr::addr_of_mut!(__DR_APP)).as_mut() } {
                Some(app) => $crate::__result_code(<$t as $crate::App>::tick(app)),
                None => 1,
            }
        }

        #[no_mangle]
        pub extern "C" fn dr_health() -> i32 {
            match unsafe { (*::core::ptr::addr_of!(__DR_APP)).as_ref() } {
                Some(app) if <$t as $crate::App>::healthy(app) => 0,
                _ => 1,
            }
        }
    };
}
