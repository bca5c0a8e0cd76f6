// __APP__: a thermostat. Reads "temp", drives "fan" with hysteresis, keeps
// its setpoint in kv, publishes telemetry every 10 ticks.
// Build: ./build.sh    Run: devicerunner app run __APP__.wasm
import { Actuator, Sensor, Status, fixed, info, error, kv, publish } from "./devicerunner";

const HYSTERESIS: f64 = 0.5;
let temp = new Sensor(-1);
let fan = new Actuator(-1);
let setpoint: f64 = 22.0;
let fanOn = false;
let ticks: u32 = 0;
let badReads: u32 = 0;

export function dr_init(): i32 {
  temp = Sensor.find("temp");
  fan = Actuator.find("fan");
  if (!temp.valid || !fan.valid) {
    error("needs sensor 'temp' and actuator 'fan'");
    return 1;
  }
  setpoint = kv.getF64("setpoint", NaN);
  if (isNaN(setpoint)) {
    setpoint = 22.0;
    kv.setF64("setpoint", setpoint);
  }
  info("setpoint " + fixed(setpoint, 1) + " C, hysteresis " + fixed(HYSTERESIS, 1) + " C");
  return 0;
}

export function dr_tick(): i32 {
  ticks++;
  let r = temp.read();
  if (r.status != Status.Ok) {
    // Fail safe: without a fresh reading, run the fan.
    badReads++;
    fanOn = true;
    fan.set(1.0);
    return 0;
  }
  badReads = 0;
  let t = r.value;
  if (!fanOn && t > setpoint + HYSTERESIS) fanOn = true;
  else if (fanOn && t < setpoint - HYSTERESIS) fanOn = false;
  fan.set(fanOn ? 1.0 : 0.0);
  if (ticks % 10 == 0) {
    publish("climate", '{"temp":' + fixed(t, 2) + ',"fan":' + (fanOn ? "1" : "0") + ',"setpoint":' + fixed(setpoint, 1) + "}");
  }
  return 0;
}

export function dr_health(): i32 {
  return badReads >= 50 ? 1 : 0;
}
