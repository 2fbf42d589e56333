//! The rule author's toolkit, through the real binary: `turnstile test` (scenarios, diffs,
//! JUnit, coverage), `turnstile check`, and `turnstile replay` (shadow evaluation, read-only).

use std::collections::BTreeMap;
use std::path::Path;

use crate::support::{Server, ServerArgs, body, guests, run_cli};

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The reference rule's and the example rule's own scenario files pass, through `turnstile test`.
#[test]
fn shipped_scenarios_pass() {
    for (rule, scenarios, count) in [
        (
            guests::RESERVATION,
            "guest/rules/reservation/scenarios.toml",
            10,
        ),
        (
            guests::EXPIRING_HOLD,
            "guest/rules/expiring-hold/scenarios.toml",
            4,
        ),
    ] {
        let scenarios = workspace().join(scenarios);
        let (ok, stdout, stderr) = run_cli(&["test", rule, scenarios.to_str().unwrap()]);
        assert!(ok, "{stdout}\n{stderr}");
        assert!(
            stdout.contains(&format!("scenarios: {count} passed, 0 failed")),
            "{stdout}"
        );
        assert!(stdout.contains("coverage"), "{stdout}");
    }
}

/// A wrong expectation fails with a readable diff, a non-zero exit and a failure in JUnit.
#[test]
fn failing_scenario_shows_a_diff_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let scenarios = dir.path().join("wrong.toml");
    std::fs::write(
        &scenarios,
        r#"
[[scenario]]
name = "right"
[[scenario.step]]
kind = "reserve"
key = "K"
user = "alice"
expect = "transition"
status = "reserved"

[[scenario]]
name = "wrong <status> & \"quotes\""
[[scenario.step]]
kind = "reserve"
key = "K"
user = "alice"
expect = "transition"
status = "held"
version = 7
"#,
    )
    .unwrap();
    let junit = dir.path().join("junit.xml");
    let (ok, stdout, _) = run_cli(&[
        "test",
        guests::RESERVATION,
        scenarios.to_str().unwrap(),
        "--junit",
        junit.to_str().unwrap(),
    ]);
    assert!(!ok, "a failing scenario must fail the command");
    assert!(stdout.contains("scenario right ... ok"), "{stdout}");
    assert!(stdout.contains("... FAILED"), "{stdout}");
    assert!(stdout.contains("- expected \"held\""), "{stdout}");
    assert!(stdout.contains("+ actual   \"reserved\""), "{stdout}");
    assert!(stdout.contains("- expected 7"), "{stdout}");
    assert!(stdout.contains("scenarios: 1 passed, 1 failed"), "{stdout}");

    let xml = std::fs::read_to_string(&junit).unwrap();
    let doc = roxmltree::Document::parse(&xml).expect("well-formed JUnit XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "testsuites");
    assert_eq!(root.attribute("tests"), Some("2"));
    assert_eq!(root.attribute("failures"), Some("1"));
    let cases: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("testcase"))
        .collect();
    assert_eq!(cases.len(), 2);
    assert_eq!(
        cases[1].attribute("name"),
        Some("wrong <status> & \"quotes\"")
    );
    let failure = cases[1]
        .children()
        .find(|n| n.has_tag_name("failure"))
        .expect("a failure");
    assert!(failure.text().unwrap().contains("expected \"held\""));
    assert!(cases[0].children().all(|n| !n.has_tag_name("failure")));
}

/// `check` prints what a good component is, and refuses each kind of bad one with its reason.
#[test]
fn check_good_and_bad_modules() {
    let (ok, stdout, stderr) = run_cli(&["check", guests::RESERVATION]);
    assert!(ok, "{stderr}");
    for line in [
        "version ",
        "size ",
        "imports turnstile:rule/types@0.1.0",
        "exports handle",
    ] {
        assert!(stdout.contains(line), "{stdout}");
    }

    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"garbage").unwrap();
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let small = dir.path().join("small.toml");
    std::fs::write(&small, "[rule]\nmax_module_bytes = 1000\n").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![garbage.to_str().unwrap()], "not a WebAssembly file"),
        (vec![core.to_str().unwrap()], "not a component"),
        (
            vec![guests::OTHER_WORLD],
            "does not implement the turnstile:rule world",
        ),
        (vec![guests::FORBIDDEN_IMPORT], "imports `now`"),
        (
            vec![guests::RESERVATION, "--config", small.to_str().unwrap()],
            "1000-byte limit",
        ),
    ];
    for (args, reason) in cases {
        let mut full = vec!["check"];
        full.extend(args.iter().copied());
        let (ok, _, stderr) = run_cli(&full);
        assert!(!ok, "{args:?} was accepted");
        assert!(
            stderr.contains("would be refused") && stderr.contains(reason),
            "{args:?}: {stderr}"
        );
    }
}

/// Hashes of every file under `dir`, to prove a command left it byte-for-byte unchanged.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.insert(path.display().to_string(), std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

