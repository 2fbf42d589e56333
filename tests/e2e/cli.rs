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

/// `turnstile bench --compare` runs every variant on a tiny workload; Turnstile gets every user
/// right, and each baseline's counter stays within the number of users.
#[test]
fn bench_smoke() {
    let (ok, stdout, stderr) = run_cli(&[
        "bench",
        "--users",
        "300",
        "--clients",
        "16",
        "--durability",
        "none",
        "--compare",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let rows = rows.as_array().unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["variant"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "turnstile",
            "turnstile-warm",
            "turnstile-native",
            "locked-workers",
            "unordered-workers"
        ]
    );
    for row in rows {
        assert_eq!(row["requests"], 600);
        assert!(row["throughput"].as_f64().unwrap() > 0.0);
        assert!(row["wrong"].as_u64().unwrap() <= 300);
    }
    assert_eq!(rows[0]["wrong"], 0, "turnstile got a user wrong {stderr}");
    assert_eq!(rows[1]["wrong"], 0, "turnstile-warm got a user wrong");
    assert_eq!(rows[2]["wrong"], 0, "turnstile-native got a user wrong");
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
