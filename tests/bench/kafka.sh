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
. "$ROOT/tests/bench/cluster.sh"
CPU="broker=$BROKER"; for i in "${!PIDS[@]}"; do CPU="$CPU,turnstile-$((i + 1))=${PIDS[$i]}"; done
"$BIN" bench --kafka s.toml --users "$USERS" --cpu "$CPU" "${@:3}"
stop_cluster