/// Replay of a recorded data dir: the running rule changes nothing, a candidate that changes one
/// policy changes exactly the decisions it should, and the data dir is left untouched.
#[tokio::test(flavor = "multi_thread")]
async fn replay_reports_exact_differences_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(ServerArgs::default().data_dir(dir.path()));
    let send = |kind: &'static str, key: String, user: String| {
        let server = &server;
        async move { server.request(body(kind, Some(&key), &user)).await.0 }
    };
    for u in 0..30 {
        assert_eq!(
            send("reserve", format!("K-{u}"), format!("u-{u}")).await,
            200
        );
    }
    for u in 0..10 {
        assert_eq!(
            send("associate", format!("K-{u}"), format!("u-{u}")).await,
            200
        );
    }
    // Re-reserve by the holder: rejected now, a refresh under v2 (6 differences).
    for u in 10..16 {
        assert_eq!(
            send("reserve", format!("K-{u}"), format!("u-{u}")).await,
            409
        );
    }
    // Re-reserve of an associated key, and reserves by other users: rejected by both versions.
    for u in 0..4 {
        assert_eq!(
            send("reserve", format!("K-{u}"), format!("u-{u}")).await,
            409
        );
    }
    for u in 20..25 {
        assert_eq!(
            send("reserve", format!("K-{u}"), "intruder".into()).await,
            409
        );
    }
    assert!(server.terminate());
    let before = snapshot(dir.path());

    let data_dir = dir.path().to_str().unwrap();
    let (ok, stdout, stderr) = run_cli(&[
        "replay",
        "--data-dir",
        data_dir,
        "--rule",
        guests::RESERVATION,
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let same: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(same["decisions"], 55);
    assert_eq!(same["different"], 0);
    assert_eq!(same["same"], 55);

    let (ok, stdout, stderr) = run_cli(&[
        "replay",
        "--data-dir",
        data_dir,
        "--rule",
        guests::RESERVATION_V2,
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let changed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(changed["decisions"], 55);
    assert_eq!(changed["different"], 6);
    let groups = changed["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(groups[0]["kind"], "reserve");
    assert_eq!(groups[0]["logged"], "reject");
    assert_eq!(groups[0]["candidate"], "transition:reserved");
    assert_eq!(groups[0]["count"], 6);
    assert_eq!(changed["examples"].as_array().unwrap().len(), 5);

    let (ok, text, _) = run_cli(&[
        "replay",
        "--data-dir",
        data_dir,
        "--rule",
        guests::RESERVATION_V2,
    ]);
    assert!(ok);
    assert!(text.contains("different: 6"), "{text}");
    assert!(
        text.contains("reserve") && text.contains("reject → transition:reserved: 6"),
        "{text}"
    );

    assert_eq!(snapshot(dir.path()), before, "replay changed the data dir");
}

/// A target dir shared by the tests that build rule projects, so the SDK's dependencies are
/// compiled for wasm once per checkout and not once per test.
fn shared_rule_target() -> std::path::PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("rule-projects")
}

/// Every file under `dir` (but `target/`) as text, for looking for paths that must not be there.
fn project_text(dir: &Path) -> String {
    snapshot(dir)
        .into_iter()
        .filter(|(path, _)| !path.contains("/target/"))
        .map(|(path, bytes)| format!("{path}\n{}\n", String::from_utf8_lossy(&bytes)))
        .collect()
}

/// `turnstile new` gives a project outside the repository that builds and passes its own
/// scenarios at once, with no path into this checkout (the SDK is vendored, its one dependency
/// comes from crates.io), and refuses to overwrite.
#[test]
fn new_project_builds_and_tests_green_outside_the_checkout() {
    let dir = tempfile::tempdir().unwrap();
    assert!(!dir.path().starts_with(workspace()));
    let project = dir.path().join("door-keeper");
    let (ok, stdout, stderr) = run_cli(&["new", project.to_str().unwrap()]);
    assert!(ok, "{stdout}\n{stderr}");
    let text = project_text(&project);
    assert!(
        !text.contains(workspace().to_str().unwrap()),
        "the project refers to the checkout:\n{text}"
    );
    // The vendored SDK uses the wit-bindgen this repository builds the SDK with.
    let root_manifest = std::fs::read_to_string(workspace().join("Cargo.toml")).unwrap();
    let sdk_manifest = std::fs::read_to_string(project.join("sdk/Cargo.toml")).unwrap();
    let pinned = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("wit-bindgen = "))
            .and_then(|l| l.split('"').nth(1).map(String::from))
            .unwrap()
    };
    assert_eq!(pinned(&root_manifest), pinned(&sdk_manifest));

    let out = dir.path().join("door-keeper.wasm");
    let target = shared_rule_target();
    let (ok, stdout, stderr) = run_cli(&[
        "build",
        project.to_str().unwrap(),
        "--target-dir",
        target.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("version "), "{stdout}");
    let scenarios = project.join("scenarios.toml");
    let (ok, stdout, stderr) =
        run_cli(&["test", out.to_str().unwrap(), scenarios.to_str().unwrap()]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("scenarios: 2 passed, 0 failed"), "{stdout}");

    // Names are stripped by default and kept by --debug, for backtraces that name the rule.
    let release = std::fs::read(&out).unwrap();
    let debug_out = dir.path().join("door-keeper-debug.wasm");
    let (ok, stdout, stderr) = run_cli(&[
        "build",
        project.to_str().unwrap(),
        "--debug",
        "--target-dir",
        target.to_str().unwrap(),
        "--out",
        debug_out.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    let debug = std::fs::read(&debug_out).unwrap();
    // The SDK's function names (its own functions are never all inlined away).
    let names_rule = |bytes: &[u8]| bytes.windows(14).any(|w| w == b"turnstile_rule");
    assert!(!names_rule(&release), "the default build kept names");
    assert!(names_rule(&debug), "--debug lost the rule's names");

    let (ok, _, stderr) = run_cli(&["new", project.to_str().unwrap()]);
    assert!(!ok, "an existing directory was overwritten");
    assert!(stderr.contains("already exists"), "{stderr}");
    let (ok, _, _) = run_cli(&["new", dir.path().join("Bad Name").to_str().unwrap()]);
    assert!(!ok, "an unusable package name was accepted");
}

/// The same rule source built from two directories, each with its own target dir and its own
/// `CARGO_HOME` path, gets the same version id: the paths that end up in panic locations (here
/// serde_json's, from the registry) are remapped to fixed names.
#[test]
fn version_id_is_the_same_from_two_directories() {
    let dir = tempfile::tempdir().unwrap();
    let real_home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(&std::env::var_os("HOME").unwrap()).join(".cargo"));
    let mut versions = Vec::new();
    for copy in ["a", "b"] {
        let project = dir.path().join(copy).join("repro");
        std::fs::create_dir_all(project.parent().unwrap()).unwrap();
        let (ok, _, stderr) = run_cli(&["new", project.to_str().unwrap()]);
        assert!(ok, "{stderr}");
        // A registry dependency whose generic code carries its source path into the rule.
        let manifest = project.join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest).unwrap().replace(
            "turnstile-rule = { path = \"sdk\" }",
            "turnstile-rule = { path = \"sdk\" }\nserde_json = \"1\"",
        );
        std::fs::write(&manifest, text).unwrap();
        let lib = project.join("src/lib.rs");
        let text = std::fs::read_to_string(&lib).unwrap().replace(
            "Outcome::transition(\"inside\", \"{}\")",
            "Outcome::transition(\"inside\", serde_json::from_str::<serde_json::Value>(&request.payload).unwrap_or_default().to_string())",
        );
        std::fs::write(&lib, text).unwrap();
        // Another CARGO_HOME path over the same registry: no download, different paths.
        let home = dir.path().join(copy).join("cargo-home");
        std::fs::create_dir_all(&home).unwrap();
        std::os::unix::fs::symlink(real_home.join("registry"), home.join("registry")).unwrap();
        // One build names its target dir with the flag, the other with CARGO_TARGET_DIR.
        let target = dir.path().join(copy).join("target");
        let mut build = std::process::Command::new(crate::support::turnstile_bin());
        build
            .args(["build", project.to_str().unwrap()])
            .env("CARGO_HOME", &home);
        if copy == "a" {
            build
                .arg("--target-dir")
                .arg(&target)
                .env_remove("CARGO_TARGET_DIR");
        } else {
            build.env("CARGO_TARGET_DIR", &target);
        }
        let output = build.output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let version = stdout
            .lines()
            .find_map(|l| l.strip_prefix("version "))
            .unwrap()
            .to_string();
        assert!(target.join("components/repro.wasm").exists(), "{stdout}");
        versions.push(version);
    }
    assert_eq!(
        versions[0], versions[1],
        "the version id depends on where it was built"
    );
}

/// A panicking rule's message and location reach the 500 answer, the dead letter and
/// `turnstile test`'s output (the SDK's panic hook hands them to the host before the trap).
#[tokio::test(flavor = "multi_thread")]
async fn panic_message_reaches_the_answer_the_dead_letter_and_test_output() {
    const PANIC: &str = "the rule panicked on purpose";
    let server = Server::start_with(
        ServerArgs::default()
            .rule(guests::MISBEHAVE)
            .config("[admin]\ntoken = \"t\"\n"),
    );
    let (status, answer) = server
        .request(serde_json::json!({"kind": "panic", "key": "P", "user": "u"}))
        .await;
    assert_eq!(status, 500);
    assert_eq!(answer["error"]["code"], "rule_trap");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains(PANIC), "{answer}");
    assert!(message.contains("src/lib.rs:"), "no location: {answer}");
    let (_, letters) = server
        .admin("GET", "/v1/dead-letters", None, Some("t"))
        .await;
    let letter = &letters["dead_letters"][0];
    assert!(
        letter["failure"]["message"]
            .as_str()
            .unwrap()
            .contains(PANIC),
        "{letters}"
    );

    let dir = tempfile::tempdir().unwrap();
    let scenarios = dir.path().join("panic.toml");
    std::fs::write(
        &scenarios,
        "[[scenario]]\nname = \"panics\"\n[[scenario.step]]\nkind = \"panic\"\nkey = \"P\"\nuser = \"u\"\nexpect = \"transition\"\n",
    )
    .unwrap();
    let (ok, stdout, _) = run_cli(&["test", guests::MISBEHAVE, scenarios.to_str().unwrap()]);
    assert!(!ok);
    assert!(stdout.contains(PANIC), "{stdout}");
}

/// Writes `text` to `dir/name` and returns the path as a string.
fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// `--filter` runs only the matching scenarios; a failure names its scenario's and its step's
/// file:line; `expect_key`, `exact_reason` and `absent` are checked.
#[test]
fn filter_runs_one_scenario_and_failures_point_at_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let scenarios = write(
        dir.path(),
        "s.toml",
        r#"[[scenario]]
name = "reserve and associate"
[[scenario.step]]
kind = "reserve"
key = "K"
user = "alice"
expect = "transition"
absent = ["associated_at_ms"]
[[scenario.step]]
kind = "associate"
user = "alice"
expect = "transition"
expect_key = "K"

[[scenario]]
name = "double reserve"
[[scenario.step]]
kind = "reserve"
key = "K"
user = "alice"
expect = "transition"
[[scenario.step]]
kind = "reserve"
key = "K"
user = "bob"
expect = "reject"
exact_reason = "key is already reserved"
expect_key = "K"

[[scenario]]
name = "broken on purpose"
[[scenario.step]]
kind = "reserve"
key = "K"
user = "alice"
expect = "transition"
[[scenario.step]]
kind = "associate"
user = "alice"
expect = "transition"
expect_key = "other"
absent = ["reserved_at_ms"]
"#,
    );
    let (ok, stdout, stderr) = run_cli(&[
        "test",
        guests::RESERVATION,
        &scenarios,
        "--filter",
        "reserve",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("scenarios: 2 passed, 0 failed, 1 filtered out"),
        "{stdout}"
    );
    assert!(!stdout.contains("broken on purpose"), "{stdout}");

    let (ok, stdout, _) = run_cli(&[
        "test",
        guests::RESERVATION,
        &scenarios,
        "--filter",
        "broken",
    ]);
    assert!(!ok);
    assert!(
        stdout.contains("scenarios: 0 passed, 1 failed, 2 filtered out"),
        "{stdout}"
    );
    assert!(stdout.contains("s.toml:30)"), "scenario line: {stdout}");
    assert!(
        stdout.contains("step 2 (") && stdout.contains("s.toml:37)"),
        "step line: {stdout}"
    );
    assert!(stdout.contains("- expected \"other\""), "{stdout}");
    assert!(stdout.contains("data.reserved_at_ms"), "{stdout}");

    let (ok, _, stderr) = run_cli(&[
        "test",
        guests::RESERVATION,
        &scenarios,
        "--filter",
        "nothing like it",
    ]);
    assert!(!ok, "a filter that matches nothing passed");
    assert!(
        stderr.contains("2 filtered out") || stderr.contains("3 filtered out"),
        "{stderr}"
    );
}

/// Assertions that cannot apply, scenarios without steps, and broken or missing files are all
/// refused before anything runs, every problem reported at once with its file:line.
#[test]
fn impossible_assertions_and_every_bad_file_are_refused_together() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        dir.path(),
        "good.toml",
        "[[scenario]]\nname = \"fine\"\n[[scenario.step]]\nkind = \"reserve\"\nkey = \"K\"\nuser = \"a\"\nexpect = \"transition\"\n",
    );
    let impossible = write(
        dir.path(),
        "impossible.toml",
        r#"[[scenario]]
name = "no steps"

[[scenario]]
name = "reason on a transition"
[[scenario.step]]
kind = "reserve"
key = "K"
user = "a"
expect = "transition"
reason = "x"
code = "rule_trap"

[[scenario]]
name = "status on a reject"
[[scenario.step]]
kind = "reserve"
key = "K"
user = "a"
expect = "reject"
status = "reserved"
version = 1
data = { a = 1 }
"#,
    );
    let broken = write(dir.path(), "broken.toml", "[[scenario]\nname = ");
    let missing = dir.path().join("missing.toml");
    let (ok, stdout, stderr) = run_cli(&[
        "test",
        guests::RESERVATION,
        &good,
        &impossible,
        &broken,
        missing.to_str().unwrap(),
    ]);
    assert!(!ok, "{stdout}");
    assert!(
        !stdout.contains("scenario fine"),
        "ran before refusing: {stdout}"
    );
    assert!(stderr.contains("3 of 4 scenario files"), "{stderr}");
    for expected in [
        "impossible.toml:1:",
        "impossible.toml:6:",
        "reason, code",
        "impossible.toml:16:",
        "status, version, data",
        "broken.toml",
        "missing.toml",
    ] {
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
}

