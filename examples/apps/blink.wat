;; blink: toggles the "led" actuator every tick and logs every 10th tick.
;; Runs as-is: devicerunner app run examples/apps/blink.wat --ticks 20
(module
  (import "log" "write" (func $log (param i32 i32 i32) (result i32)))
  (import "actuators" "find" (func $afind (param i32 i32) (result i32)))
  (import "actuators" "set" (func $aset (param i32 f64) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "led")
  (data (i32.const 16) "blink: 10 more ticks")
  (global $led (mut i32) (i32.const -1))
  (global $on (mut i32) (i32.const 0))
  (global $ticks (mut i32) (i32.const 0))
  (func (export "dr_init") (result i32)
    (global.set $led (call $afind (i32.const 0) (i32.const 3)))
    ;; 0 when the led exists, 1 (init failed) when it does not
    (i32.lt_s (global.get $led) (i32.const 0)))
  (func (export "dr_tick") (result i32)
    (global.set $on (i32.xor (global.get $on) (i32.const 1)))
    (drop (call $aset (global.get $led) (f64.convert_i32_u (global.get $on))))
    (global.set $ticks (i32.add (global.get $ticks) (i32.const 1)))
    (if (i32.eqz (i32.rem_u (global.get $ticks) (i32.const 10)))
      (then (drop (call $log (i32.const 1) (i32.const 16) (i32.const 20)))))
    (i32.const 0))
  (func (export "dr_health") (result i32) (i32.const 0)))
