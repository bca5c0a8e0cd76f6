/* __APP__: a thermostat. Reads "temp", drives "fan" with hysteresis, keeps
 * its setpoint in kv, publishes telemetry every 10 ticks.
 * Build: ./build.sh    Run: devicerunner app run __APP__.wasm */
#include <stdio.h>
#include "devicerunner.h"

static int32_t temp_id = -1, fan_id = -1;
static double setpoint = 22.0;
static const double hysteresis = 0.5;
static int fan_on = 0;
static uint32_t ticks = 0, bad_reads = 0;

DR_EXPORT("dr_init") int32_t dr_init(void) {
  temp_id = dr_sensor("temp");
  fan_id = dr_actuator("fan");
  if (temp_id < 0 || fan_id < 0) {
    dr_log(DR_ERROR, "needs sensor 'temp' and actuator 'fan'");
    return 1;
  }
  if (dr_kv_get_f64("setpoint", &setpoint) != DR_OK) dr_kv_set_f64("setpoint", setpoint);
  char line[64];
  snprintf(line, sizeof line, "setpoint %.1f C, hysteresis %.1f C", setpoint, hysteresis);
  dr_log(DR_INFO, line);
  return 0;
}

DR_EXPORT("dr_tick") int32_t dr_tick(void) {
  ticks++;
  double t;
  int32_t rc = dr_sensors_read(temp_id, &t);
  if (rc == DR_ERR_OFFLINE || rc == DR_ERR_STALE) {
    bad_reads++;
    /* Fail safe: without a fresh reading, run the fan. */
    fan_on = 1;
    dr_actuators_set(fan_id, 1.0);
    return 0;
  }
  if (rc != DR_OK) return rc;
  bad_reads = 0;
  if (!fan_on && t > setpoint + hysteresis) fan_on = 1;
  else if (fan_on && t < setpoint - hysteresis) fan_on = 0;
  dr_actuators_set(fan_id, fan_on ? 1.0 : 0.0);
  if (ticks % 10 == 0) {
    char buf[96];
    snprintf(buf, sizeof buf, "{\"temp\":%.2f,\"fan\":%d,\"setpoint\":%.1f}", t, fan_on, setpoint);
    dr_publish("climate", buf);
  }
  return 0;
}

/* Unhealthy after 50 ticks in a row without a usable reading. */
DR_EXPORT("dr_health") int32_t dr_health(void) { return bad_reads >= 50 ? 1 : 0; }
