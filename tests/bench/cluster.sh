# Sourced by tests/bench/kafka*.sh: a fresh Tansu broker (memory storage) on $PORT and $N release
# processes of a 12-partition cluster on ports 19481.., waited on until every process holds its
# share of the partitions, restored and stable for 3 s. Needs N, PORT, BIN, TANSU, ROOT and the
# run directory as the working directory; sets BROKER and PIDS. `stop_cluster` ends them all.
# The previous run's broker may still hold the port for a moment after its kill.
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null || break; sleep 0.1; done
setsid "$TANSU" broker --listener-url tcp://127.0.0.1:$PORT --advertised-listener-url tcp://127.0.0.1:$PORT \
  --storage-engine memory://tansu/ > broker.log 2>&1 & BROKER=$!
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done
kill -0 $BROKER 2>/dev/null || { echo "the broker did not start:"; cat broker.log; exit 1; }
printf '[partitions]\nservers = 3\ncontainers = 4\n[kafka]\nbrokers = "127.0.0.1:%s"\ngroup = "bench"\n' $PORT > s.toml
PIDS=()
for i in $(seq 1 "$N"); do
  RUST_LOG=warn "$BIN" run --config s.toml --listen 127.0.0.1:1948$i > p$i.log 2>&1 & PIDS+=($!)
  sleep 2
done
python3 "$ROOT/tests/bench/wait-restored.py" "$N" || exit 1
stop_cluster() {
  for p in "${PIDS[@]}"; do kill "$p"; done; sleep 2
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done; kill -9 $BROKER; wait $BROKER 2>/dev/null
}
