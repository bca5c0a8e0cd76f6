//! __APP__: a thermostat. Reads "temp", drives "fan" with hysteresis, keeps
//! its setpoint in kv, publishes telemetry every 10 ticks.
//! Build: ./build.sh (or zig build)    Run: devicerunner app run __APP__.wasm
const dr = @import("devicerunner");

const hysteresis: f64 = 0.5;
var temp: dr.Sensor = undefined;
var fan: dr.Actuator = undefined;
var setpoint: f64 = 22.0;
var fan_on = false;
var ticks: u32 = 0;
var bad_reads: u32 = 0;

fn init() dr.Error!void {
    temp = try dr.Sensor.find("temp");
    fan = try dr.Actuator.find("fan");
    setpoint = dr.kv.getValue(f64, "setpoint") catch blk: {
        try dr.kv.setValue(f64, "setpoint", 22.0);
        break :blk 22.0;
    };
    dr.logf(.info, "setpoint {d:.1} C, hysteresis {d:.1} C", .{ setpoint, hysteresis });
}

fn tick() dr.Error!void {
    ticks += 1;
    const sample = temp.read() catch null;
    if (sample == null or !sample.?.fresh) {
        // Fail safe: without a fresh reading, run the fan.
        bad_reads += 1;
        fan_on = true;
        return fan.set(1.0);
    }
    const t = sample.?.value;
    bad_reads = 0;
    if (!fan_on and t > setpoint + hysteresis) {
        fan_on = true;
    } else if (fan_on and t < setpoint - hysteresis) {
        fan_on = false;
    }
    try fan.set(if (fan_on) 1.0 else 0.0);
    if (ticks % 10 == 0) {
        try dr.publishf("climate", "{{\"temp\":{d:.2},\"fan\":{d},\"setpoint\":{d:.1}}}", .{ t, @intFromBool(fan_on), setpoint });
    }
}

export fn dr_init() i32 {
    init() catch |e| {
        dr.logf(.err, "init failed: {s} (needs sensor 'temp' and actuator 'fan')", .{@errorName(e)});
        return 1;
    };
    return 0;
}

export fn dr_tick() i32 {
    tick() catch |e| return dr.code(e);
    return 0;
}

export fn dr_health() i32 {
    return if (bad_reads >= 50) 1 else 0;
}
