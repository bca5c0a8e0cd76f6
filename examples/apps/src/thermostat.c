/* Thermostat: reads "temp", drives "fan" with hysteresis, publishes telemetry
 * every 10 ticks.
 *
 * Setpoint and hysteresis come from the app's signed config (capability
 * `config`: settings "setpoint" and "hysteresis", decimals as strings, e.g.
 * {"setpoint": "21.5", "hysteresis": "0.5"}); without a config it uses the
 * setpoint kept in kv (22.0 C the first time) and 0.5 C. A config it cannot
 * work with (setpoint outside 5..35 C, hysteresis outside 0.1..5 C) makes
 * dr_init fail, so the device's trial rolls that config back.
 *
 * Messages (capability `messages`, topic after .../in/): "fan" with payload
 * "on", "off" or "auto" overrides the fan; "ping" asks for a reply. Replies
 * go out as telemetry "reply".
 * Build: examples/apps/build.sh (clang --target=wasm32-wasi, reactor). */
#include <stdio.h>
#include <string.h>
#include "devicerunner.h"

static int32_t temp_id = -1, fan_id = -1;
static double setpoint = 22.0;
static double hysteresis = 0.5;
static int fan_on = 0;
static int manual = -1; /* -1 auto, 0 forced off, 1 forced on */
static uint32_t ticks = 0, bad_reads = 0;
static double last_temp = 0.0;

static void reply(const char *what) {
  char buf[160];
  int n = snprintf(buf, sizeof buf,
                   "{\"re\":\"%s\",\"temp\":%.2f,\"fan\":%d,\"manual\":%d,\"setpoint\":%.1f,\"config\":%lld}",
                   what, last_temp, fan_on, manual, setpoint, (long long)dr_config_version());
  dr_telemetry_publish(DR_STR("reply"), buf, n);
}

static void handle_messages(void) {
  char payload[64], topic[64];
  /* Bounded: at most 8 per tick; the rest wait for the next tick. */
  for (int i = 0; i < 8; i++) {
    int32_t n = dr_messages_next(payload, sizeof payload - 1, topic, sizeof topic);
    if (n == DR_ERR_BUF_TOO_SMALL) {
      /* Not for us (too long): take it with a bigger buffer and drop it. */
      static char big[4096];
      dr_messages_next(big, sizeof big, topic, sizeof topic);
      reply("too-long");
      continue;
    }
    if (n < 0) return; /* none left */
    payload[n] = 0;
    if (strcmp(topic, "fan") == 0) {
      manual = strcmp(payload, "on") == 0 ? 1 : strcmp(payload, "off") == 0 ? 0 : -1;
      reply("fan");
    } else if (strcmp(topic, "ping") == 0) {
      reply("ping");
    } else {
      reply("unknown-topic");
    }
  }
}

DR_EXPORT("dr_init") int32_t dr_init(void) {
  temp_id = dr_sensors_find(DR_STR("temp"));
  fan_id = dr_actuators_find(DR_STR("fan"));
  if (temp_id < 0 || fan_id < 0) {
    printf("thermostat: needs sensor 'temp' and actuator 'fan' (got %d, %d)\n", temp_id, fan_id);
    return 1;
  }
  double v;
  if (dr_config_get_f64(DR_STR("setpoint"), &v) == DR_OK) {
    setpoint = v;
  } else if (dr_kv_get(DR_STR("setpoint"), &v, sizeof v) == (int32_t)sizeof v) {
    setpoint = v;
  }
  if (dr_config_get_f64(DR_STR("hysteresis"), &v) == DR_OK) hysteresis = v;
  if (!(setpoint >= 5.0 && setpoint <= 35.0) || !(hysteresis >= 0.1 && hysteresis <= 5.0)) {
    printf("thermostat: refusing setpoint %.2f C / hysteresis %.2f C (config v%lld)\n", setpoint, hysteresis,
           (long long)dr_config_version());
    return 2;
  }
  dr_kv_set(DR_STR("setpoint"), &setpoint, sizeof setpoint);
  printf("thermostat: setpoint %.1f C, hysteresis %.1f C (config v%lld)\n", setpoint, hysteresis,
         (long long)dr_config_version());
  return 0;
}

DR_EXPORT("dr_tick") int32_t dr_tick(void) {
  ticks++;
  handle_messages();
  double t;
  int32_t rc = dr_sensors_read(temp_id, &t);
  if (rc == DR_ERR_OFFLINE || rc == DR_ERR_STALE) {
    bad_reads++;
    /* Fail safe: without a fresh reading, run the fan. */
    if (!fan_on) { fan_on = 1; dr_actuators_set(fan_id, 1.0); }
    return 0;
  }
  if (rc != DR_OK) return rc;
  bad_reads = 0;
  last_temp = t;
  if (!fan_on && t > setpoint + hysteresis) {
    fan_on = 1;
  } else if (fan_on && t < setpoint - hysteresis) {
    fan_on = 0;
  }
  dr_actuators_set(fan_id, (manual >= 0 ? manual : fan_on) ? 1.0 : 0.0);
  if (ticks % 10 == 0) {
    char buf[96];
    int n = snprintf(buf, sizeof buf, "{\"temp\":%.2f,\"fan\":%d,\"setpoint\":%.1f}", t, fan_on, setpoint);
    dr_telemetry_publish(DR_STR("climate"), buf, n);
  }
  return 0;
}

DR_EXPORT("dr_health") int32_t dr_health(void) {
  /* Unhealthy after 50 ticks in a row without a usable reading. */
  return bad_reads >= 50 ? 1 : 0;
}
