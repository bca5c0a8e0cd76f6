#!/usr/bin/env bash
# Assemble app.wat into __APP__.wasm. `devicerunner app run app.wat` also
# works without this step. Uses the wasmtime Python package devicerunner
# depends on (or wat2wasm from wabt, if installed).
set -euo pipefail
cd "$(dirname "$0")"
if command -v wat2wasm >/dev/null; then
  wat2wasm app.wat -o __APP__.wasm
else
  PY=${PYTHON:-python3}
  "$PY" -c 'import wasmtime' 2>/dev/null || {
    echo "build.sh: need wat2wasm (apt-get install wabt) or the wasmtime Python package (pip install wasmtime; installed with devicerunner)" >&2
    exit 127
  }
  "$PY" -c 'import sys, wasmtime; open(sys.argv[2], "wb").write(wasmtime.wat2wasm(open(sys.argv[1]).read()))' app.wat __APP__.wasm
fi
echo "built __APP__.wasm ($(wc -c < __APP__.wasm) bytes)"
