#!/usr/bin/env bash
# Build __APP__.wasm: a WASI reactor (exports _initialize, no _start).
set -euo pipefail
cd "$(dirname "$0")"
CC=${CC:-clang}
need="apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32"
command -v "$CC" >/dev/null || { echo "build.sh: $CC not found; install it: $need" >&2; exit 127; }
command -v wasm-ld >/dev/null || { echo "build.sh: wasm-ld not found; install it: $need" >&2; exit 127; }
"$CC" --target=wasm32-wasi -mexec-model=reactor -O2 -Wall -I. \
  -Wl,--export=dr_init -Wl,--export=dr_tick -Wl,--export=dr_health \
  -Wl,--strip-all -Wl,-z,stack-size=65536 \
  -o __APP__.wasm main.c \
  || { echo "build.sh: compile failed; if the error names a missing library or sysroot, install: $need" >&2; exit 1; }
echo "built __APP__.wasm ($(wc -c < __APP__.wasm) bytes)"