/// Names, kinds, keys, users and reasons with control characters still give JUnit XML that a
/// real XML parser accepts.
#[test]
fn junit_with_control_characters_parses() {
    let dir = tempfile::tempdir().unwrap();
    let scenarios = write(
        dir.path(),
        "ctl.toml",
        "[[scenario]]\nname = \"bell \\u0007 escape \\u001b[31m <&>\"\n[[scenario.step]]\nkind = \"res\\u001berve\"\nkey = \"K\\u0001\"\nuser = \"u\\u0002\"\nexpect = \"transition\"\n",
    );
    let junit = dir.path().join("junit.xml");
    let (ok, stdout, _) = run_cli(&[
        "test",
        guests::RESERVATION,
        &scenarios,
        "--junit",
        junit.to_str().unwrap(),
    ]);
    assert!(
        !ok,
        "the unknown kind is rejected, so the step fails: {stdout}"
    );
    let xml = std::fs::read_to_string(&junit).unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{e}: {xml}"));
    let case = doc
        .descendants()
        .find(|n| n.has_tag_name("testcase"))
        .unwrap();
    assert!(case.attribute("name").unwrap().contains("<&>"));
    assert!(case.children().any(|n| n.has_tag_name("failure")));
}

/// Coverage credits the rule only with its own decisions: an answer replayed from the dedup
/// table and an `id_conflict` are not counted, and `[coverage]` lists the pairs that never ran.
#[test]
fn coverage_counts_only_rule_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let scenarios = write(
        dir.path(),
        "cov.toml",
        r#"[coverage]
statuses = ["reserved", "associated"]
kinds = ["reserve", "associate"]

[[scenario]]
name = "retries"
[[scenario.step]]
kind = "reserve"
key = "K"
user = "a"
id = "r-1"
expect = "transition"
[[scenario.step]]
kind = "reserve"
key = "K"
user = "a"
id = "r-1"
expect = "transition"
[[scenario.step]]
kind = "reserve"
key = "K"
user = "b"
id = "r-1"
expect = "error"
code = "id_conflict"
"#,
    );
    let (ok, stdout, stderr) = run_cli(&["test", guests::RESERVATION, &scenarios]);
    assert!(ok, "{stdout}\n{stderr}");
    let coverage: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("coverage"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    assert_eq!(coverage.len(), 1, "{stdout}");
    assert!(coverage[0].contains("(none, reserve)"), "{stdout}");
    let never: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("never ran"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    assert_eq!(
        never.len(),
        5,
        "3 statuses × 2 kinds, less the one that ran: {stdout}"
    );
    assert!(
        never.iter().any(|l| l.contains("(reserved, reserve)")),
        "{stdout}"
    );
}

/// Runs the binary and returns its exit code and stdout.
fn run_with_code(args: &[&str]) -> (i32, String) {
    let output = std::process::Command::new(crate::support::turnstile_bin())
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// Replay as a release gate: exit 0 when the candidate agrees, 2 on differences with
/// `--fail-on-diff`, 3 on candidate failures with `--fail-on-error`; counts are broken down by
/// the rule version that made each logged decision, and the JUnit file parses.
#[tokio::test(flavor = "multi_thread")]
async fn replay_gates_a_release_with_exit_codes_and_per_version_counts() {
    const TOKEN: &str = "replay-token";
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        ServerArgs::default()
            .data_dir(dir.path())
            .config(&format!("[admin]\ntoken = \"{TOKEN}\"\n")),
    );
    for u in 0..5 {
        let (status, _) = server
            .request(body("reserve", Some(&format!("K-{u}")), &format!("u-{u}")))
            .await;
        assert_eq!(status, 200);
    }
    // Rejected by the reference rule (unknown kind), so logged; the candidate below traps on it.
    assert_eq!(
        server.request(body("panic", Some("K-0"), "u-0")).await.0,
        409
    );
    let v2 = std::fs::read(guests::RESERVATION_V2).unwrap();
    let (status, answer) = server
        .admin("PUT", "/v1/admin/rule", Some(v2), Some(TOKEN))
        .await;
    assert_eq!(status, 200, "{answer}");
    for u in 10..13 {
        let (status, _) = server
            .request(body("reserve", Some(&format!("K-{u}")), &format!("u-{u}")))
            .await;
        assert_eq!(status, 200);
    }
    assert!(server.terminate());
    let data_dir = dir.path().to_str().unwrap();

    let (code, stdout) = run_with_code(&[
        "replay",
        "--data-dir",
        data_dir,
        "--rule",
        guests::RESERVATION,
        "--json",
        "--fail-on-diff",
        "--fail-on-error",
    ]);
    assert_eq!(code, 0, "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let versions = report["by_rule_version"].as_array().unwrap();
    assert_eq!(versions.len(), 2, "{report}");
    assert_eq!(versions[0]["decisions"], 6);
    assert_eq!(versions[1]["decisions"], 3);
    assert_eq!(
        versions[1]["rule_version"],
        turnstile::sandbox::version_id(&std::fs::read(guests::RESERVATION_V2).unwrap())
    );

    let junit = dir.path().join("replay.xml");
    let base = [
        "replay",
        "--data-dir",
        data_dir,
        "--rule",
        guests::MISBEHAVE,
    ];
    let (code, _) = run_with_code(
        &[
            &base[..],
            &["--fail-on-diff", "--junit", junit.to_str().unwrap()],
        ]
        .concat(),
    );
    assert_eq!(code, 2);
    let (code, _) = run_with_code(&[&base[..], &["--fail-on-diff", "--fail-on-error"]].concat());
    assert_eq!(code, 3);
    let (code, stdout) = run_with_code(&[&base[..], &["--json"]].concat());
    assert_eq!(code, 0, "no gate asked for");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["errors"], 1);
    assert_eq!(report["different"], 9);

    let xml = std::fs::read_to_string(&junit).unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let cases: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("testcase"))
        .collect();
    assert_eq!(cases.len(), 2);
    assert!(
        cases
            .iter()
            .all(|c| c.children().any(|n| n.has_tag_name("failure")))
    );
}

