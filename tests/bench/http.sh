#!/usr/bin/env bash
# The HTTP path measured with the server alone on one core (BENCHMARKS.md, issue 14 item 7): the
# server pinned to CPU 1 with `taskset`, the load generator to CPU 0, so that neither takes the
# other's time; then both unpinned, on the same 2 cores, as before. Each configuration starts a
# fresh server with a fresh data dir, runs the closed-loop bench (64 keep-alive connections) and the
# open-loop bench at the given rates, and reports the server's CPU per request (`--cpu server=PID`,
# sampled over the load only, not over the bench's read-back of final states).
#
# Usage: cargo build --release -p turnstile &&
#        bash tests/bench/http.sh [none|sync] [USERS] [RATE,RATE...]
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-$ROOT/target/release/turnstile}
DURABILITY=${1:-none}
USERS=${2:-20000}
RATES=${3:-5000,10000,20000}
WORK=$(mktemp -d)
SERVER=

stop_server() {
    if [ -n "$SERVER" ]; then
        kill "$SERVER" 2>/dev/null || true
        wait "$SERVER" 2>/dev/null || true
        SERVER=
    fi
}
trap 'stop_server; rm -rf "$WORK"' EXIT

printf '[store]\ndurability = "%s"\n' "$DURABILITY" > "$WORK/config.toml"

# run LABEL SERVER_PREFIX CLIENT_PREFIX: one fresh server, the closed and the open-loop bench.
run() {
    local label=$1 server_prefix=$2 client_prefix=$3
    rm -rf "$WORK/data"
    # shellcheck disable=SC2086 # the prefixes are words on purpose (`taskset -c 1` or nothing)
    $server_prefix "$BIN" run --listen 127.0.0.1:0 --config "$WORK/config.toml" \
        --data-dir "$WORK/data" > "$WORK/server.log" 2>&1 &
    SERVER=$!
    local url=
    for _ in $(seq 1 300); do
        url=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$WORK/server.log" | head -1 || true)
        [ -n "$url" ] && break
        sleep 0.1
    done
    [ -n "$url" ] || { cat "$WORK/server.log"; echo "the server did not start" >&2; exit 1; }
    echo "== $label, durability $DURABILITY, $USERS users: server $url (pid $SERVER)"
    # shellcheck disable=SC2086
    $client_prefix "$BIN" bench --url "$url" --users "$USERS" --clients 64 --cpu "server=$SERVER" \
        | grep -v '^turnstile bench:'
    # shellcheck disable=SC2086
    $client_prefix "$BIN" bench --url "$url" --users "$USERS" --clients 64 --rate "$RATES" \
        --cpu "server=$SERVER" | grep -v '^turnstile bench:'
    stop_server
}

run "pinned: server on CPU 1, load generator on CPU 0" "taskset -c 1" "taskset -c 0"
run "shared: both on both CPUs" "" ""
