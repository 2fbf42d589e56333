//! The command line: bad configuration is refused with the key named and a non-zero exit.

use crate::support::run_cli;

#[test]
fn bad_config_files_are_refused_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[partitions]\nserverz = 2\n", "serverz"),
        ("[partitions]\nservers = \"two\"\n", "servers"),
        ("[partitions]\nservers = 0\n", "partitions.servers"),
        ("[partitions]\ncontainers = 0\n", "partitions.containers"),
        ("[rule]\nfuel = -1\n", "fuel"),
        ("[store]\ndurability = \"maybe\"\n", "durability"),
        ("[nonsense]\n", "nonsense"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let (ok, _, stderr) = run_cli(&[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--config",
            path.to_str().unwrap(),
        ]);
        assert!(!ok, "{text:?} was accepted");
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(stderr.contains(key), "{text:?}: {stderr}");
    }
    let (ok, _, stderr) = run_cli(&["run", "--config", "/no/such/file.toml"]);
    assert!(!ok);
    assert!(stderr.contains("/no/such/file.toml"), "{stderr}");
}

const BENCH_VARIANTS: [&str; 6] = [
    "turnstile",
    "turnstile-hardened",
    "turnstile-warm",
    "turnstile-native",
    "locked-workers",
    "unordered-workers",
];

fn bench_rows(args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec![
        "bench",
        "--clients",
        "16",
        "--durability",
        "none",
        "--compare",
        "--json",
    ];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = run_cli(&all);
    assert!(ok, "{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    rows.as_array().unwrap().clone()
}

/// `turnstile bench --compare` runs every variant on tiny workloads. Every variant, baselines
/// included, answers every request (a baseline that drops a write error or a reply fails here),
/// reports consistent percentiles, and every design that serializes a key's requests (Turnstile,
/// and the per-key locks of `locked-workers`) shows no anomaly in the race workload.
#[test]
fn bench_smoke() {
    let pairs = bench_rows(&["--users", "300"]);
    let races = bench_rows(&["--users", "200", "--workload", "race", "--rounds", "2"]);
    let open = bench_rows(&["--users", "200", "--rate", "2000"]);
    for (rows, requests) in [(&pairs, 600), (&races, 800), (&open, 400)] {
        let names: Vec<&str> = rows
            .iter()
            .map(|r| r["variant"].as_str().unwrap())
            .collect();
        assert_eq!(names, BENCH_VARIANTS);
        for row in rows {
            let name = &row["variant"];
            assert_eq!(row["requests"], requests, "{name}");
            assert_eq!(row["errors"], 0, "{name} failed requests");
            assert!(row["seconds"].as_f64().unwrap() > 0.0, "{name}");
            let p = |f: &str| row[f].as_f64().unwrap();
            assert!(p("p50_us") >= 1.0, "{name} recorded no latency");
            // Every in-process variant commits, and no commit is counted without a request.
            let per_commit = p("requests_per_commit");
            assert!(
                (1.0..=256.0).contains(&per_commit),
                "{name}: {per_commit} requests per commit"
            );
            assert!(
                p("p50_us") <= p("p99_us")
                    && p("p99_us") <= p("p999_us")
                    && p("p999_us") <= p("max_us"),
                "{name}: {row}"
            );
        }
    }
    // Pairs: Turnstile keeps each client's order, so every user ends associated.
    for row in &pairs[..3] {
        assert_eq!(row["wrong"], 0, "{} got a user wrong", row["variant"]);
    }
    // Race: the answers and final states of every serializing design pass the oracle.
    for row in &races[..4] {
        assert_eq!(row["workload"], "race");
        assert_eq!(row["anomalies"], 0, "{} has anomalies", row["variant"]);
    }
    // Open loop: 400 requests scheduled at 2 000/s take at least their 0.2 s schedule.
    for row in &open {
        assert_eq!(row["offered_rate"], 2000.0);
        assert!(row["seconds"].as_f64().unwrap() >= 0.19, "{row}");
    }
}

/// `bench --zipf` makes one partition hot and reports it apart, and the oracle still judges
/// every user (each keeps a key of its own).
#[test]
fn bench_zipf_makes_partition_zero_hot() {
    let (ok, stdout, stderr) = run_cli(&[
        "bench",
        "--users",
        "400",
        "--clients",
        "16",
        "--durability",
        "none",
        "--zipf",
        "2",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let row = &rows[0];
    assert_eq!(row["errors"], 0, "{row}");
    assert_eq!(row["wrong"], 0, "{row}");
    // Zipf 2 over 4 partitions gives partition 0 1 / (1 + 1/4 + 1/9 + 1/16) = 70% of the
    // users; an even spread would give it 25%.
    let share = row["hot_partition"]["share"].as_f64().unwrap();
    assert!((0.6..0.8).contains(&share), "{share}: {row}");
    assert!(
        row["hot_partition"]["p99_us"].as_f64().unwrap() >= 1.0,
        "{row}"
    );
    assert!(
        row["hot_partition"]["others_p99_us"].as_f64().unwrap() >= 1.0,
        "{row}"
    );

    let (ok, _, stderr) = run_cli(&["bench", "--users", "10", "--zipf", "0"]);
    assert!(!ok);
    assert!(
        stderr.contains("--zipf must be a positive exponent"),
        "{stderr}"
    );
}

/// `bench --url` aimed at nothing, at no URL, or at a server that is not a Turnstile fails
/// with the URL named, instead of printing a table of failures with a zero exit.
#[test]
fn bench_over_http_refuses_what_it_cannot_measure() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let (ok, stdout, stderr) = run_cli(&["bench", "--url", &closed, "--users", "10"]);
    assert!(!ok, "{stdout}");
    assert!(
        stderr.starts_with("error: cannot reach the server at ") && stderr.contains(&closed),
        "{stderr}"
    );
    let (ok, _, stderr) = run_cli(&["bench", "--url", "notaurl", "--users", "10"]);
    assert!(!ok);
    assert!(stderr.contains("--url notaurl is not a URL"), "{stderr}");

    // Something that answers every request 200 with an empty JSON object: its /readyz passes,
    // then no request gets a state back.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let impostor = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 65536];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
            );
        }
    });
    let (ok, stdout, stderr) = run_cli(&[
        "bench",
        "--url",
        &impostor,
        "--users",
        "20",
        "--clients",
        "2",
        "--json",
    ]);
    assert!(!ok, "{stdout}");
    assert!(
        stderr.contains("every one of the 40 requests failed") && stderr.contains(&impostor),
        "{stderr}"
    );
}

