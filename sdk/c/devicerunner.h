/* devicerunner App ABI v1 for C and C++ (see docs/abi.md and docs/apps.md).
 *
 * One header, no library: every host function is declared with its import
 * module and name, and a few static inline helpers wrap the common cases
 * (strings from C literals, typed kv values, log lines). Unused helpers cost
 * nothing in the binary.
 *
 * Build as a WASI *reactor* (a command module is refused by the runtime):
 *   clang --target=wasm32-wasi -mexec-model=reactor -O2 \
 *     -Wl,--export=dr_init -Wl,--export=dr_tick -Wl,--export=dr_health \
 *     -Wl,--strip-all -o app.wasm app.c
 *
 * Every host function returns 0 or a count on success and a negative
 * DR_ERR_* code on an expected failure. */
#ifndef DEVICERUNNER_H
#define DEVICERUNNER_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DR_IMPORT(mod, fn) __attribute__((import_module(mod), import_name(fn)))
/* Put before an exported function: DR_EXPORT("dr_tick") int32_t dr_tick(void) { ... } */
#ifdef __cplusplus
#define DR_EXPORT(fn) extern "C" __attribute__((export_name(fn)))
#else
#define DR_EXPORT(fn) __attribute__((export_name(fn)))
#endif

/* Results of host functions (hostfuncs/codes.py). */
typedef enum dr_status {
  DR_OK = 0,
  DR_ERR_NOT_FOUND = -1,     /* unknown name or id, missing kv key */
  DR_ERR_BOUNDS = -2,        /* a (ptr, len) outside linear memory */
  DR_ERR_QUOTA = -3,         /* kv quota would be exceeded; nothing changed */
  DR_ERR_STALE = -4,         /* sensor value older than its max_age_ms (value still written) */
  DR_ERR_OFFLINE = -5,       /* sensor/actuator unreachable, or never sampled; nothing written */
  DR_ERR_RATE_LIMITED = -6,  /* log/telemetry rate limit; message dropped */
  DR_ERR_TOO_LARGE = -7,     /* key, value, name or payload too long */
  DR_ERR_BUF_TOO_SMALL = -8, /* output buffer too small; nothing written */
  DR_ERR_INVALID = -9,       /* malformed argument (bad level, not UTF-8, NaN) */
  DR_ERR_IO = -10,           /* host storage failure */
} dr_status;

typedef enum dr_level { DR_DEBUG = 0, DR_INFO = 1, DR_WARN = 2, DR_ERROR = 3 } dr_level;

/* log: one line of `len` bytes of UTF-8 at `msg` (cut at 1 KiB). */
DR_IMPORT("log", "write") int32_t dr_log_write(int32_t level, const char *msg, int32_t len);

/* clock */
DR_IMPORT("clock", "now_ms") int64_t dr_clock_now_ms(void);             /* ms since the Unix epoch */
DR_IMPORT("clock", "monotonic_us") int64_t dr_clock_monotonic_us(void); /* us, > 0, never goes back */

/* sensors: ids are 0..count-1; values are f64. */
DR_IMPORT("sensors", "find") int32_t dr_sensors_find(const char *name, int32_t name_len);
DR_IMPORT("sensors", "count") int32_t dr_sensors_count(void);
DR_IMPORT("sensors", "name") int32_t dr_sensors_name(int32_t id, char *out, int32_t out_cap);
DR_IMPORT("sensors", "read") int32_t dr_sensors_read(int32_t id, double *out);
/* Up to max_samples (a count of f64, not bytes) unread samples, oldest first; returns the count. */
DR_IMPORT("sensors", "read_batch") int32_t dr_sensors_read_batch(int32_t id, double *out, int32_t max_samples);

/* actuators */
DR_IMPORT("actuators", "find") int32_t dr_actuators_find(const char *name, int32_t name_len);
DR_IMPORT("actuators", "set") int32_t dr_actuators_set(int32_t id, double value);

/* kv: persistent bytes per app. get returns the value's length. */
DR_IMPORT("kv", "get") int32_t dr_kv_get(const char *key, int32_t key_len, void *val, int32_t val_cap);
DR_IMPORT("kv", "set") int32_t dr_kv_set(const char *key, int32_t key_len, const void *val, int32_t val_len);
DR_IMPORT("kv", "delete") int32_t dr_kv_delete(const char *key, int32_t key_len);

