//! __APP__: a thermostat. Reads "temp", drives "fan" with hysteresis, keeps
//! its setpoint in kv, publishes telemetry every 10 ticks.
//! Build: ./build.sh    Run: devicerunner app run __APP__.wasm
use devicerunner::{info, kv, telemetry, Actuator, App, Result, Sensor};

const HYSTERESIS: f64 = 0.5;

struct Thermostat {
    temp: Sensor,
    fan: Actuator,
    setpoint: f64,
    fan_on: bool,
    ticks: u32,
    bad_reads: u32,
}

impl App for Thermostat {
    fn init() -> Result<Self> {
        let temp = Sensor::find("temp")?;
        let fan = Actuator::find("fan")?;
        let setpoint = match kv::get_f64("setpoint") {
            Ok(v) => v,
            Err(_) => {
                kv::set_f64("setpoint", 22.0)?;
                22.0
            }
        };
        info!("setpoint {:.1} C, hysteresis {:.1} C", setpoint, HYSTERESIS);
        Ok(Thermostat {
            temp,
            fan,
            setpoint,
            fan_on: false,
            ticks: 0,
            bad_reads: 0,
        })
    }

    fn tick(&mut self) -> Result<()> {
        self.ticks += 1;
        let t = match self.temp.read() {
            Ok(s) if s.fresh => s.value,
            _ => {
                // Fail safe: without a fresh reading, run the fan.
                self.bad_reads += 1;
                self.fan_on = true;
                return self.fan.set(1.0);
            }
        };
        self.bad_reads = 0;
        if !self.fan_on && t > self.setpoint + HYSTERESIS {
            self.fan_on = true;
        } else if self.fan_on && t < self.setpoint - HYSTERESIS {
            self.fan_on = false;
        }
        self.fan.set(if self.fan_on { 1.0 } else { 0.0 })?;
        if self.ticks % 10 == 0 {
            let json = format!(
                "{{\"temp\":{:.2},\"fan\":{},\"setpoint\":{:.1}}}",
                t, self.fan_on as u8, self.setpoint
            );
            telemetry::publish_str("climate", &json)?;
        }
        Ok(())
    }

    fn healthy(&self) -> bool {
        self.bad_reads < 50
    }
}

devicerunner::app!(Thermostat);
