#!/usr/bin/env bash
# Build __APP__.wasm for wasm32-unknown-unknown with rustc alone (no cargo,
# no crates from the network): the devicerunner crate, then the app.
set -euo pipefail
cd "$(dirname "$0")"
need="apt-get install rustc libstd-rust-dev-wasm32"
# Debian's rustc has the wasm32 standard library; rustup's toolchains here
# have none and cannot download one, so prefer /usr/bin/rustc.
RUSTC=${RUSTC:-}
if [ -z "$RUSTC" ]; then
  if [ -x /usr/bin/rustc ]; then RUSTC=/usr/bin/rustc; else RUSTC=$(command -v rustc || true); fi
fi
[ -n "$RUSTC" ] || { echo "build.sh: rustc not found; install it: $need" >&2; exit 127; }
target=wasm32-unknown-unknown
if [ ! -d "$("$RUSTC" --print sysroot)/lib/rustlib/$target" ]; then
  echo "build.sh: $RUSTC has no standard library for $target; install it: $need" \
       "(or: rustup target add $target)" >&2
  exit 127
fi
mkdir -p target
flags=(--edition 2021 --target "$target" -C opt-level=s -C panic=abort)
"$RUSTC" "${flags[@]}" --crate-type rlib --crate-name devicerunner \
  -o target/libdevicerunner.rlib devicerunner/src/lib.rs
"$RUSTC" "${flags[@]}" --crate-type cdylib --crate-name __APP__ -C lto -C strip=symbols \
  -C link-arg=-zstack-size=65536 \
  --extern devicerunner=target/libdevicerunner.rlib -L target -o __APP__.wasm src/lib.rs
echo "built __APP__.wasm ($(wc -c < __APP__.wasm) bytes)"
