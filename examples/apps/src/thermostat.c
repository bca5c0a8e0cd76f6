/* Thermostat: reads "temp", drives "fan" with hysteresis, keeps its
 * setpoint in kv, publishes telemetry every 10 ticks.
 * Build: examples/apps/build.sh (clang --target=wasm32-wasi, reactor). */
#include <stdio.h>
#include <string.h>
#include "devicerunner.h"

static int32_t temp_id = -1, fan_id = -1;
static double setpoint = 22.0;
static const double hysteresis = 0.5;
static int fan_on = 0;
static uint32_t ticks = 0, bad_reads = 0;
static double last_temp = 0.0;

DR_EXPORT("dr_init") int32_t dr_init(void) {
  temp_id = dr_sensors_find(DR_STR("temp"));
  fan_id = dr_actuators_find(DR_STR("fan"));
  if (temp_id < 0 || fan_id < 0) {
    printf("thermostat: needs sensor 'temp' and actuator 'fan' (got %d, %d)\n", temp_id, fan_id);
    return 1;
  }
  double stored;
  if (dr_kv_get(DR_STR("setpoint"), &stored, sizeof stored) == (int32_t)sizeof stored) {
    setpoint = stored;
  } else {
    dr_kv_set(DR_STR("setpoint"), &setpoint, sizeof setpoint);
  }
  printf("thermostat: setpoint %.1f C, hysteresis %.1f C\n", setpoint, hysteresis);
  return 0;
}

DR_EXPORT("dr_tick") int32_t dr_tick(void) {
  ticks++;
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
  dr_actuators_set(fan_id, fan_on ? 1.0 : 0.0);
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
