// __APP__: a thermostat. Reads "temp", drives "fan" with hysteresis, keeps
// its setpoint in kv, publishes telemetry every 10 ticks.
// Build: ./build.sh    Run: devicerunner app run __APP__.wasm
package main

import (
	"fmt"

	dr "__APP__/devicerunner"
)

const hysteresis = 0.5

var (
	temp     dr.Sensor
	fan      dr.Actuator
	setpoint = 22.0
	fanOn    bool
	ticks    uint32
	badReads uint32
)

func setup() error {
	var err error
	if temp, err = dr.FindSensor("temp"); err != nil {
		return err
	}
	if fan, err = dr.FindActuator("fan"); err != nil {
		return err
	}
	if v, err := dr.KvGetFloat64("setpoint"); err == nil {
		setpoint = v
	} else if err := dr.KvSetFloat64("setpoint", setpoint); err != nil {
		return err
	}
	dr.Logf(dr.Info, "setpoint %.1f C, hysteresis %.1f C", setpoint, hysteresis)
	return nil
}

func tick() error {
	ticks++
	s, err := temp.Read()
	if err != nil || !s.Fresh {
		// Fail safe: without a fresh reading, run the fan.
		badReads++
		fanOn = true
		return fan.Set(1)
	}
	badReads = 0
	if !fanOn && s.Value > setpoint+hysteresis {
		fanOn = true
	} else if fanOn && s.Value < setpoint-hysteresis {
		fanOn = false
	}
	on := 0.0
	if fanOn {
		on = 1
	}
	if err := fan.Set(on); err != nil {
		return err
	}
	if ticks%10 == 0 {
		json := fmt.Sprintf(`{"temp":%.2f,"fan":%d,"setpoint":%.1f}`, s.Value, int(on), setpoint)
		return dr.PublishString("climate", json)
	}
	return nil
}

//go:wasmexport dr_init
func drInit() int32 {
	if err := setup(); err != nil {
		dr.Logf(dr.ErrorLevel, "init failed: %v (needs sensor 'temp' and actuator 'fan')", err)
		return 1
	}
	return 0
}

//go:wasmexport dr_tick
func drTick() int32 { return dr.Code(tick()) }

//go:wasmexport dr_health
func drHealth() int32 {
	if badReads >= 50 {
		return 1
	}
	return 0
}

// main is not called in a reactor (-buildmode=c-shared); Go requires it.
func main() {}
