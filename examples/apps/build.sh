#!/usr/bin/env bash
# Rebuild the example apps from source. Needs Debian's clang, lld and wasi-libc:
#   apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32
# Output is deterministic for a given toolchain; the built .wasm files are
# committed so the demo and tests run without a C toolchain.
set -euo pipefail
cd "$(dirname "$0")"
CC=${CC:-clang}
if ! command -v "$CC" >/dev/null; then
  echo "build.sh: $CC not found; install: apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32" >&2
  exit 1
fi
CFLAGS=(--target=wasm32-wasi -mexec-model=reactor -O2 -Isrc
        -Wl,--strip-all -Wl,--export=dr_init -Wl,--export=dr_tick
        -ffile-prefix-map="$PWD"=.)
for app in thermostat; do
  "$CC" "${CFLAGS[@]}" -Wl,--export=dr_health -o "$app.wasm" "src/$app.c"
  echo "built $app.wasm ($(wc -c < "$app.wasm") bytes, sha256 $(sha256sum "$app.wasm" | cut -c1-16))"
done