/// `bench --url` drives a running server and, with `--cpu`, reports the server's own CPU per
/// request over the load (the number the pinned HTTP measurement in BENCHMARKS.md rests on).
#[test]
fn bench_over_http_reports_the_servers_cpu() {
    let server = crate::support::Server::start();
    let pid = server.pid().to_string();
    // A process that does nothing during the load must read as nothing.
    let mut idle = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let cpu_ms = |pid: &str| -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        // utime and stime, in 10 ms ticks.
        (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) * 10.0
    };
    let server_before_ms = cpu_ms(&pid);
    let (ok, stdout, stderr) = run_cli(&[
        "bench",
        "--url",
        &server.url,
        "--users",
        "1000",
        "--clients",
        "8",
        "--cpu",
        &format!("server={pid},idle={}", idle.id()),
        "--json",
    ]);
    let server_used_ms = cpu_ms(&pid) - server_before_ms;
    let _ = idle.kill();
    let _ = idle.wait();
    assert!(ok, "{stderr}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let row = &rows[0];
    assert_eq!(row["variant"], "turnstile-http");
    assert_eq!(row["errors"], 0, "{row}");
    assert_eq!(row["wrong"], 0, "{row}");
    // The bench does not read a server's commits.
    assert!(row["requests_per_commit"].is_null(), "{row}");
    let of = |label: &str| -> f64 {
        let entry = row["cpu_us_per_request_of"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e[0] == label)
            .unwrap_or_else(|| panic!("no {label} in {row}"));
        entry[1].as_f64().unwrap()
    };
    assert_eq!(of("idle"), 0.0, "{row}");
    // The server worked for the load, and the bench counted no more than the whole run's CPU,
    // read-back of final states included (one 10 ms tick of slack per reading).
    let server_us = of("server");
    let whole_run_us = (server_used_ms + 20.0) * 1000.0 / 2000.0;
    assert!(
        server_us > 0.0 && server_us <= whole_run_us,
        "{server_us} µs per request, the whole run {whole_run_us}: {row}"
    );

    // Another process's CPU means nothing for an in-process run.
    let (ok, _, stderr) = run_cli(&["bench", "--users", "10", "--cpu", &format!("server={pid}")]);
    assert!(!ok);
    assert!(
        stderr.contains("--cpu") && stderr.contains("--url"),
        "{stderr}"
    );
    // Nor does a process that is not there, which would read as 0 µs.
    let (ok, _, stderr) = run_cli(&[
        "bench",
        "--url",
        &server.url,
        "--users",
        "10",
        "--cpu",
        "server=4194999",
    ]);
    assert!(!ok);
    assert!(stderr.contains("no process 4194999"), "{stderr}");
}

/// Logs written to a pipe (not a terminal) carry no colour codes.
#[test]
fn logs_to_a_pipe_are_colourless() {
    let stderr = crate::support::Server::refused(
        crate::support::ServerArgs::default().rule("/no/such/rule.wasm"),
    );
    assert!(stderr.contains("WARN"), "no log line to look at: {stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a pipe: {stderr:?}"
    );
}

/// A listen address that is taken is refused before anything starts: the error names the
/// address, and the data dir is left as it was (in Kafka mode the same order keeps a process
/// that cannot serve from creating topics and joining the group first).
#[test]
fn a_taken_listen_address_is_refused_before_anything_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (ok, _, stderr) = run_cli(&[
        "run",
        "--listen",
        &address,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(!ok, "{stderr}");
    assert!(stderr.contains(&format!("binding {address}")), "{stderr}");
    assert!(
        !data.exists(),
        "the data dir was created before the bind failed"
    );
}
