//! Rules in JavaScript and Python, through the real binary: the reference rule built in Rust,
//! JavaScript and Python passes the same scenario file; a server hot-reloads Rust → JavaScript →
//! Python under traffic with no failed request and the log replays through all three with zero
//! differences; rules that read clocks, draw random numbers and print replay with zero
//! differences; `turnstile new --lang js|python` + `turnstile build` + `turnstile test` work.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::support::{Server, ServerArgs, body, guests, run_cli, turnstile_bin};

const TOKEN: &str = "test-admin-token";

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The reference rule in each language: (language, component).
const REFERENCE_RULES: [(&str, &str); 3] = [
    ("rust", guests::RESERVATION),
    ("js", guests::RESERVATION_JS),
    ("python", guests::RESERVATION_PY),
];

/// `turnstile replay --json` of `data_dir` through `rule`.
fn replay(data_dir: &Path, rule: &str) -> Value {
    let (ok, stdout, stderr) = run_cli(&[
        "replay",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--rule",
        rule,
        "--json",
    ]);
    assert!(ok, "replay through {rule} failed: {stderr}");
    serde_json::from_str(&stdout).unwrap()
}

/// `PUT /v1/admin/rule` of the component at `rule`. The answer comes once the component is
/// compiled, which takes tens of seconds of one core for an interpreter (far more in a debug
/// build): a client without the support client's time-out.
async fn install(server: &Server, rule: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .put(format!("{}/v1/admin/rule", server.url))
        .bearer_auth(TOKEN)
        .body(std::fs::read(rule).unwrap())
        .send()
        .await
        .expect("PUT /v1/admin/rule");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON answer"))
}

/// guest/rules/reservation/scenarios.toml, unchanged, passes against the Rust, JavaScript and
/// Python builds of the reference rule, with the default limits.
#[test]
fn reference_scenarios_pass_in_every_language() {
    let scenarios = workspace().join("guest/rules/reservation/scenarios.toml");
    for (language, rule) in REFERENCE_RULES {
        let (ok, stdout, stderr) = run_cli(&["test", rule, scenarios.to_str().unwrap()]);
        assert!(ok, "{language}:\n{stdout}\n{stderr}");
        assert!(
            stdout.contains("scenarios: 10 passed, 0 failed"),
            "{language}:\n{stdout}"
        );
    }
}

/// Clients reserve and associate without pause while the server moves from the Rust reference
/// rule to the JavaScript one and then to the Python one: every request succeeds, all three
/// versions decide some of them, and the log replays through each of the three with zero
/// differences.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_reload_rust_js_python_under_traffic_then_replay_agrees() {
    const CLIENTS: usize = 2;
    // Paced traffic: requests keep arriving through both installs (tens of seconds each, the
    // components compiling), while the log stays small enough to replay three times.
    const PAUSE: Duration = Duration::from_millis(500);
    let dir = tempfile::tempdir().unwrap();
    let server = Arc::new(Server::start_with(
        ServerArgs::default()
            .config(&format!("[admin]\ntoken = \"{TOKEN}\"\n"))
            .data_dir(dir.path())
            .rule(guests::RESERVATION),
    ));
    // True until both installs are done.
    let running = Arc::new(AtomicBool::new(true));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (server, running) = (server.clone(), running.clone());
        clients.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            let (mut round, mut rounds_after_installs) = (0, 0);
            // Three rounds after the last install, so the last rule decides some requests too.
            while rounds_after_installs < 3 {
                if !running.load(Ordering::Relaxed) {
                    rounds_after_installs += 1;
                }
                let (key, user) = (format!("R-{c}-{round}"), format!("user-{c}-{round}"));
                for (kind, key) in [("reserve", Some(key.as_str())), ("associate", None)] {
                    let (status, answer) = server.request(body(kind, key, &user)).await;
                    assert_eq!(status, 200, "{kind} failed during reload: {answer}");
                    versions.push(
                        answer["state"]["rule_version"]
                            .as_str()
                            .unwrap()
                            .to_string(),
                    );
                }
                // Rejects must agree across languages too.
                let (status, answer) = server.request(body("reserve", Some(&key), "other")).await;
                assert_eq!(status, 409, "{answer}");
                round += 1;
                tokio::time::sleep(PAUSE).await;
            }
            versions
        }));
    }
    for rule in [guests::RESERVATION_JS, guests::RESERVATION_PY] {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (status, answer) = install(&server, rule).await;
        assert_eq!(status, 200, "installing {rule}: {answer}");
    }
    running.store(false, Ordering::Relaxed);
    let mut deciders = std::collections::BTreeSet::new();
    for client in clients {
        deciders.extend(client.await.unwrap());
    }
    for (language, rule) in REFERENCE_RULES {
        let version = turnstile::sandbox::version_id(&std::fs::read(rule).unwrap());
        assert!(
            deciders.contains(&version),
            "no request was decided by the {language} rule"
        );
    }
    let server = Arc::into_inner(server).expect("clients are done");
    assert!(server.terminate());

    for (language, rule) in REFERENCE_RULES {
        let report = replay(dir.path(), rule);
        assert!(report["decisions"].as_u64().unwrap() > 0, "{report}");
        assert_eq!(report["different"], 0, "{language}: {report}");
        assert_eq!(report["errors"], 0, "{language}: {report}");
    }
}

