#!/usr/bin/env bash
# Build time per language in one run (BENCHMARKS.md, issue 17): a new project, its toolchain
# installed, `turnstile build` without the compile cache, `turnstile build` again after touching the
# source, then `turnstile check` of the built component without and with the compile cache.
# Usage: cargo build --release -p turnstile && bash tests/bench/build_times.sh
set -euo pipefail
T=${T:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/turnstile}
W=$(mktemp -d /tmp/bt.XXXX); cd "$W"
t() { local s=$(date +%s%N); "$@" > "$W/last.log" 2>&1 || { cat "$W/last.log"; exit 1; }; echo "$(( ($(date +%s%N) - s) / 1000000 ))"; }
export CARGO_TARGET_DIR="$W/rust-target"
for lang in rust js python; do
  $T new "$W/r-$lang" --lang "$lang" > /dev/null
  cd "$W/r-$lang"
  case $lang in
    js) inst=$(t npm install --no-audit --no-fund --prefer-offline --loglevel=error) ;;
    python) inst=$(t bash -c 'python3 -m venv .venv && .venv/bin/pip install --quiet -r requirements.txt') ;;
    rust) inst=- ;;
  esac
  cold=$(TURNSTILE_COMPILE_CACHE=off t $T build .)
  src=$(ls src/lib.rs rule.js app.py 2>/dev/null | head -1 || true); touch "$src"
  again=$(TURNSTILE_COMPILE_CACHE="$W/cache" t $T build .)
  wasm=$(ls "$CARGO_TARGET_DIR"/components/*.wasm target/components/*.wasm 2>/dev/null | grep -- "$(basename "$PWD")" | head -1 || true)
  [ -n "$wasm" ] || wasm=$(find "$W" -path "*components/r-$lang.wasm" | head -1)
  check_cold=$(TURNSTILE_COMPILE_CACHE=off t $T check "$wasm")
  check_cached=$(TURNSTILE_COMPILE_CACHE="$W/cache" t $T check "$wasm")
  echo "| $lang | $inst | $cold | $again | $check_cold | $check_cached |"
  cd "$W"
done
rm -rf "$W"
