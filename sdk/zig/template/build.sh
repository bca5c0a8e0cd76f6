#!/usr/bin/env bash
# Build __APP__.wasm: wasm32-freestanding, no entry point, three exports,
# a 64 KiB stack (the wasm32-wasi default of 16 MiB exceeds the memory limit).
# zig is $ZIG, else zig on PATH, else python3 -m ziglang, else devicerunner's
# toolchain cache (~/.cache/devicerunner/toolchains, filled by scripts/test).
set -euo pipefail
cd "$(dirname "$0")"
tc=${DR_TOOLCHAINS:-${XDG_CACHE_HOME:-$HOME/.cache}/devicerunner/toolchains}
if [ -n "${ZIG:-}" ]; then read -r -a zig <<< "$ZIG"
elif command -v zig >/dev/null; then zig=(zig)
elif python3 -c 'import ziglang' 2>/dev/null; then zig=(python3 -m ziglang)
elif [ -x "$tc/py/ziglang/zig" ]; then zig=("$tc/py/ziglang/zig")
else
  echo "build.sh: zig not found; install it: pip install ziglang (PyPI; then python3 -m ziglang works)" >&2
  exit 127
fi
"${zig[@]}" build-exe -target wasm32-freestanding -fno-entry -O ReleaseSmall \
  --export=dr_init --export=dr_tick --export=dr_health --stack 65536 \
  --dep devicerunner -Mroot=src/main.zig -Mdevicerunner=devicerunner.zig \
  -femit-bin=__APP__.wasm
rm -f __APP__.wasm.o
echo "built __APP__.wasm ($(wc -c < __APP__.wasm) bytes)"
