"""Waits until N Kafka-mode processes on ports 19481.. hold all 12 partitions between them,
restored, and the split has been stable for 3 s (used by the tests/bench/kafka*.sh scripts)."""
import json, sys, time, urllib.request
n = int(sys.argv[1]); end = time.time() + 120; prev = None; stable = 0; counts = []
while time.time() < end:
    counts = []
    for i in range(1, n + 1):
        try:
            doc = json.load(urllib.request.urlopen(f"http://127.0.0.1:{19480 + i}/v1/partitions", timeout=2))
            counts.append(sum(1 for p in doc["partitions"] if p.get("restored")))
        except Exception:
            counts.append(0)
    if sum(counts) == 12 and min(counts) > 0:
        stable = stable + 1 if prev == counts else 1
        prev = counts
        if stable >= 6:
            print("restored 12 as", counts)
            break
    time.sleep(0.5)
else:
    print("not restored", counts)
    sys.exit(1)