/// The rule's log lines are shown for a failing step, for every step with `--nocapture`, and a
/// rule that logs in a loop is cut to a bounded number of lines.
#[test]
fn rule_log_lines_are_shown_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let scenarios = write(
        dir.path(),
        "log.toml",
        r#"[[scenario]]
name = "chatty passes"
[[scenario.step]]
kind = "chatty"
key = "K"
user = "u"
expect = "transition"

[[scenario]]
name = "chatty fails"
[[scenario.step]]
kind = "chatty"
key = "K"
user = "u"
expect = "reject"
"#,
    );
    let (ok, stdout, _) = run_cli(&["test", guests::MISBEHAVE, &scenarios]);
    assert!(!ok);
    let shown = stdout.matches("chatty line ").count();
    assert!(shown > 0, "no log line of the failing step: {stdout}");
    assert!(shown < 1000, "not bounded: {shown} lines");
    assert!(stdout.contains("more lines not shown"), "{stdout}");

    let (ok, stdout, _) = run_cli(&["test", guests::MISBEHAVE, &scenarios, "--filter", "passes"]);
    assert!(ok);
    assert_eq!(stdout.matches("chatty line ").count(), 0, "{stdout}");
    let (ok, stdout, _) = run_cli(&[
        "test",
        guests::MISBEHAVE,
        &scenarios,
        "--filter",
        "passes",
        "--nocapture",
    ]);
    assert!(ok);
    assert_eq!(stdout.matches("chatty line ").count(), shown, "{stdout}");
}

