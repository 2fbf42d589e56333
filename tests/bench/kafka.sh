#!/usr/bin/env bash
# The Kafka consume benchmark of BENCHMARKS.md (issue 15), one row per run.
# usage: tests/bench/kafka.sh N [USERS [BENCH-ARGS...]]   (after `cargo build --release -p turnstile`)
# e.g. tests/bench/kafka.sh 2 20000 --rate 5000,10000,15000 (open loop at fixed rates)
# Starts a fresh Tansu broker (memory storage) on $PORT (default 19294), N release processes of
# a 12-partition cluster, waits until every process holds its share of the partitions, restored
# and stable for 3 s, then runs `turnstile bench --kafka` (Turnstile against the pass-through
# floor in the same invocation, with each process's CPU per request), and stops everything.
# TANSU: the broker binary (default target/tansu/tansu, as tests/run.sh fetches it).
set -u
N=$1; USERS=${2:-20000}; PORT=${PORT:-19294}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET/release/turnstile; TANSU=${TANSU:-$ROOT/target/tansu/tansu}
D=$TARGET/kafka-bench/n$N; rm -rf "$D"; mkdir -p "$D"; cd "$D"
# The previous run's broker may still hold the port for a moment after its kill.
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null || break; sleep 0.1; done
setsid "$TANSU" broker --listener-url tcp://127.0.0.1:$PORT --advertised-listener-url tcp://127.0.0.1:$PORT \
  --storage-engine memory://tansu/ > broker.log 2>&1 & BROKER=$!
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done
kill -0 $BROKER 2>/dev/null || { echo "the broker did not start:"; cat broker.log; exit 1; }
printf '[partitions]\nservers = 3\ncontainers = 4\n[kafka]\nbrokers = "127.0.0.1:%s"\ngroup = "bench"\n' $PORT > s.toml
PIDS=(); CPU="broker=$BROKER"
for i in $(seq 1 "$N"); do
  RUST_LOG=warn "$BIN" run --config s.toml --listen 127.0.0.1:1948$i > p$i.log 2>&1 & PIDS+=($!); CPU="$CPU,turnstile-$i=$!"
  sleep 2
done
python3 "$ROOT/tests/bench/wait-restored.py" "$N" || exit 1
"$BIN" bench --kafka s.toml --users "$USERS" --cpu "$CPU" "${@:3}"
for p in "${PIDS[@]}"; do kill "$p"; done; sleep 2
for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done; kill -9 $BROKER; wait $BROKER 2>/dev/null
