// devicerunner App ABI v1 for C++: thin, header-only wrappers over
// devicerunner.h (which declares every import). No exceptions, no RTTI, no
// heap: errors are dr::Status values, as the host returns them.
//
// Build as a WASI reactor; without -mexec-model=reactor every export call
// re-runs static constructors and destructors (and the runtime refuses
// such a module):
//   clang++ --target=wasm32-wasi -mexec-model=reactor -O2 -fno-exceptions \
//     -Wl,--export=dr_init -Wl,--export=dr_tick -Wl,--export=dr_health ...
#pragma once
#include <cstdint>
#include <cstring>
#include <string_view>

#include "devicerunner.h"

namespace dr {

enum class Status : int32_t {
  ok = DR_OK,
  not_found = DR_ERR_NOT_FOUND,
  bounds = DR_ERR_BOUNDS,
  quota = DR_ERR_QUOTA,
  stale = DR_ERR_STALE,
  offline = DR_ERR_OFFLINE,
  rate_limited = DR_ERR_RATE_LIMITED,
  too_large = DR_ERR_TOO_LARGE,
  buf_too_small = DR_ERR_BUF_TOO_SMALL,
  invalid = DR_ERR_INVALID,
  io = DR_ERR_IO,
};

inline Status status(int32_t rc) { return rc >= 0 ? Status::ok : static_cast<Status>(rc); }
inline const char *to_string(Status s) { return dr_strerror(static_cast<int32_t>(s)); }

enum class Level : int32_t { debug = DR_DEBUG, info = DR_INFO, warn = DR_WARN, error = DR_ERROR };

inline int32_t len(std::string_view s) { return static_cast<int32_t>(s.size()); }

inline Status log(Level level, std::string_view msg) {
  return status(dr_log_write(static_cast<int32_t>(level), msg.data(), len(msg)));
}

// A sensor reading: `status` is ok or stale (value valid), or an error (value 0).
struct Reading {
  Status status;
  double value;
  bool usable() const { return status == Status::ok || status == Status::stale; }
};

class Sensor {
 public:
  explicit Sensor(int32_t id = -1) : id_(id) {}
  static Sensor find(std::string_view name) { return Sensor(dr_sensors_find(name.data(), len(name))); }
  bool valid() const { return id_ >= 0; }
  Status error() const { return status(id_); }
  Reading read() const {
    double v = 0.0;
    Status s = status(dr_sensors_read(id_, &v));
    return {s, (s == Status::ok || s == Status::stale) ? v : 0.0};
  }

 private:
  int32_t id_;
};

class Actuator {
 public:
  explicit Actuator(int32_t id = -1) : id_(id) {}
  static Actuator find(std::string_view name) { return Actuator(dr_actuators_find(name.data(), len(name))); }
  bool valid() const { return id_ >= 0; }
  Status error() const { return status(id_); }
  Status set(double value) const { return status(dr_actuators_set(id_, value)); }

 private:
  int32_t id_;
};

namespace kv {
// Typed values: the bytes of T (trivially copyable), little-endian.
template <typename T>
Status get(std::string_view key, T &out) {
  T v;
  int32_t n = dr_kv_get(key.data(), len(key), &v, sizeof v);
  if (n == DR_ERR_BUF_TOO_SMALL || (n >= 0 && n != static_cast<int32_t>(sizeof v))) return Status::invalid;
  if (n < 0) return status(n);
  out = v;
  return Status::ok;
}
template <typename T>
Status set(std::string_view key, const T &v) {
  return status(dr_kv_set(key.data(), len(key), &v, sizeof v));
}
inline Status remove(std::string_view key) { return status(dr_kv_delete(key.data(), len(key))); }
}  // namespace kv

inline Status publish(std::string_view name, std::string_view payload) {
  return status(dr_telemetry_publish(name.data(), len(name), payload.data(), len(payload)));
}

}  // namespace dr