/// Pointing `turnstile build` at a workspace root fails at once, naming the members, before
/// anything is compiled.
#[test]
fn build_refuses_a_workspace_root_with_its_members() {
    let (ok, stdout, stderr) = run_cli(&["build", workspace().to_str().unwrap()]);
    assert!(!ok, "{stdout}");
    assert!(stderr.contains("workspace root"), "{stderr}");
    assert!(stderr.contains("guest/rules/reservation"), "{stderr}");
    assert!(!stderr.contains("Compiling"), "it compiled first: {stderr}");
}

/// `turnstile build` at a path that is not there, or at a file, says which of the two it is.
#[test]
fn build_names_a_missing_path_or_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-rule");
    let (ok, _, stderr) = run_cli(&["build", missing.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!("{} does not exist", missing.display())),
        "{stderr}"
    );
    let file = dir.path().join("rule.wasm");
    std::fs::write(&file, b"not a project").unwrap();
    let (ok, _, stderr) = run_cli(&["build", file.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("is a file, not a rule project directory"),
        "{stderr}"
    );
}

/// Operations details of issue 16: a reject answer names the rule version that decided it, an
/// install label shows in the history, and reinstalling the running version adds no entry.
#[tokio::test(flavor = "multi_thread")]
async fn rejects_carry_the_rule_version_and_installs_carry_a_label() {
    const TOKEN: &str = "label-token";
    let server = Server::start_with(
        ServerArgs::default().config(&format!("[admin]\ntoken = \"{TOKEN}\"\n")),
    );
    assert_eq!(server.request(body("reserve", Some("K"), "a")).await.0, 200);
    let (status, answer) = server.request(body("reserve", Some("K"), "b")).await;
    assert_eq!(status, 409);
    let (_, admin) = server
        .admin("GET", "/v1/admin/rule", None, Some(TOKEN))
        .await;
    assert_eq!(
        answer["rule_version"], admin["partitions"][0]["version"],
        "{answer}"
    );

    let v2 = std::fs::read(guests::RESERVATION_V2).unwrap();
    for _ in 0..2 {
        let (status, answer) = server
            .admin(
                "PUT",
                "/v1/admin/rule?label=abc1234",
                Some(v2.clone()),
                Some(TOKEN),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
    }
    let (_, admin) = server
        .admin("GET", "/v1/admin/rule", None, Some(TOKEN))
        .await;
    let history = admin["history"].as_array().unwrap();
    assert_eq!(history.len(), 1, "a reinstall added an entry: {admin}");
    assert_eq!(history[0]["label"], "abc1234");
    let (status, answer) = server
        .admin("PUT", "/v1/admin/rule?label=%1B", Some(v2), Some(TOKEN))
        .await;
    assert_eq!(status, 400, "{answer}");
}

/// `turnstile test --watch CRATE` builds and runs the scenarios, then rebuilds and reruns when
/// the rule's source changes.
#[test]
fn watch_rebuilds_and_reruns_on_change() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("watched");
    assert!(run_cli(&["new", project.to_str().unwrap()]).0);
    let out = dir.path().join("watched.wasm");
    let mut child = std::process::Command::new(crate::support::turnstile_bin())
        .args(["test", out.to_str().unwrap()])
        .arg(project.join("scenarios.toml"))
        .arg("--watch")
        .arg(&project)
        .env("CARGO_TARGET_DIR", shared_rule_target())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (lines, seen) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if lines.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    // Waits for the next summary line (a generous bound, only so a broken build cannot hang).
    let next_summary = || loop {
        let line = seen
            .recv_timeout(std::time::Duration::from_secs(600))
            .expect("the watcher stopped or hung");
        if line.starts_with("scenarios: ") {
            return line;
        }
    };
    let first = next_summary();
    assert!(
        first.starts_with("scenarios: 2 passed, 0 failed"),
        "{first}"
    );
    let lib = project.join("src/lib.rs");
    let text = std::fs::read_to_string(&lib)
        .unwrap()
        .replace("\"already inside\"", "\"already in\"");
    std::fs::write(&lib, text).unwrap();
    let second = next_summary();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        second.starts_with("scenarios: 1 passed, 1 failed"),
        "{second}"
    );
}

