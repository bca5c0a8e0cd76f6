;; unhealthy-after-50: ticks fine, but dr_health reports unhealthy from tick 50 on.
(module
  (memory (export "memory") 1)
  (global $n (mut i32) (i32.const 0))
  (func (export "dr_init") (result i32) (i32.const 0))
  (func (export "dr_tick") (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1))) (i32.const 0))
  (func (export "dr_health") (result i32) (i32.ge_u (global.get $n) (i32.const 50))))
