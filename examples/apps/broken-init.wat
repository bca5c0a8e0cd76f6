;; broken-init: traps in dr_init. An update to this must be rolled back.
(module
  (memory (export "memory") 1)
  (func (export "dr_init") (result i32) unreachable)
  (func (export "dr_tick") (result i32) (i32.const 0)))
