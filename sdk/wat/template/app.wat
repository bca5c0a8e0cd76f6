;; __APP__: a thermostat in WebAssembly text. Reads "temp", drives "fan"
;; with hysteresis (setpoint 22.0, +-0.5), keeps the setpoint in kv.
;; Run as is: devicerunner app run app.wat   (./build.sh makes __APP__.wasm)
;; Imports: see docs/abi.md (parameter names, units and codes).
(module
  (import "log" "write" (func $log (param $level i32) (param $ptr i32) (param $length i32) (result i32)))
  (import "sensors" "find" (func $sensor_find (param $ptr i32) (param $length i32) (result i32)))
  (import "sensors" "read" (func $sensor_read (param $sensor_id i32) (param $out_ptr i32) (result i32)))
  (import "actuators" "find" (func $actuator_find (param $ptr i32) (param $length i32) (result i32)))
  (import "actuators" "set" (func $actuator_set (param $actuator_id i32) (param $value f64) (result i32)))
  (import "kv" "get" (func $kv_get (param $kptr i32) (param $klen i32) (param $vptr i32) (param $vcap i32) (result i32)))
  (import "kv" "set" (func $kv_set (param $kptr i32) (param $klen i32) (param $vptr i32) (param $vlen i32) (result i32)))

  (memory (export "memory") 1)
  (data (i32.const 0) "temp")                   ;; 0..4
  (data (i32.const 8) "fan")                    ;; 8..11
  (data (i32.const 16) "setpoint")              ;; 16..24
  (data (i32.const 32) "thermostat started")    ;; 32..50
  (data (i32.const 64) "needs sensor 'temp' and actuator 'fan'") ;; 64..102
  ;; 128: f64 scratch for sensor reads; 136: the setpoint as stored in kv

  (global $temp (mut i32) (i32.const -1))
  (global $fan (mut i32) (i32.const -1))
  (global $setpoint (mut f64) (f64.const 22.0))
  (global $fan_on (mut i32) (i32.const 0))
  (global $bad_reads (mut i32) (i32.const 0))

  (func (export "dr_init") (result i32)
    (global.set $temp (call $sensor_find (i32.const 0) (i32.const 4)))
    (global.set $fan (call $actuator_find (i32.const 8) (i32.const 3)))
    (if (i32.or (i32.lt_s (global.get $temp) (i32.const 0)) (i32.lt_s (global.get $fan) (i32.const 0)))
      (then
        (drop (call $log (i32.const 3) (i32.const 64) (i32.const 38)))
        (return (i32.const 1))))
    ;; kv.get returns the value's length: 8 means a stored f64
    (if (i32.eq (call $kv_get (i32.const 16) (i32.const 8) (i32.const 136) (i32.const 8)) (i32.const 8))
      (then (global.set $setpoint (f64.load (i32.const 136))))
      (else
        (f64.store (i32.const 136) (global.get $setpoint))
        (drop (call $kv_set (i32.const 16) (i32.const 8) (i32.const 136) (i32.const 8)))))
    (drop (call $log (i32.const 1) (i32.const 32) (i32.const 18)))
    (i32.const 0))

  (func (export "dr_tick") (result i32)
    (local $t f64)
    ;; 0 = fresh value; anything else (stale -4, offline -5): fail safe, fan on
    (if (call $sensor_read (global.get $temp) (i32.const 128))
      (then
        (global.set $bad_reads (i32.add (global.get $bad_reads) (i32.const 1)))
        (global.set $fan_on (i32.const 1))
        (drop (call $actuator_set (global.get $fan) (f64.const 1)))
        (return (i32.const 0))))
    (global.set $bad_reads (i32.const 0))
    (local.set $t (f64.load (i32.const 128)))
    (if (f64.gt (local.get $t) (f64.add (global.get $setpoint) (f64.const 0.5)))
      (then (global.set $fan_on (i32.const 1))))
    (if (f64.lt (local.get $t) (f64.sub (global.get $setpoint) (f64.const 0.5)))
      (then (global.set $fan_on (i32.const 0))))
    (drop (call $actuator_set (global.get $fan) (f64.convert_i32_u (global.get $fan_on))))
    (i32.const 0))

  (func (export "dr_health") (result i32)
    (i32.ge_u (global.get $bad_reads) (i32.const 50))))
