;; slow: every tick spins far past a 10 ms budget (an accidental O(n^2), say).
(module
  (memory (export "memory") 1)
  (func (export "dr_init") (result i32) (i32.const 0))
  (func (export "dr_tick") (result i32) (local $i i32)
    (loop $l
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 60000000))))
    (i32.const 0)))
