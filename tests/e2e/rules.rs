//! Rules really run in Wasm: another component changes the outcomes, and components that are
//! not valid rules are refused at start with a message naming the problem.

use crate::support::{Server, ServerArgs, body, guests};

/// The `echo` test rule accepts what the reference rule rejects.
#[tokio::test(flavor = "multi_thread")]
async fn another_rule_changes_the_outcomes() {
    let reference = Server::start();
    let echo = Server::start_with(ServerArgs::default().rule(guests::ECHO));
    for server in [&reference, &echo] {
        assert_eq!(
            server.request(body("reserve", Some("K"), "alice")).await.0,
            200
        );
    }
    let (status, answer) = reference.request(body("reserve", Some("K"), "alice")).await;
    assert_eq!(status, 409, "{answer}");
    let (status, answer) = echo.request(body("reserve", Some("K"), "alice")).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["state"]["status"], "echo-reserve");
    assert_eq!(answer["state"]["version"], 2);
    let (_, key) = echo.get("/v1/keys/K").await;
    assert_ne!(
        key["state"]["rule_version"],
        reference.get("/v1/keys/K").await.1["state"]["rule_version"],
        "each state names the rule version that made it"
    );
}

/// Components that are not rules are refused at start; the process exits non-zero and says why.
#[test]
fn bad_components_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let not_wasm = dir.path().join("not-wasm.wasm");
    std::fs::write(&not_wasm, b"this is not wasm").unwrap();
    let core = dir.path().join("core.wasm");
    // The smallest valid core module: magic + version 1.
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let cases: Vec<(std::path::PathBuf, &str)> = vec![
        (not_wasm, "not a WebAssembly file"),
        (core, "core WebAssembly module, not a component"),
        (
            guests::OTHER_WORLD.into(),
            "does not implement the turnstile:rule world",
        ),
        (guests::FORBIDDEN_IMPORT.into(), "imports `now`"),
        (dir.path().join("missing.wasm"), "reading rule"),
    ];
    for (rule, expected) in cases {
        let err = Server::refused(ServerArgs::default().rule(&rule));
        assert!(err.contains(expected), "{}: {err}", rule.display());
    }
}
