#!/usr/bin/env python3
"""Retention benchmark (issue 12 item 8): RSS (memory mode) and partition file bytes (data dir)
under a steady workload, with and without `store.log_retention`, in one run.

The workload cycles reserves over 400 keys and users from 8 keep-alive clients, so states and
routes stop growing after the first round and only the log (and what holds it) can grow.

    python3 tests/bench/retention.py [TURNSTILE_BINARY] [ROUNDS] [REQUESTS_PER_ROUND]

Prints one markdown row per setting: the measure after round 1, after the last round, and the
growth per request in between.
"""
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

BINARY = sys.argv[1] if len(sys.argv) > 1 else "target/debug/turnstile"
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
PER_ROUND = int(sys.argv[3]) if len(sys.argv) > 3 else 4000
CLIENTS = 8


def rss_bytes(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024


def files_bytes(data_dir):
    return sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(data_dir)
        for f in files
        if f.endswith(".redb")
    )


def run(retention, data_dir, port):
    config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    config.write(f"[store]\nlog_retention = {retention}\n[rule]\ndeadline_ms = 2000\n")
    config.close()
    args = [BINARY, "run", "--config", config.name, "--listen", f"127.0.0.1:{port}"]
    if data_dir:
        args += ["--data-dir", data_dir]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port)
            c.request("GET", "/healthz")
            c.getresponse().read()
            break
        except OSError:
            time.sleep(0.1)

    def client(w, start):
        c = http.client.HTTPConnection("127.0.0.1", port)
        for i in range(PER_ROUND // CLIENTS):
            k = (start + i * CLIENTS + w) % 400
            body = json.dumps({"kind": "reserve", "key": f"K-{k}", "user": f"u-{k}"})
            c.request("POST", "/v1/requests", body, {"content-type": "application/json"})
            answer = c.getresponse()
            answer.read()
            assert answer.status in (200, 409), answer.status

    measures = []
    for r in range(ROUNDS):
        threads = [threading.Thread(target=client, args=(w, r * PER_ROUND)) for w in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        measures.append(files_bytes(data_dir) if data_dir else rss_bytes(server.pid))
    server.terminate()
    server.wait()
    return measures


def main():
    print("| store | log_retention | after round 1 | after round %d | growth per request |" % ROUNDS)
    print("|---|---:|---:|---:|---:|")
    port = 18900
    for mode in ("memory (RSS)", "data dir (files)"):
        for retention in (0, 1000):
            data_dir = tempfile.mkdtemp() if mode.startswith("data") else None
            m = run(retention, data_dir, port)
            port += 1
            growth = (m[-1] - m[0]) / ((ROUNDS - 1) * PER_ROUND)
            print(
                f"| {mode} | {retention} | {m[0] / 1048576:.1f} MiB | {m[-1] / 1048576:.1f} MiB | {growth:.0f} B |",
                flush=True,
            )


main()