/// With `[rule] watch = true` and a data dir, the watched file wins: a file replaced while the
/// server was stopped is installed at the next start.
#[tokio::test(flavor = "multi_thread")]
async fn watched_file_replaced_while_stopped_wins_at_start() {
    const TOKEN: &str = "watch-token";
    let dir = tempfile::tempdir().unwrap();
    let rule = dir.path().join("rule.wasm");
    std::fs::write(&rule, std::fs::read(guests::RESERVATION).unwrap()).unwrap();
    let config = format!(
        "[admin]\ntoken = \"{TOKEN}\"\n[rule]\npath = \"{}\"\nwatch = true\nwatch_interval_ms = 50\n",
        rule.display()
    );
    let data = dir.path().join("data");
    let args = ServerArgs::default().config(&config).data_dir(&data);
    let server = Server::start_with(args.clone());
    assert_eq!(server.request(body("reserve", Some("W"), "u")).await.0, 200);
    assert!(server.terminate());

    std::fs::write(&rule, std::fs::read(guests::ECHO).unwrap()).unwrap();
    let echo = turnstile::sandbox::version_id(&std::fs::read(guests::ECHO).unwrap());
    let server = Server::start_with(args);
    let mut running = serde_json::Value::Null;
    for _ in 0..200 {
        let (_, doc) = server
            .admin("GET", "/v1/admin/rule", None, Some(TOKEN))
            .await;
        running = doc["partitions"].clone();
        if running
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["version"] == echo)
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the replaced watched file was not installed at start: {running}");
}

