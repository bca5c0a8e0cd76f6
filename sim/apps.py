"""The simulator's app releases (WAT, compiled at run time)."""

from __future__ import annotations

import random

import wasmtime

# v1: a healthy counter that reads the temperature every tick.
GOOD = """(module
  (import "sensors" "find" (func $find (param i32 i32) (result i32)))
  (import "sensors" "read" (func $read (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "temp")
  (data (i32.const 64) "%s")
  (global $t (mut i32) (i32.const -1))
  (func (export "dr_init") (result i32) (global.set $t (call $find (i32.const 0) (i32.const 4))) (i32.const 0))
  (func (export "dr_tick") (result i32) (drop (call $read (global.get $t) (i32.const 16))) (i32.const 0))
  (func (export "dr_health") (result i32) (i32.const 0)))"""

# A release with a hardware-specific bug: on devices whose "quirk" sensor reads 1
# (one hardware variant) it traps after 8 ticks; elsewhere it runs fine.
BAD_ON_QUIRK = """(module
  (import "sensors" "find" (func $find (param i32 i32) (result i32)))
  (import "sensors" "read" (func $read (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "quirk")
  (global $q (mut i32) (i32.const -1))
  (global $n (mut i32) (i32.const 0))
  (func (export "dr_init") (result i32) (global.set $q (call $find (i32.const 0) (i32.const 5))) (i32.const 0))
  (func (export "dr_tick") (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (drop (call $read (global.get $q) (i32.const 16)))
    (if (i32.and (i32.gt_u (global.get $n) (i32.const 8)) (f64.gt (f64.load (i32.const 16)) (f64.const 0.5)))
      (then unreachable))
    (i32.const 0))
  (func (export "dr_health") (result i32) (i32.const 0)))"""


# A configurable app: reads setting "gain" in dr_init (default 1). A gain above 10
# drives the "quirk" hardware variant out of range: there it traps after 8 ticks.
# Elsewhere any gain is fine. The config, not the code, carries the bug.
CONFIGURED = """(module
  (import "sensors" "find" (func $find (param i32 i32) (result i32)))
  (import "sensors" "read" (func $read (param i32 i32) (result i32)))
  (import "config" "get_f64" (func $cf (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "quirk")
  (data (i32.const 8) "gain")
  (data (i32.const 64) "%s")
  (global $q (mut i32) (i32.const -1))
  (global $n (mut i32) (i32.const 0))
  (global $gain (mut f64) (f64.const 1))
  (func (export "dr_init") (result i32)
    (global.set $q (call $find (i32.const 0) (i32.const 5)))
    (if (i32.eqz (call $cf (i32.const 8) (i32.const 4) (i32.const 32)))
      (then (global.set $gain (f64.load (i32.const 32)))))
    (i32.const 0))
  (func (export "dr_tick") (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (drop (call $read (global.get $q) (i32.const 16)))
    (if (i32.and (i32.gt_u (global.get $n) (i32.const 8))
                 (i32.and (f64.gt (global.get $gain) (f64.const 10))
                          (f64.gt (f64.load (i32.const 16)) (f64.const 0.5))))
      (then unreachable))
    (i32.const 0))
  (func (export "dr_health") (result i32) (i32.const 0)))"""


def configured(tag: str) -> bytes:
    return bytes(wasmtime.wat2wasm(CONFIGURED % tag))


def good(tag: str, pad_kib: int = 0) -> bytes:
    """``pad_kib``: a data segment that makes the module (and its download)
    that much bigger: many chunks, so a broken connection has a download to
    resume."""
    wat = GOOD % tag
    if pad_kib:
        rng = random.Random(tag)
        blob = "".join(f"\\{rng.randrange(256):02x}" for _ in range(min(pad_kib, 60) * 1024))
        wat = wat.replace("(global $t", f'(data (i32.const 4096) "{blob}")\n  (global $t', 1)
    return bytes(wasmtime.wat2wasm(wat))


def bad_on_quirk() -> bytes:
    return bytes(wasmtime.wat2wasm(BAD_ON_QUIRK))
