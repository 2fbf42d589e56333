#!/usr/bin/env bash
# The HTTP path through a Kafka-mode cluster (BENCHMARKS.md, issue 15), one bench run.
# usage: tests/bench/kafka-http.sh N [BENCH-ARGS...]   (after `cargo build --release -p turnstile`)
# e.g. tests/bench/kafka-http.sh 2 --clients 256 --users 2000
# Starts a fresh Tansu broker (memory storage) on $PORT (default 19294), N release processes of a
# 12-partition cluster, waits until every process holds its share of the partitions, restored and
# stable for 3 s, runs `turnstile bench --url` against all of them (each client talks to one
# process), prints the broker's and the processes' CPU time over the bench (ticks of 10 ms, from
# /proc/PID/stat), and stops everything.
# TANSU: the broker binary (default target/tansu/tansu, as tests/run.sh fetches it).
set -u
N=$1; PORT=${PORT:-19294}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET/release/turnstile; TANSU=${TANSU:-$ROOT/target/tansu/tansu}
D=$TARGET/kafka-bench/http-n$N; rm -rf "$D"; mkdir -p "$D"; cd "$D"
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null || break; sleep 0.1; done
setsid "$TANSU" broker --listener-url tcp://127.0.0.1:$PORT --advertised-listener-url tcp://127.0.0.1:$PORT \
  --storage-engine memory://tansu/ > broker.log 2>&1 & BROKER=$!
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done
kill -0 $BROKER 2>/dev/null || { echo "the broker did not start:"; cat broker.log; exit 1; }
printf '[partitions]\nservers = 3\ncontainers = 4\n[kafka]\nbrokers = "127.0.0.1:%s"\ngroup = "bench"\n' $PORT > s.toml
PIDS=(); URLS=()
for i in $(seq 1 "$N"); do
  RUST_LOG=warn "$BIN" run --config s.toml --listen 127.0.0.1:1948$i > p$i.log 2>&1 & PIDS+=($!)
  URLS+=("http://127.0.0.1:1948$i"); sleep 2
done
python3 "$ROOT/tests/bench/wait-restored.py" "$N" || exit 1
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
B0=$(ticks $BROKER); T0=0; for p in "${PIDS[@]}"; do T0=$((T0 + $(ticks "$p"))); done
"$BIN" bench --url "$(IFS=,; echo "${URLS[*]}")" "${@:2}"
B1=$(ticks $BROKER); T1=0; for p in "${PIDS[@]}"; do T1=$((T1 + $(ticks "$p"))); done
echo "CPU ticks over the bench: broker $((B1 - B0)), turnstile processes $((T1 - T0))"
for p in "${PIDS[@]}"; do kill "$p"; done; sleep 2
for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done; kill -9 $BROKER; wait $BROKER 2>/dev/null
