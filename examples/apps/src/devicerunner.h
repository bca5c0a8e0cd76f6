/* App ABI v1 imports for C apps (see docs/abi.md). sdk/c/devicerunner.h is the
 * same list with helpers; `devicerunner app new NAME --lang c` starts from it. */
#ifndef DEVICERUNNER_H
#define DEVICERUNNER_H
#include <stdint.h>

#define DR_IMPORT(mod, fn) __attribute__((import_module(mod), import_name(fn)))
#define DR_EXPORT(fn) __attribute__((export_name(fn)))

enum {
  DR_OK = 0, DR_ERR_NOT_FOUND = -1, DR_ERR_BOUNDS = -2, DR_ERR_QUOTA = -3,
  DR_ERR_STALE = -4, DR_ERR_OFFLINE = -5, DR_ERR_RATE_LIMITED = -6,
  DR_ERR_TOO_LARGE = -7, DR_ERR_BUF_TOO_SMALL = -8, DR_ERR_INVALID = -9, DR_ERR_IO = -10,
};

DR_IMPORT("log", "write") int32_t dr_log_write(int32_t level, const char *msg, int32_t len);
DR_IMPORT("clock", "now_ms") int64_t dr_clock_now_ms(void);
DR_IMPORT("clock", "monotonic_us") int64_t dr_clock_monotonic_us(void);
DR_IMPORT("sensors", "find") int32_t dr_sensors_find(const char *name, int32_t len);
DR_IMPORT("sensors", "count") int32_t dr_sensors_count(void);
DR_IMPORT("sensors", "name") int32_t dr_sensors_name(int32_t id, char *out, int32_t cap);
DR_IMPORT("sensors", "read") int32_t dr_sensors_read(int32_t id, double *out);
/* max_samples counts f64 values, not bytes */
DR_IMPORT("sensors", "read_batch") int32_t dr_sensors_read_batch(int32_t id, double *out, int32_t max_samples);
DR_IMPORT("actuators", "find") int32_t dr_actuators_find(const char *name, int32_t len);
DR_IMPORT("actuators", "set") int32_t dr_actuators_set(int32_t id, double value);
DR_IMPORT("kv", "get") int32_t dr_kv_get(const char *key, int32_t klen, void *val, int32_t vcap);
DR_IMPORT("kv", "set") int32_t dr_kv_set(const char *key, int32_t klen, const void *val, int32_t vlen);
DR_IMPORT("kv", "delete") int32_t dr_kv_delete(const char *key, int32_t klen);
DR_IMPORT("messages", "pending") int32_t dr_messages_pending(void);
DR_IMPORT("messages", "next") int32_t dr_messages_next(void *buf, int32_t cap, char *topic, int32_t tcap);
DR_IMPORT("config", "version") int64_t dr_config_version(void);
DR_IMPORT("config", "get") int32_t dr_config_get(const char *key, int32_t klen, void *out, int32_t cap);
DR_IMPORT("config", "get_f64") int32_t dr_config_get_f64(const char *key, int32_t klen, double *out);
DR_IMPORT("config", "read") int32_t dr_config_read(void *out, int32_t cap);
DR_IMPORT("telemetry", "publish") int32_t dr_telemetry_publish(const char *name, int32_t nlen, const void *payload, int32_t plen);

#define DR_STR(s) (s), (int32_t)(sizeof(s) - 1)
#endif
