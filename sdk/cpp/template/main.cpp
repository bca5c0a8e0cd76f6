// __APP__: a thermostat. Reads "temp", drives "fan" with hysteresis, keeps
// its setpoint in kv, publishes telemetry every 10 ticks.
// Build: ./build.sh    Run: devicerunner app run __APP__.wasm
#include <cstdio>

#include "devicerunner.hpp"

namespace {

class Thermostat {
 public:
  int32_t init() {
    temp_ = dr::Sensor::find("temp");
    fan_ = dr::Actuator::find("fan");
    if (!temp_.valid() || !fan_.valid()) {
      dr::log(dr::Level::error, "needs sensor 'temp' and actuator 'fan'");
      return 1;
    }
    if (dr::kv::get("setpoint", setpoint_) != dr::Status::ok) dr::kv::set("setpoint", setpoint_);
    char line[64];
    std::snprintf(line, sizeof line, "setpoint %.1f C, hysteresis %.1f C", setpoint_, kHysteresis);
    dr::log(dr::Level::info, line);
    return 0;
  }

  int32_t tick() {
    ++ticks_;
    dr::Reading r = temp_.read();
    if (r.status != dr::Status::ok) {
      ++bad_reads_;
      fan_on_ = true;  // fail safe: without a fresh reading, run the fan
      fan_.set(1.0);
      return 0;
    }
    bad_reads_ = 0;
    if (!fan_on_ && r.value > setpoint_ + kHysteresis) fan_on_ = true;
    else if (fan_on_ && r.value < setpoint_ - kHysteresis) fan_on_ = false;
    fan_.set(fan_on_ ? 1.0 : 0.0);
    if (ticks_ % 10 == 0) {
      char buf[96];
      int n = std::snprintf(buf, sizeof buf, "{\"temp\":%.2f,\"fan\":%d,\"setpoint\":%.1f}", r.value,
                            fan_on_ ? 1 : 0, setpoint_);
      dr::publish("climate", std::string_view(buf, static_cast<size_t>(n)));
    }
    return 0;
  }

  int32_t health() const { return bad_reads_ >= 50 ? 1 : 0; }

 private:
  static constexpr double kHysteresis = 0.5;
  dr::Sensor temp_;
  dr::Actuator fan_;
  double setpoint_ = 22.0;
  bool fan_on_ = false;
  uint32_t ticks_ = 0, bad_reads_ = 0;
};

Thermostat app;  // constructed once, by _initialize (reactor)

}  // namespace

DR_EXPORT("dr_init") int32_t dr_init() { return app.init(); }
DR_EXPORT("dr_tick") int32_t dr_tick() { return app.tick(); }
DR_EXPORT("dr_health") int32_t dr_health() { return app.health(); }