/// A resubmitted dead letter is marked with when and what came of it; the new failure of the
/// resubmission is a dead letter of its own, unmarked.
#[tokio::test(flavor = "multi_thread")]
async fn resubmitted_dead_letters_are_marked() {
    let server = Server::start_with(
        ServerArgs::default()
            .rule(guests::MISBEHAVE)
            .config("[admin]\ntoken = \"t\"\n"),
    );
    let (status, _) = server
        .request(serde_json::json!({"kind": "panic", "key": "DL", "user": "u", "id": "dl-1"}))
        .await;
    assert_eq!(status, 500);
    let (_, letters) = server
        .admin("GET", "/v1/dead-letters", None, Some("t"))
        .await;
    let letter = &letters["dead_letters"][0];
    assert!(letter.get("resubmitted").is_none(), "{letter}");
    let (partition, seq) = (letter["partition"].clone(), letter["seq"].clone());
    let path = format!("/v1/dead-letters/{partition}/{seq}/resubmit");
    let (status, _) = server.admin("POST", &path, None, Some("t")).await;
    assert_eq!(status, 500, "the same rule fails again");

    let (_, letters) = server
        .admin(
            "GET",
            &format!("/v1/dead-letters?partition={partition}"),
            None,
            Some("t"),
        )
        .await;
    let letters = letters["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(letters[0]["resubmitted"]["outcome"], "rule_trap");
    assert!(letters[0]["resubmitted"]["at_ms"].as_u64().unwrap() > 0);
    assert!(letters[1].get("resubmitted").is_none(), "{letters:?}");
}

/// A dead letter whose request had no client id is resubmitted under the id the host made for
/// it: resubmitting it three times at once, once a working rule is installed, applies it once.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_resubmitted_three_times_is_applied_once() {
    let server = Server::start_with(
        ServerArgs::default()
            .rule(guests::MISBEHAVE)
            .config("[admin]\ntoken = \"t\"\n"),
    );
    let (status, _) = server
        .request(serde_json::json!({"kind": "panic", "key": "DL2", "user": "u"}))
        .await;
    assert_eq!(status, 500);
    let (_, letters) = server
        .admin("GET", "/v1/dead-letters", None, Some("t"))
        .await;
    let letter = &letters["dead_letters"][0];
    let (partition, seq) = (letter["partition"].clone(), letter["seq"].clone());
    let echo = std::fs::read(guests::ECHO).unwrap();
    let (status, answer) = server
        .admin("PUT", "/v1/admin/rule", Some(echo), Some("t"))
        .await;
    assert_eq!(status, 200, "{answer}");
    let path = format!("/v1/dead-letters/{partition}/{seq}/resubmit");
    let (a, b, c) = tokio::join!(
        server.admin("POST", &path, None, Some("t")),
        server.admin("POST", &path, None, Some("t")),
        server.admin("POST", &path, None, Some("t")),
    );
    let answers = [a, b, c];
    for (status, answer) in &answers {
        assert_eq!(*status, 200, "{answer}");
        assert_eq!(answer["state"]["version"], 1, "{answer}");
    }
    let (_, state) = server.get("/v1/keys/DL2").await;
    assert_eq!(state["state"]["version"], 1, "{state}");
}

