#!/usr/bin/env bash
# Installs the pinned JavaScript and Python rule toolchains the tests build rules with:
# componentize-js (npm registry, guest/js/package-lock.json) into guest/js/node_modules, and
# componentize-py (PyPI, guest/python/requirements.txt) into guest/python/.venv. Idempotent: when
# both are there as pinned it only checks and returns. Called by .ci/run (before clippy, whose
# check runs tests/build.rs) and by tests/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s%N)
js=guest/js
# The lock file an install was made from, kept beside it: equal means nothing to do.
stamp=$js/node_modules/.turnstile-installed-from.json
if ! cmp -s "$js/package-lock.json" "$stamp"; then
  echo "== installing the JavaScript rule toolchain (npm ci in $js)"
  command -v npm >/dev/null || {
    echo "error: npm (Node.js 18 or newer) is needed to build JavaScript rules; install Node.js" >&2
    exit 1
  }
  npm ci --prefix "$js" --no-audit --no-fund --loglevel=error
  cp "$js/package-lock.json" "$stamp"
fi

py=guest/python
venv=$py/.venv
want=$(sed -n 's/^componentize-py==//p' "$py/requirements.txt")
have=$("$venv/bin/componentize-py" --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$want" ]; then
  echo "== installing the Python rule toolchain (componentize-py==$want into $venv)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$py/requirements.txt"
fi
elapsed_ms=$(( ($(date +%s%N) - start) / 1000000 ))
echo "== rule toolchains ready: componentize-js $(node -p "require('./$js/node_modules/@bytecodealliance/componentize-js/package.json').version"), componentize-py $("$venv/bin/componentize-py" --version | awk '{print $2}') (${elapsed_ms} ms)"
