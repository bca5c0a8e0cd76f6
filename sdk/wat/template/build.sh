#!/usr/bin/env bash
# Assemble app.wat into __APP__.wasm. `devicerunner app run app.wat` also
# works without this step. Uses wat2wasm (wabt) if installed, else the
# wasmtime Python package devicerunner itself uses.
set -euo pipefail
cd "$(dirname "$0")"
if command -v wat2wasm >/dev/null; then
  wat2wasm app.wat -o __APP__.wasm
else
  has_wasmtime() { "$1" -c 'import wasmtime' 2>/dev/null; }
  PY=${PYTHON:-python3}
  if ! has_wasmtime "$PY"; then
    # devicerunner's own interpreter (e.g. .venv/bin/python) has wasmtime
    dr=$(command -v devicerunner || true)
    PY=$([ -n "$dr" ] && head -1 "$dr" | sed -n 's/^#!//p' || true)
    [ -n "$PY" ] && has_wasmtime "$PY" || {
      echo "build.sh: need wat2wasm (apt-get install wabt) or a Python with the wasmtime package" \
           "(pip install wasmtime; devicerunner's virtualenv has it: activate it or set PYTHON=)" >&2
      exit 127
    }
  fi
  "$PY" -c 'import sys, wasmtime; open(sys.argv[2], "wb").write(wasmtime.wat2wasm(open(sys.argv[1]).read()))' \
    app.wat __APP__.wasm
fi
echo "built __APP__.wasm ($(wc -c < __APP__.wasm) bytes)"