/// The same rule source and lock file give the same version id built as a crate of its own and
/// as a member of another workspace (whose root compiles it under a longer relative path).
#[test]
fn version_id_is_the_same_as_a_member_of_another_workspace() {
    let dir = tempfile::tempdir().unwrap();
    let standalone = dir.path().join("repro");
    let (ok, _, stderr) = run_cli(&["new", standalone.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    // A panic location: the rule's own source path ends up in the wasm.
    let lib = standalone.join("src/lib.rs");
    let text = std::fs::read_to_string(&lib).unwrap().replace(
        "Outcome::transition(\"inside\", \"{}\")",
        "Outcome::transition(\"inside\", request.payload.parse::<u64>().map(|n| n.to_string()).expect(\"a number\"))",
    );
    std::fs::write(&lib, text).unwrap();
    let target = dir.path().join("target");
    let build = |crate_dir: &Path| {
        let output = std::process::Command::new(crate::support::turnstile_bin())
            .args(["build", crate_dir.to_str().unwrap(), "--target-dir"])
            .arg(&target)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("version "))
            .unwrap()
            .to_string()
    };
    let alone = build(&standalone);

    // The same files as `rules/repro` of a workspace, with the lock file the first build wrote.
    let workspace = dir.path().join("ws");
    let member = workspace.join("rules/repro");
    std::fs::create_dir_all(member.join("src")).unwrap();
    std::fs::create_dir_all(member.join("sdk/src")).unwrap();
    std::fs::create_dir_all(member.join("sdk/wit")).unwrap();
    for file in [
        "src/lib.rs",
        "sdk/Cargo.toml",
        "sdk/src/lib.rs",
        "sdk/wit/rule.wit",
    ] {
        std::fs::copy(standalone.join(file), member.join(file)).unwrap();
    }
    let manifest = std::fs::read_to_string(standalone.join("Cargo.toml")).unwrap();
    let (package, _) = manifest.split_once("[workspace]").unwrap();
    std::fs::write(member.join("Cargo.toml"), package).unwrap();
    std::fs::write(
        workspace.join("Cargo.toml"),
        "[workspace]\nresolver = \"3\"\nmembers = [\"rules/repro\"]\n",
    )
    .unwrap();
    std::fs::copy(standalone.join("Cargo.lock"), workspace.join("Cargo.lock")).unwrap();
    let in_workspace = build(&member);
    assert_eq!(
        alone, in_workspace,
        "the version id depends on the workspace the rule is built in"
    );
}

/// A toolchain without the wasm32 target: the guest build (the code `host/build.rs` runs too,
/// through `GuestBuild::build`) adds it through rustup before compiling, instead of failing
/// deep inside with "can't find crate for core". A `rustc` shim reports a sysroot without the
/// target (and forwards everything else to the real compiler); a fake `rustup` first in PATH
/// records its arguments. When rustup fails, the build stops at once; when it succeeds, the
/// build goes on and the rule is built.
#[test]
fn a_missing_wasm_target_is_added_through_rustup() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let sysroot = std::process::Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .unwrap();
    let real_rustc = Path::new(String::from_utf8_lossy(&sysroot.stdout).trim()).join("bin/rustc");
    let empty_sysroot = dir.path().join("sysroot-without-wasm");
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&empty_sysroot).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    let script = |name: &str, text: String| {
        let path = bin.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    };
    let shim = script(
        "rustc",
        format!(
            "#!/bin/sh\nif [ \"$#\" = 2 ] && [ \"$1\" = --print ] && [ \"$2\" = sysroot ]; then echo '{}'; exit 0; fi\nexec '{}' \"$@\"\n",
            empty_sysroot.display(),
            real_rustc.display()
        ),
    );
    let calls = dir.path().join("rustup-calls");
    let project = dir.path().join("needs-target");
    let (ok, _, stderr) = run_cli(&["new", project.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let build = || {
        std::process::Command::new(crate::support::turnstile_bin())
            .args(["build", project.to_str().unwrap(), "--target-dir"])
            .arg(dir.path().join("target"))
            .env("RUSTC", &shim)
            .env("PATH", &path)
            .output()
            .unwrap()
    };
    let recorded = || std::fs::read_to_string(&calls).unwrap_or_default();

    script(
        "rustup",
        format!("#!/bin/sh\necho \"$@\" >> '{}'\nexit 1\n", calls.display()),
    );
    let output = build();
    assert!(!output.status.success(), "built without the target");
    assert_eq!(recorded(), "target add wasm32-unknown-unknown\n");
    assert!(
        !dir.path().join("target/components").exists(),
        "cargo ran after rustup failed"
    );

    script(
        "rustup",
        format!("#!/bin/sh\necho \"$@\" >> '{}'\nexit 0\n", calls.display()),
    );
    let output = build();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        recorded(),
        "target add wasm32-unknown-unknown\ntarget add wasm32-unknown-unknown\n"
    );
    assert!(
        dir.path()
            .join("target/components/needs-target.wasm")
            .exists()
    );
}