/// Rules that read the clocks, draw random numbers (language generator and OS randomness) and
/// print, in JavaScript and Python: their outcomes depend on all of that, and replaying the log
/// through the same rule gives zero differences; two requests draw different numbers.
#[tokio::test(flavor = "multi_thread")]
async fn determinism_rules_replay_with_zero_differences() {
    for (language, rule, random_field) in [
        ("js", guests::DET_JS, "math_random"),
        ("python", guests::DET_PY, "random"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start_with(ServerArgs::default().data_dir(dir.path()).rule(rule));
        let mut draws = std::collections::BTreeSet::new();
        for i in 0..12 {
            // Keys repeat, so later calls also carry the earlier data in `previous`.
            let key = format!("D-{}", i % 4);
            let (status, answer) = server.request(body("draw", Some(&key), "alice")).await;
            assert_eq!(status, 200, "{language}: {answer}");
            let data = &answer["state"]["data"];
            draws.insert(data[random_field].to_string());
        }
        assert!(
            draws.len() > 1,
            "{language}: every request drew the same number: {draws:?}"
        );
        assert!(server.terminate());
        let report = replay(dir.path(), rule);
        assert_eq!(report["decisions"], 12, "{language}: {report}");
        assert_eq!(report["different"], 0, "{language}: {report}");

        // An uncaught exception: the failure names it (the interpreter printed it to stderr
        // before trapping), not only wasm's `unreachable`.
        let server = Server::start_with(ServerArgs::default().rule(rule));
        let (status, answer) = server.request(body("throw", Some("T-1"), "bob")).await;
        assert_eq!(status, 500, "{language}: {answer}");
        assert_eq!(answer["error"]["code"], "rule_trap", "{language}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("refused T-1"),
            "{language}: the exception's message is not in the failure: {answer}"
        );
    }
}

/// `turnstile test` shows what a JavaScript or Python rule printed to stdout (`--nocapture`).
#[test]
fn scenario_runner_shows_printed_lines() {
    for (language, rule, dir) in [
        ("js", guests::DET_JS, "det-js"),
        ("python", guests::DET_PY, "det-py"),
    ] {
        let scenarios = workspace().join(format!("guest/rules/{dir}/scenarios.toml"));
        let printed = format!("{dir} ");
        let (ok, stdout, stderr) =
            run_cli(&["test", rule, scenarios.to_str().unwrap(), "--nocapture"]);
        assert!(ok, "{language}:\n{stdout}\n{stderr}");
        assert!(
            stdout.contains(&printed) && stdout.contains("random="),
            "{language}: the printed line is not shown:\n{stdout}"
        );
    }
}

/// Runs `turnstile` with extra environment variables, and without a componentize-py named by
/// the test's own environment.
fn run_cli_env(args: &[&str], env: &[(&str, &Path)]) -> (bool, String, String) {
    let mut command = Command::new(turnstile_bin());
    command
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("TURNSTILE_COMPONENTIZE_PY");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("running turnstile");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `turnstile new --lang js` and `--lang python` give projects outside the checkout that say how
/// to install their toolchain when it is missing, and once it is there build with
/// `turnstile build` and pass their own scenarios.
#[test]
fn new_js_and_python_projects_build_and_pass_their_scenarios() {
    let dir = tempfile::tempdir().unwrap();
    assert!(!dir.path().starts_with(workspace()));
    let target = dir.path().join("target");
    let componentize_py = workspace().join("guest/python/.venv/bin/componentize-py");

    for language in ["js", "python"] {
        let project = dir.path().join(format!("door-{language}"));
        let (ok, stdout, stderr) = run_cli(&["new", project.to_str().unwrap(), "--lang", language]);
        assert!(ok, "{language}: {stdout}\n{stderr}");
        let build = [
            "build",
            project.to_str().unwrap(),
            "--target-dir",
            target.to_str().unwrap(),
        ];

        // Without the toolchain: refused, naming how to install it.
        let (ok, _, stderr) = match language {
            "js" => run_cli(&build),
            _ => run_cli_env(&build, &[("PATH", Path::new("/usr/bin:/bin"))]),
        };
        assert!(!ok, "{language}: built without its toolchain");
        let hint = if language == "js" {
            "npm install"
        } else {
            "componentize-py==0.25.1"
        };
        assert!(
            stderr.contains(hint),
            "{language}: no install hint:\n{stderr}"
        );

        let (ok, stdout, stderr) = match language {
            "js" => {
                let installed = Command::new("npm")
                    .args(["install", "--prefer-offline", "--no-audit", "--no-fund"])
                    .current_dir(&project)
                    .output()
                    .expect("running npm");
                assert!(
                    installed.status.success(),
                    "npm install: {}",
                    String::from_utf8_lossy(&installed.stderr)
                );
                run_cli(&build)
            }
            _ => run_cli_env(&build, &[("TURNSTILE_COMPONENTIZE_PY", &componentize_py)]),
        };
        assert!(ok, "{language}: {stdout}\n{stderr}");
        assert!(stdout.contains("version "), "{stdout}");
        let component = target.join(format!("components/door-{language}.wasm"));
        let scenarios = project.join("scenarios.toml");
        let (ok, stdout, stderr) = run_cli(&[
            "test",
            component.to_str().unwrap(),
            scenarios.to_str().unwrap(),
        ]);
        assert!(ok, "{language}: {stdout}\n{stderr}");
        assert!(
            stdout.contains("scenarios: 2 passed, 0 failed"),
            "{language}: {stdout}"
        );
    }
}

/// The TypeScript types committed in guest/js/types are what `jco types` (the SDK's
/// `npm run types`) generates from the current wit/rule.wit.
#[test]
fn js_types_are_generated_from_the_current_wit() {
    let out = tempfile::tempdir().unwrap();
    let sdk = workspace().join("guest/js");
    let generated = Command::new("node")
        .arg(sdk.join("node_modules/.bin/jco"))
        .args([
            "types",
            "../../wit",
            "--world-name",
            "rule",
            "--quiet",
            "--out-dir",
        ])
        .arg(out.path())
        .current_dir(&sdk)
        .output()
        .expect("running jco types");
    assert!(
        generated.status.success(),
        "jco types: {}",
        String::from_utf8_lossy(&generated.stderr)
    );
    for file in ["rule.d.ts", "interfaces/turnstile-rule-types.d.ts"] {
        let fresh = std::fs::read_to_string(out.path().join(file)).unwrap();
        let committed = std::fs::read_to_string(sdk.join("types").join(file)).unwrap();
        assert_eq!(
            committed, fresh,
            "guest/js/types/{file} is stale: run `npm run types` in guest/js"
        );
    }
}

/// The compile cache (`TURNSTILE_COMPILE_CACHE`): a checked component leaves one entry, which the
/// next load uses instead of compiling; an entry with a flipped byte is compiled again and
/// rewritten; the compile budget holds for a cached component as for a cold one; a cache
/// directory others can write to is not used.
#[test]
fn compiled_components_are_cached_and_a_damaged_entry_is_compiled_again() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let env = [("TURNSTILE_COMPILE_CACHE", cache.as_path())];
    let entries = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&cache)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
                    .collect()
            })
            .unwrap_or_default()
    };

    let (ok, _, stderr) = run_cli_env(&["check", guests::RESERVATION], &env);
    assert!(ok, "check failed: {stderr}");
    let [entry] = entries().try_into().expect("one cache entry after a check");
    let original = std::fs::read(&entry).unwrap();
    assert_eq!(
        std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777,
        0o700,
        "the cache directory is private"
    );

    // A flipped byte in the compiled code: refused by the digest, compiled again, rewritten.
    let mut damaged = original.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x01;
    std::fs::write(&entry, &damaged).unwrap();
    let (ok, _, stderr) = run_cli_env(&["check", guests::RESERVATION], &env);
    assert!(ok, "check with a damaged cache entry failed: {stderr}");
    let rewritten = std::fs::read(&entry).unwrap();
    assert_ne!(rewritten, damaged, "the damaged entry was kept");
    assert_eq!(
        rewritten.len(),
        original.len(),
        "the entry was not rewritten with the compiled component"
    );

    // The entry remembers its compilation's CPU time (ms, little-endian, after 16 magic bytes);
    // a budget below it refuses the cached component as it would refuse a cold compilation.
    let cpu_ms = u64::from_le_bytes(rewritten[16..24].try_into().unwrap());
    assert!(
        cpu_ms >= 2,
        "compiling the reference rule took {cpu_ms} ms of CPU: too little for this check"
    );
    let config = dir.path().join("tight.toml");
    std::fs::write(&config, "[rule]\nmax_compile_ms = 1\n").unwrap();
    let (ok, _, stderr) = run_cli_env(
        &[
            "check",
            guests::RESERVATION,
            "--config",
            config.to_str().unwrap(),
        ],
        &env,
    );
    assert!(
        !ok,
        "a cached component over the compile budget was accepted"
    );
    assert!(
        stderr.contains("rule.max_compile_ms"),
        "the refusal does not name the budget: {stderr}"
    );

    // An entry belongs to its component: another component's entry put at its name (renamed or
    // copied) is not run; the component is compiled again and its own entry written.
    let (ok, _, stderr) = run_cli_env(&["check", guests::ECHO], &env);
    assert!(ok, "check of the echo rule failed: {stderr}");
    let echo_entry = entries()
        .into_iter()
        .find(|p| *p != entry)
        .expect("an entry for the echo rule");
    let echo_bytes = std::fs::read(&echo_entry).unwrap();
    std::fs::write(&entry, &echo_bytes).unwrap();
    let (ok, _, stderr) = run_cli_env(&["check", guests::RESERVATION], &env);
    assert!(ok, "check with another component's entry failed: {stderr}");
    assert_ne!(
        std::fs::read(&entry).unwrap(),
        echo_bytes,
        "another component's entry was kept under the reference rule's name"
    );

    // What sits at an entry's name is opened without following a link and without waiting: a
    // symbolic link (here to the echo rule's entry) and a FIFO are not read, the component is
    // compiled and a regular entry takes their place.
    std::fs::remove_file(&entry).unwrap();
    std::os::unix::fs::symlink(&echo_entry, &entry).unwrap();
    let (ok, _, stderr) = run_cli_env(&["check", guests::RESERVATION], &env);
    assert!(ok, "check with a symlinked entry failed: {stderr}");
    assert!(
        std::fs::symlink_metadata(&entry).unwrap().is_file(),
        "the symbolic link is still at the entry's name"
    );
    std::fs::remove_file(&entry).unwrap();
    let fifo = Command::new("mkfifo").arg(&entry).status().unwrap();
    assert!(fifo.success(), "mkfifo failed");
    let mut child = Command::new(turnstile_bin())
        .args(["check", guests::RESERVATION])
        .env("TURNSTILE_COMPILE_CACHE", &cache)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.is_some_and(|s| s.success()),
        "check with a FIFO at the entry's name hung or failed: {status:?}"
    );

    // A directory others can write to is not trusted: nothing is read from or written to it.
    std::fs::remove_file(&entry).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    for entry in entries() {
        std::fs::remove_file(entry).unwrap();
    }
    let (ok, _, stderr) = run_cli_env(&["check", guests::RESERVATION], &env);
    assert!(ok, "check with an open cache directory failed: {stderr}");
    assert!(
        entries().is_empty(),
        "an entry was written to a directory others can write to"
    );
    assert!(
        stderr.contains("not private"),
        "check did not warn that the cache directory is not used: {stderr}"
    );
}