/* telemetry: name [A-Za-z0-9_.-]{1,64}, payload up to 4 KiB (usually JSON). */
DR_IMPORT("telemetry", "publish")
int32_t dr_telemetry_publish(const char *name, int32_t name_len, const void *payload, int32_t payload_len);

/* messages (grant "messages"): operators' messages, taken in dr_tick. next
 * returns the payload length and writes the topic after .../in/ with a NUL;
 * DR_ERR_NOT_FOUND: none waiting; DR_ERR_BUF_TOO_SMALL: it stays queued. */
DR_IMPORT("messages", "pending") int32_t dr_messages_pending(void);
DR_IMPORT("messages", "next")
int32_t dr_messages_next(void *payload, int32_t payload_cap, char *topic, int32_t topic_cap);

/* config (grant "config"): the app's signed settings, fixed for this instance
 * (read them in dr_init). get_f64 takes integers and decimal strings ("21.5"). */
DR_IMPORT("config", "version") int64_t dr_config_version(void);
DR_IMPORT("config", "get") int32_t dr_config_get(const char *key, int32_t key_len, void *out, int32_t out_cap);
DR_IMPORT("config", "get_f64") int32_t dr_config_get_f64(const char *key, int32_t key_len, double *out);
DR_IMPORT("config", "read") int32_t dr_config_read(void *out, int32_t out_cap);

/* A string literal as (pointer, length): dr_sensors_find(DR_STR("temp")). */
#define DR_STR(s) (s), (int32_t)(sizeof(s) - 1)

/* ---- helpers ---------------------------------------------------------- */

static inline const char *dr_strerror(int32_t code) {
  switch (code) {
    case DR_OK: return "ok";
    case DR_ERR_NOT_FOUND: return "not found";
    case DR_ERR_BOUNDS: return "out of bounds";
    case DR_ERR_QUOTA: return "quota exceeded";
    case DR_ERR_STALE: return "stale";
    case DR_ERR_OFFLINE: return "offline";
    case DR_ERR_RATE_LIMITED: return "rate limited";
    case DR_ERR_TOO_LARGE: return "too large";
    case DR_ERR_BUF_TOO_SMALL: return "buffer too small";
    case DR_ERR_INVALID: return "invalid argument";
    case DR_ERR_IO: return "host I/O error";
    default: return code >= 0 ? "ok" : "unknown error";
  }
}

/* Log a NUL-terminated string. */
static inline int32_t dr_log(dr_level level, const char *msg) {
  return dr_log_write((int32_t)level, msg, (int32_t)strlen(msg));
}

static inline int32_t dr_sensor(const char *name) { return dr_sensors_find(name, (int32_t)strlen(name)); }
static inline int32_t dr_actuator(const char *name) { return dr_actuators_find(name, (int32_t)strlen(name)); }

/* Typed kv values (little-endian, fixed size). get: DR_OK, DR_ERR_NOT_FOUND,
 * or DR_ERR_INVALID when the stored value has another size. */
static inline int32_t dr_kv_get_f64(const char *key, double *out) {
  double v;
  int32_t n = dr_kv_get(key, (int32_t)strlen(key), &v, (int32_t)sizeof v);
  if (n < 0) return n == DR_ERR_BUF_TOO_SMALL ? DR_ERR_INVALID : n;
  if (n != (int32_t)sizeof v) return DR_ERR_INVALID;
  *out = v;
  return DR_OK;
}
static inline int32_t dr_kv_set_f64(const char *key, double v) {
  return dr_kv_set(key, (int32_t)strlen(key), &v, (int32_t)sizeof v);
}
static inline int32_t dr_kv_get_i64(const char *key, int64_t *out) {
  int64_t v;
  int32_t n = dr_kv_get(key, (int32_t)strlen(key), &v, (int32_t)sizeof v);
  if (n < 0) return n == DR_ERR_BUF_TOO_SMALL ? DR_ERR_INVALID : n;
  if (n != (int32_t)sizeof v) return DR_ERR_INVALID;
  *out = v;
  return DR_OK;
}
static inline int32_t dr_kv_set_i64(const char *key, int64_t v) {
  return dr_kv_set(key, (int32_t)strlen(key), &v, (int32_t)sizeof v);
}

/* Publish a NUL-terminated payload (e.g. JSON) under `name`. */
static inline int32_t dr_publish(const char *name, const char *payload) {
  return dr_telemetry_publish(name, (int32_t)strlen(name), payload, (int32_t)strlen(payload));
}

#ifdef __cplusplus
}
#endif
#endif /* DEVICERUNNER_H */
