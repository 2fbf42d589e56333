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
. "$ROOT/tests/bench/cluster.sh"
URLS=(); for i in $(seq 1 "$N"); do URLS+=("http://127.0.0.1:1948$i"); done
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
B0=$(ticks $BROKER); T0=0; for p in "${PIDS[@]}"; do T0=$((T0 + $(ticks "$p"))); done
"$BIN" bench --url "$(IFS=,; echo "${URLS[*]}")" "${@:2}"
B1=$(ticks $BROKER); T1=0; for p in "${PIDS[@]}"; do T1=$((T1 + $(ticks "$p"))); done
echo "CPU ticks over the bench: broker $((B1 - B0)), turnstile processes $((T1 - T0))"
stop_cluster
