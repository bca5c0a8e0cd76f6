#!/usr/bin/env bash
# Build __APP__.wasm: a WASI reactor (exports _initialize, no _start).
set -euo pipefail
cd "$(dirname "$0")"
CXX=${CXX:-clang++}
need="apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32 libc++-14-dev-wasm32 libc++abi-14-dev-wasm32"
command -v "$CXX" >/dev/null || { echo "build.sh: $CXX not found; install it: $need" >&2; exit 127; }
command -v wasm-ld >/dev/null || { echo "build.sh: wasm-ld not found; install it: $need" >&2; exit 127; }
"$CXX" --target=wasm32-wasi -mexec-model=reactor -std=c++17 -O2 -Wall -I. \
  -fno-exceptions -fno-rtti \
  -Wl,--export=dr_init -Wl,--export=dr_tick -Wl,--export=dr_health \
  -Wl,--strip-all -Wl,-z,stack-size=65536 \
  -o __APP__.wasm main.cpp \
  || { echo "build.sh: compile failed; if the error names a missing header, library or sysroot, install: $need" >&2; exit 1; }
echo "built __APP__.wasm ($(wc -c < __APP__.wasm) bytes)"
