#!/usr/bin/env bash
# Build __APP__.wasm with AssemblyScript (asconfig.json: release target,
# abort routed to the device log, so the module imports no `env.abort`).
# asc is the project's (npm install), else asc on PATH, else devicerunner's
# toolchain cache (~/.cache/devicerunner/toolchains, filled by scripts/test).
set -euo pipefail
cd "$(dirname "$0")"
tc=${DR_TOOLCHAINS:-${XDG_CACHE_HOME:-$HOME/.cache}/devicerunner/toolchains}
if [ -x node_modules/.bin/asc ]; then ASC=node_modules/.bin/asc
elif command -v asc >/dev/null; then ASC=asc
elif [ -x "$tc/npm/node_modules/.bin/asc" ]; then ASC=$tc/npm/node_modules/.bin/asc
else
  echo "build.sh: AssemblyScript's asc not found; install it: npm install (in this directory;" \
       "it installs the npm package assemblyscript) or npm install -g assemblyscript;" \
       "it needs Node.js (apt-get install nodejs npm)" >&2
  exit 127
fi
"$ASC" --config asconfig.json --target release
echo "built __APP__.wasm ($(wc -c < __APP__.wasm) bytes)"
