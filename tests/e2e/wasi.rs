//! The deterministic WASI rules get (issue 17): clocks read the request time, random bytes
//! follow the request id, stdout and stderr reach the rule's log and the scenario runner, `exit`
//! is `rule_exit`, sockets trap, and an interface outside the offered list (HTTP) is refused at
//! load, named. The guests are hand-written (tests/build.rs) and import WASI 0.2.0, older than
//! the host's 0.2.12.

use serde_json::{Value, json};

use crate::support::{Server, ServerArgs, guests, run_cli};

/// Steps of a scenario file for the probe: each request's time and id are fixed, so what the
/// clock says is known in advance.
const PROBE_SCENARIOS: &str = r#"
[[scenario]]
name = "clocks read the request time, no directory is preopened"

[[scenario.step]]
kind = "probe"
key = "K-1"
user = "alice"
id = "probe-1"
at_ms = 1234567
expect = "transition"
status = "ok"
version = 1
data = { s = 1234, ns = 567000000, mono = 1234567000000, dirs = 0 }

[[scenario.step]]
kind = "probe"
key = "K-1"
user = "alice"
id = "probe-2"
at_ms = 2000001
expect = "transition"
status = "ok"
version = 2
data = { s = 2000, ns = 1000000, mono = 2000001000000, dirs = 0 }

[[scenario]]
name = "exit is a failure of its own"

[[scenario.step]]
kind = "exit"
key = "K-2"
user = "alice"
expect = "error"
code = "rule_exit"

[[scenario]]
name = "sockets trap"

[[scenario.step]]
kind = "net"
key = "K-3"
user = "alice"
expect = "error"
code = "rule_trap"
"#;

#[test]
fn clocks_exit_and_sockets_in_the_scenario_runner_which_shows_printed_lines() {
    let dir = tempfile::tempdir().unwrap();
    let scenarios = dir.path().join("scenarios.toml");
    std::fs::write(&scenarios, PROBE_SCENARIOS).unwrap();
    let (ok, stdout, stderr) = run_cli(&[
        "test",
        guests::WASI_PROBE,
        scenarios.to_str().unwrap(),
        "--nocapture",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("scenarios: 3 passed, 0 failed"), "{stdout}");
    // Both stdout lines, each on its own, and stderr's unfinished line, written when the call
    // ended: once per probe step.
    for line in [
        "INFO probe says hello",
        "INFO second line",
        "WARN no newline at the end",
    ] {
        assert_eq!(stdout.matches(line).count(), 2, "{line}: {stdout}");
    }
}

#[tokio::test]
async fn random_bytes_follow_the_request_id_and_replay_finds_no_difference() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        ServerArgs::default()
            .data_dir(dir.path())
            .rule(guests::WASI_PROBE),
    );
    let mut draws = std::collections::BTreeMap::new();
    for i in 0..20 {
        let (status, answer) = server
            .request(json!({"kind": "probe", "key": format!("K-{i}"), "user": "alice", "id": format!("draw-{i}")}))
            .await;
        assert_eq!(status, 200, "{answer}");
        draws.insert(answer["state"]["data"]["r"].as_u64().unwrap(), i);
    }
    // Different requests draw different numbers.
    assert_eq!(draws.len(), 20, "{draws:?}");
    assert!(server.terminate());

    let (ok, stdout, stderr) = run_cli(&[
        "replay",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--rule",
        guests::WASI_PROBE,
        "--json",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["decisions"], 20, "{report}");
    assert_eq!(report["different"], 0, "{report}");
}

#[test]
fn a_component_importing_wasi_http_is_refused_naming_it() {
    let (ok, _, stderr) = run_cli(&["check", guests::WASI_HTTP]);
    assert!(!ok, "a rule importing wasi:http was accepted");
    assert!(
        stderr.contains("would be refused")
            && stderr.contains("`wasi:http/outgoing-handler@0.2.0`"),
        "{stderr}"
    );
    // The probe imports only what is offered (sockets included, which trap when called).
    let (ok, stdout, stderr) = run_cli(&["check", guests::WASI_PROBE]);
    assert!(ok, "{stdout}\n{stderr}");
}
