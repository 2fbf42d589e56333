//! The sandbox: a rule that loops, allocates without end, panics, overflows its stack or returns
//! garbage costs exactly one failed request, never the partition, the process or another key.
//! Assertions are on error codes, never on message text.

use std::time::Duration;

use serde_json::{Value, json};
use turnstile::router::{HashKind, Partitioner};

use crate::support::{Server, ServerArgs, guests};

/// Keys that the default partitioner (java, N = 4) puts on `partition`.
fn keys_on(partition: u32, count: usize) -> Vec<String> {
    let partitioner = Partitioner::new(HashKind::Java, 4);
    (0..)
        .map(|i| format!("key-{i}"))
        .filter(|k| partitioner.partition(k) == partition)
        .take(count)
        .collect()
}

fn request(kind: &str, key: &str, id: &str) -> Value {
    json!({"kind": kind, "key": key, "user": "tester", "id": id})
}

/// Admin token of the servers whose dead letters a test reads.
const ADMIN_TOKEN: &str = "sandbox-admin-token";

async fn admin_get(server: &Server, path: &str) -> (u16, Value) {
    server.admin("GET", path, None, Some(ADMIN_TOKEN)).await
}

fn failures(partitions: &Value, id: u64) -> Value {
    partitions["partitions"][id as usize]["rule_failures"].clone()
}

/// Each misbehaviour fails its own request with its code; the state is unchanged, the next
/// request on the same partition succeeds, a dead letter is recorded, other partitions see
/// nothing.
#[tokio::test(flavor = "multi_thread")]
async fn each_misbehaviour_costs_one_request() {
    each_misbehaviour_costs_one_request_with("").await;
}

/// The same with guard pages and wasmtime's Spectre mitigations instead of explicit bounds checks:
/// the limits do not depend on how memory accesses are checked.
#[tokio::test(flavor = "multi_thread")]
async fn each_misbehaviour_costs_one_request_with_spectre_hardening() {
    each_misbehaviour_costs_one_request_with("[rule]\nspectre_hardening = true\n").await;
}

async fn each_misbehaviour_costs_one_request_with(rule_config: &str) {
    let server = Server::start_with(ServerArgs::default().rule(guests::MISBEHAVE).config(
        &format!("[admin]\ntoken = \"{ADMIN_TOKEN}\"\n{rule_config}"),
    ));
    let cases = [
        ("loop", "rule_fuel_exhausted"),
        ("alloc", "rule_memory"),
        ("panic", "rule_trap"),
        ("out-of-bounds", "rule_trap"),
        ("recurse", "rule_trap"),
        ("huge", "rule_output"),
        ("bad-json", "rule_output"),
        ("empty", "rule_output"),
    ];
    let keys = keys_on(1, cases.len());
    let bystander = keys_on(2, 1).remove(0);
    for ((kind, code), key) in cases.iter().zip(&keys) {
        let (status, answer) = server
            .request(request("set", key, &format!("{kind}-before")))
            .await;
        assert_eq!(status, 200, "{answer}");

        let (status, answer) = server
            .request(request(kind, key, &format!("{kind}-bad")))
            .await;
        assert_eq!(status, 500, "{kind}: {answer}");
        assert_eq!(answer["error"]["code"], *code, "{kind}: {answer}");

        let (_, state) = server.get(&format!("/v1/keys/{key}")).await;
        assert_eq!(
            state["state"]["version"], 1,
            "{kind} changed the state: {state}"
        );
        assert_eq!(state["partition"], 1);

        let (status, answer) = server
            .request(request("set", key, &format!("{kind}-after")))
            .await;
        assert_eq!(status, 200, "{kind}: next request failed: {answer}");
        assert_eq!(answer["state"]["version"], 2);
        assert_eq!(answer["state"]["data"]["seen_version"], 1);

        // Another partition is untouched.
        let (status, _) = server
            .request(request("set", &bystander, &format!("{kind}-bystander")))
            .await;
        assert_eq!(status, 200);
    }

    let (_, partitions) = server.get("/v1/partitions").await;
    let on_1 = failures(&partitions, 1);
    assert_eq!(on_1["rule_fuel_exhausted"], 1);
    assert_eq!(on_1["rule_memory"], 1);
    assert_eq!(on_1["rule_trap"], 3);
    assert_eq!(on_1["rule_output"], 3);
    for other in [0, 2, 3] {
        let counts = failures(&partitions, other);
        for (code, n) in counts.as_object().unwrap() {
            assert_eq!(n, 0, "partition {other} counted {code}");
        }
    }
    assert_eq!(partitions["partitions"][2]["processed"], cases.len());

    let (status, letters) = admin_get(&server, "/v1/dead-letters?partition=1").await;
    assert_eq!(status, 200);
    let letters = letters["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), cases.len());
    for ((kind, code), letter) in cases.iter().zip(letters) {
        assert_eq!(letter["request"]["id"], format!("{kind}-bad"));
        assert_eq!(letter["request"]["kind"], *kind);
        assert_eq!(letter["failure"]["kind"], code.trim_start_matches("rule_"));
        assert_eq!(letter["partition"], 1);
        assert_eq!(letter["rule_version"].as_str().unwrap().len(), 64);
    }
    // Paging: after the third letter come the others.
    let (_, page) = admin_get(&server, "/v1/dead-letters?partition=1&after=3&limit=2").await;
    let page = page["dead_letters"].as_array().unwrap();
    assert_eq!(page.len(), 2);
    assert_eq!(page[0]["seq"], 4);
    assert_eq!(
        admin_get(&server, "/v1/dead-letters?partition=9").await.0,
        400
    );
    // Anonymous callers see nothing and resubmit nothing.
    let (status, answer) = server.get("/v1/dead-letters?partition=1").await;
    assert_eq!(status, 401, "{answer}");
    assert_eq!(answer["error"]["code"], "unauthorized");
    let (status, answer) = server
        .admin("POST", "/v1/dead-letters/1/1/resubmit", None, None)
        .await;
    assert_eq!(status, 401, "{answer}");
    let (_, letters) = admin_get(&server, "/v1/dead-letters?partition=1").await;
    assert_eq!(
        letters["dead_letters"].as_array().unwrap().len(),
        cases.len()
    );
}

/// With fuel out of the way, the deadline stops a runaway loop.
#[tokio::test(flavor = "multi_thread")]
async fn deadline_stops_a_loop_when_fuel_does_not() {
    let server = Server::start_with(
        ServerArgs::default()
            .rule(guests::MISBEHAVE)
            .config("[rule]\nfuel = 1000000000000000\ndeadline_ms = 50\n"),
    );
    let (status, answer) = server.request(request("loop", "k", "slow")).await;
    assert_eq!(status, 500, "{answer}");
    assert_eq!(answer["error"]["code"], "rule_deadline");
    assert_eq!(server.request(request("set", "k", "fine")).await.0, 200);
}

/// The deadline counts the CPU time the call's thread spends, not the time it waits for a CPU:
/// a call that needs a fraction of its limit finishes while sixteen busy loops share the
/// server's one CPU, although its wall time is then well past the limit. A wall-clock deadline failed it
/// with `rule_deadline` (and failed correct rules under a loaded test suite).
#[tokio::test(flavor = "multi_thread")]
async fn the_deadline_counts_cpu_time_not_time_waiting_for_a_cpu() {
    let server = std::sync::Arc::new(Server::start_with(
        ServerArgs::default()
            .rule(guests::MISBEHAVE)
            .config("[rule]\nfuel = 1000000000000000\ndeadline_ms = 100\n"),
    ));
    let pid = server.pid().to_string();
    let pin = |args: &[&str]| {
        let status = std::process::Command::new("taskset")
            .args(args)
            .stdout(std::process::Stdio::null())
            .status();
        assert!(status.unwrap().success(), "taskset {args:?}");
    };
    // Every thread of the server on CPU 0.
    pin(&["-a", "-p", "-c", "0", &pid]);
    // A call of 40 ms or more of wall time (so at most 40 ms of CPU, under the 100 ms limit):
    // measured first, undisturbed, so the machine's speed cannot make the test pass for the
    // wrong reason.
    let mut rounds: u64 = 1_000_000;
    let spin = |rounds: u64, id: String| {
        let mut body = request("spin", "spun", &id);
        body["payload"] = json!(rounds);
        body
    };
    loop {
        let started = std::time::Instant::now();
        let (status, answer) = server
            .request(spin(rounds, format!("calibrate-{rounds}")))
            .await;
        assert_eq!(status, 200, "{answer}");
        if started.elapsed() >= Duration::from_millis(40) || rounds >= 1 << 36 {
            break;
        }
        rounds *= 2;
    }

    /// Busy loops, killed when dropped (also when the test panics).
    struct Hogs(Vec<std::process::Child>);
    impl Drop for Hogs {
        fn drop(&mut self) {
            for hog in &mut self.0 {
                let _ = hog.kill();
                let _ = hog.wait();
            }
        }
    }
    let hogs = Hogs(
        (0..16)
            .map(|_| {
                std::process::Command::new("taskset")
                    .args(["-c", "0", "sh", "-c", "while :; do :; done"])
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );
    let started = std::time::Instant::now();
    let (status, answer) = server.request(spin(rounds, "crowded".into())).await;
    let took = started.elapsed();
    drop(hogs);
    eprintln!("a spin of {rounds} rounds took {took:?} among the busy loops");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["state"]["status"], "ok", "{answer}");
    assert!(
        took > Duration::from_millis(150),
        "the call did not wait for the CPU ({took:?}): nothing was tested"
    );
}

/// Requests queued in the same batch as a failing one are applied normally.
#[tokio::test(flavor = "multi_thread")]
async fn a_failure_does_not_touch_its_batch() {
    let server = std::sync::Arc::new(Server::start_with(
        ServerArgs::default().rule(guests::MISBEHAVE),
    ));
    let keys = keys_on(0, 40);
    let mut tasks = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let server = server.clone();
        let kind = if i % 10 == 5 { "panic" } else { "set" };
        let body = request(kind, key, &format!("batch-{i}"));
        tasks.push(tokio::spawn(
            async move { (kind, server.request(body).await) },
        ));
    }
    let mut ok = 0;
    for task in tasks {
        let (kind, (status, answer)) = task.await.unwrap();
        if kind == "panic" {
            assert_eq!(answer["error"]["code"], "rule_trap");
        } else {
            assert_eq!(status, 200, "{answer}");
            ok += 1;
        }
    }
    assert_eq!(ok, 36);
    let (_, partitions) = server.get("/v1/partitions").await;
    assert_eq!(partitions["partitions"][0]["processed"], 36);
    assert_eq!(failures(&partitions, 0)["rule_trap"], 4);
}

/// A full partition queue answers 503 `backpressure` with `Retry-After` at once, instead of
/// queueing without bound; the server stays healthy.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_is_backpressure() {
    let server = Server::start_with(
        ServerArgs::default()
            .rule(guests::MISBEHAVE)
            // The breaker off: this test is about the queue, not the failure budget.
            .config(
                "[partitions]\nqueue_capacity = 1\nmax_batch = 1\n[rule]\nbreaker_failures = 0\n",
            ),
    );
    let key = keys_on(3, 1).remove(0);
    let client = reqwest::Client::new();
    let mut calls = Vec::new();
    for i in 0..64 {
        // Each `loop` request holds the partition for about a millisecond (its fuel budget).
        let request = client
            .post(format!("{}/v1/requests", server.url))
            .json(&request("loop", &key, &format!("bp-{i}")));
        calls.push(tokio::spawn(async move { request.send().await.unwrap() }));
    }
    let mut backpressure = 0;
    for call in calls {
        let response = call.await.unwrap();
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let body: Value = response.json().await.unwrap();
        match status {
            503 => {
                assert_eq!(body["error"]["code"], "backpressure", "{body}");
                assert_eq!(retry_after.as_deref(), Some("1"));
                backpressure += 1;
            }
            500 => assert_eq!(body["error"]["code"], "rule_fuel_exhausted", "{body}"),
            _ => panic!("{status} {body}"),
        }
    }
    assert!(
        backpressure > 0,
        "64 concurrent slow requests never filled a one-slot queue"
    );
    assert_eq!(server.request(request("set", &key, "after")).await.0, 200);
}

/// Every call starts from the component's initial state: a global counter reads 1 on every
/// call, and a buffer of the previous request is always empty, so no user's data reaches another
/// user's answer.
#[tokio::test(flavor = "multi_thread")]
async fn every_call_starts_from_the_initial_state() {
    let server = Server::start_with(ServerArgs::default().rule(guests::HOSTILE));
    let key = keys_on(1, 1).remove(0);
    for i in 0..10 {
        let (status, answer) = server
            .request(request("count", &key, &format!("count-{i}")))
            .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["state"]["data"]["calls"], 1, "call {i}: {answer}");
    }
    for (i, user) in ["alice", "mallory", "bob"].iter().enumerate() {
        let mut body = request("remember", &format!("card-{i}"), &format!("card-{i}"));
        body["user"] = (*user).into();
        body["payload"] = json!({"card": format!("4111-0000-0000-000{i}")});
        let (status, answer) = server.request(body).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            answer["outcome"], "transition",
            "{user} saw another request: {answer}"
        );
    }
}

/// The warm mode is opt-in and does what its name says: state is kept between calls.
#[tokio::test(flavor = "multi_thread")]
async fn the_warm_mode_keeps_state_between_calls() {
    let server = Server::start_with(
        ServerArgs::default()
            .rule(guests::HOSTILE)
            .config("[rule]\nisolation = \"warm_instance_leaks_state\"\n"),
    );
    let key = keys_on(0, 1).remove(0);
    let mut seen = Vec::new();
    for i in 0..3 {
        let (status, answer) = server
            .request(request("count", &key, &format!("warm-{i}")))
            .await;
        assert_eq!(status, 200, "{answer}");
        seen.push(answer["state"]["data"]["calls"].as_u64().unwrap());
    }
    assert_eq!(seen, [1, 2, 3]);
}

/// A rule that logs in a loop gets at most `rule.max_log_lines_per_second` lines into the log
/// per partition; the rest are counted in /metrics, and the partition keeps answering.
#[tokio::test(flavor = "multi_thread")]
async fn rule_logs_are_rate_limited_per_partition() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let server = Server::start_with(
        ServerArgs::default()
            .rule(guests::HOSTILE)
            .stderr(&log)
            .config("[rule]\nmax_log_lines_per_second = 20\n"),
    );
    let key = keys_on(2, 1).remove(0);
    let mut body = request("log-flood", &key, "flood");
    body["payload"] = json!(3000);
    let (status, answer) = server.request(body).await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = server.request(request("set", &key, "after")).await;
    assert_eq!(status, 200, "{answer}");

    let (_, metrics) = server.get_text("/metrics").await;
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("turnstile_rule_log_lines_dropped_total "))
        .expect("dropped counter in /metrics")
        .parse()
        .unwrap();
    assert!(server.terminate(), "the server did not stop cleanly");
    let text = std::fs::read_to_string(&log).unwrap();
    let written = text.lines().filter(|l| l.contains("flood line")).count() as u64;
    // The bucket holds 20 lines and refills at 20 a second while the call runs (well under a
    // second of fuel), so a handful more at most.
    assert!((1..=30).contains(&written), "{written} flood lines written");
    assert_eq!(written + dropped, 3000, "every line is written or counted");
}

/// Nobody reads the server's stderr (a full pipe): rules that log a lot, on every partition,
/// still get answers, and the server stops on SIGTERM.
#[tokio::test(flavor = "multi_thread")]
async fn a_stderr_nobody_reads_blocks_no_partition() {
    let server = Server::start_with(
        ServerArgs::default()
            .rule(guests::HOSTILE)
            // A generous deadline: this test is about the log sink, not about slow machines.
            .config("[rule]\nmax_log_lines_per_second = 1000000000\ndeadline_ms = 30000\n"),
    );
    // 4 partitions × 5 requests × 2000 lines of ~150 bytes: far more than a 64 KiB pipe.
    for round in 0..5 {
        for partition in 0..4 {
            let key = keys_on(partition, 1).remove(0);
            let mut body = request("log-flood", &key, &format!("nobody-{partition}-{round}"));
            body["payload"] = json!(2000);
            let (status, answer) = server.request(body).await;
            assert_eq!(status, 200, "partition {partition}: {answer}");
        }
    }
    let (_, metrics) = server.get_text("/metrics").await;
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("turnstile_log_lines_dropped_total "))
        .expect("dropped counter in /metrics")
        .parse()
        .unwrap();
    assert!(dropped > 0, "40 000 lines fit in a pipe nobody reads?");
    assert!(server.terminate(), "SIGTERM did not stop the server");
}

/// LF, CR and U+202E in a rule's log message do not reach the log raw: the message stays on
/// one line and cannot pass for a host line.
#[tokio::test(flavor = "multi_thread")]
async fn rule_log_lines_cannot_forge_host_lines() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let server = Server::start_with(ServerArgs::default().rule(guests::HOSTILE).stderr(&log));
    let (status, answer) = server.request(request("log-forge", "k", "forge")).await;
    assert_eq!(status, 200, "{answer}");
    assert!(server.terminate());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains('\r') && !text.contains('\u{202e}'),
        "{text:?}"
    );
    let forged: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("forged host line"))
        .collect();
    assert_eq!(forged.len(), 1, "{text}");
    assert!(
        forged[0].contains("innocent"),
        "the message was split: {text}"
    );
}

/// A status of only whitespace, or with control characters, is refused like an empty one, and
/// so is data that is JSON text but no JSON value (a number out of range, a lone surrogate).
#[tokio::test(flavor = "multi_thread")]
async fn a_blank_or_control_status_or_unrepresentable_data_is_refused() {
    let server = Server::start_with(ServerArgs::default().rule(guests::HOSTILE));
    for kind in ["ws-status", "ctl-status", "huge-number", "lone-surrogate"] {
        let (status, answer) = server.request(request(kind, "k", kind)).await;
        assert_eq!(status, 500, "{kind}: {answer}");
        assert_eq!(answer["error"]["code"], "rule_output", "{kind}: {answer}");
    }
}

/// Replay runs the candidate isolated, and warns when the log was decided by warm instances
/// (whose decisions may depend on earlier requests); a log made with per-call isolation replays
/// exactly and without a warning.
#[tokio::test(flavor = "multi_thread")]
async fn replay_warns_about_a_log_made_by_warm_instances() {
    let dir = tempfile::tempdir().unwrap();
    let replay = || {
        let (ok, stdout, stderr) = crate::support::run_cli(&[
            "replay",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--rule",
            guests::HOSTILE,
            "--json",
        ]);
        assert!(ok, "{stderr}");
        serde_json::from_str::<Value>(&stdout).unwrap()
    };
    let key = keys_on(3, 1).remove(0);
    let send_counts = |isolation: &'static str, round: &'static str| {
        let server = Server::start_with(
            ServerArgs::default()
                .rule(guests::HOSTILE)
                .data_dir(dir.path())
                .config(&format!("[rule]\nisolation = \"{isolation}\"\n")),
        );
        let key = key.clone();
        async move {
            for i in 0..3 {
                let (status, answer) = server
                    .request(request("count", &key, &format!("{round}-{i}")))
                    .await;
                assert_eq!(status, 200, "{answer}");
            }
            assert!(server.terminate());
        }
    };

    send_counts("per_call", "isolated").await;
    let report = replay();
    assert_eq!(report["decisions"], 3);
    assert_eq!(report["different"], 0);
    assert_eq!(report["warnings"].as_array().unwrap().len(), 0);

    send_counts("warm_instance_leaks_state", "warm").await;
    let report = replay();
    assert_eq!(report["decisions"], 6);
    // The warm instance counted 1, 2, 3; the isolated candidate counts 1 every time.
    assert_eq!(report["different"], 2);
    assert_eq!(report["warnings"].as_array().unwrap().len(), 1);
}

/// Components that compile but cannot start within the limits (4 GiB of initial memory, four
/// memories over the cap together, a start function that loops, 17 tables), and one with
/// 100 000 tiny functions (refused before compiling), are refused by
/// `check`, `test`, `run` and `PUT /v1/admin/rule` alike, with the same message, and a refused
/// install leaves no file in `rules/` and no history entry.
#[tokio::test(flavor = "multi_thread")]
async fn a_component_that_cannot_start_is_refused_everywhere_alike() {
    const TOKEN: &str = ADMIN_TOKEN;
    let dir = tempfile::tempdir().unwrap();
    let scenarios = dir.path().join("scenarios.toml");
    std::fs::write(
        &scenarios,
        "[[scenario]]\nname = \"one\"\n[[scenario.step]]\nkind = \"k\"\nkey = \"k\"\nuser = \"u\"\nexpect = \"transition\"\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let server = Server::start_with(
        ServerArgs::default()
            .data_dir(&data)
            .config(&format!("[admin]\ntoken = \"{TOKEN}\"\n")),
    );
    let rules_before = std::fs::read_dir(data.join("rules")).unwrap().count();
    for guest in [
        guests::HUGE_MEMORY,
        guests::MULTI_MEMORY,
        guests::START_LOOP,
        guests::MANY_TABLES,
        guests::MANY_FUNCTIONS,
    ] {
        let (ok, _, check_err) = crate::support::run_cli(&["check", guest]);
        assert!(!ok, "check accepted {guest}");
        let (ok, _, _) = crate::support::run_cli(&["test", guest, scenarios.to_str().unwrap()]);
        assert!(!ok, "test accepted {guest}");
        let run_err = Server::refused(ServerArgs::default().rule(guest));

        let bytes = std::fs::read(guest).unwrap();
        let (status, answer) = server
            .admin("PUT", "/v1/admin/rule", Some(bytes), Some(TOKEN))
            .await;
        assert_eq!(status, 422, "{guest}: {answer}");
        assert_eq!(answer["error"]["code"], "rule_refused");
        // One message everywhere: what the API says is what check and run print.
        let message = answer["error"]["message"].as_str().unwrap();
        let reason = message.trim_start_matches("rule refused: ");
        assert!(
            check_err.contains(reason),
            "check: {check_err}\napi: {message}"
        );
        assert!(run_err.contains(reason), "run: {run_err}\napi: {message}");
    }
    let (_, status) = server
        .admin("GET", "/v1/admin/rule", None, Some(TOKEN))
        .await;
    assert_eq!(status["history"].as_array().unwrap().len(), 0, "{status}");
    assert_eq!(
        std::fs::read_dir(data.join("rules")).unwrap().count(),
        rules_before,
        "a refused component was saved"
    );
    let (status, answer) = server
        .admin("POST", "/v1/admin/rule/rollback", None, Some(TOKEN))
        .await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["error"]["code"], "nothing_to_roll_back");
    // The server still runs its rule.
    assert_eq!(
        server
            .request(json!({"kind": "reserve", "key": "K-1", "user": "u"}))
            .await
            .0,
        200
    );
}

/// A trap in a function with a 100 KB name costs a short answer: the API gets the code and a
/// short message, the dead letter a detail cut to `rule.max_failure_detail_bytes`, and a page
/// of many such letters stays small.
#[tokio::test(flavor = "multi_thread")]
async fn a_trap_with_huge_names_gives_bounded_messages() {
    const DETAIL: usize = 512;
    let server = Server::start_with(ServerArgs::default().rule(guests::LONG_NAME_TRAP).config(
        &format!(
            "[admin]\ntoken = \"{ADMIN_TOKEN}\"\n[rule]\nmax_failure_detail_bytes = {DETAIL}\n"
        ),
    ));
    const ATTACKS: usize = 30;
    let (status, _) = server.request(request("any", "warm-up", "warm-up")).await;
    assert_eq!(status, 500);
    let rss_before = rss_kib(server.pid());
    for i in 0..ATTACKS {
        let body = serde_json::to_vec(&request("any", &format!("k-{i}"), &format!("t-{i}")));
        let response = reqwest::Client::new()
            .post(format!("{}/v1/requests", server.url))
            .body(body.unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 500);
        let text = response.text().await.unwrap();
        assert!(text.len() < 1024, "a {}-byte answer", text.len());
        let answer: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(answer["error"]["code"], "rule_trap");
    }
    // Each trap's 100 KB backtrace is formatted, cut and dropped: nothing of it accumulates.
    let grown_kib = rss_kib(server.pid()).saturating_sub(rss_before);
    assert!(grown_kib < 32 * 1024, "RSS grew by {grown_kib} KiB");
    let response = reqwest::Client::new()
        .get(format!("{}/v1/dead-letters?limit=1000", server.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let text = response.text().await.unwrap();
    let letters: Value = serde_json::from_str(&text).unwrap();
    let letters = letters["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), ATTACKS + 1);
    for letter in letters {
        let detail = letter["failure"]["detail"].as_str().unwrap();
        assert!(detail.len() <= DETAIL, "a {}-byte detail", detail.len());
    }
    assert!(
        text.len() < (ATTACKS + 1) * (DETAIL + 1024),
        "{} bytes for {ATTACKS} letters",
        text.len()
    );
}

/// Dead letters are pruned beyond `store.dead_letter_retention` per partition: the newest are
/// kept, the store does not grow with every failure, and a pruned letter cannot be resubmitted.
#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_pruned_beyond_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        ServerArgs::default()
            .rule(guests::MISBEHAVE)
            .data_dir(dir.path())
            .config(&format!(
                "[admin]\ntoken = \"{ADMIN_TOKEN}\"\n[store]\ndead_letter_retention = 5\n[rule]\nbreaker_failures = 0\n"
            )),
    );
    let key = keys_on(2, 1).remove(0);
    for i in 0..12 {
        let (status, _) = server
            .request(request("panic", &key, &format!("pruned-{i}")))
            .await;
        assert_eq!(status, 500);
    }
    let (status, letters) = admin_get(&server, "/v1/dead-letters?partition=2").await;
    assert_eq!(status, 200);
    let seqs: Vec<u64> = letters["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [8, 9, 10, 11, 12]);
    let (status, answer) = server
        .admin(
            "POST",
            "/v1/dead-letters/2/1/resubmit",
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(answer["error"]["code"], "unknown_dead_letter");
    // A partition that does not exist is a bad request, not a missing letter.
    let (status, answer) = server
        .admin(
            "POST",
            "/v1/dead-letters/99/1/resubmit",
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "invalid_request");
}

/// `turnstile test` prints what a rule returned escaped: data holding U+202E (valid in a JSON
/// string) cannot reorder what the reviewer reads.
#[test]
fn turnstile_test_output_escapes_what_the_rule_returned() {
    let dir = tempfile::tempdir().unwrap();
    let scenarios = dir.path().join("scenarios.toml");
    std::fs::write(
        &scenarios,
        "[[scenario]]\nname = \"rtl\"\n[[scenario.step]]\nkind = \"rtl-data\"\nkey = \"k\"\nuser = \"u\"\nexpect = \"reject\"\n",
    )
    .unwrap();
    let (ok, stdout, _) =
        crate::support::run_cli(&["test", guests::HOSTILE, scenarios.to_str().unwrap()]);
    assert!(!ok, "the scenario expects a reject and gets a transition");
    assert!(stdout.contains("note"), "the data is shown: {stdout}");
    assert!(!stdout.contains('\u{202e}'), "{stdout}");
}

/// A call that burned its whole fuel budget counts all of it in the fuel metric, not 0.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_that_runs_out_of_fuel_counts_its_fuel() {
    let server = Server::start_with(
        ServerArgs::default()
            .rule(guests::MISBEHAVE)
            .config("[rule]\nfuel = 2000000\n"),
    );
    let key = keys_on(1, 1).remove(0);
    let (status, answer) = server.request(request("loop", &key, "spin")).await;
    assert_eq!(status, 500);
    assert_eq!(answer["error"]["code"], "rule_fuel_exhausted");
    let (_, metrics) = server.get_text("/metrics").await;
    let used: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("turnstile_partition_fuel_used_total{partition=\"1\"} "))
        .expect("fuel series of partition 1")
        .parse()
        .unwrap();
    assert!(used >= 2_000_000, "counted {used}");
}

/// Sends `body` and returns the status, the `Retry-After` header and the JSON answer.
async fn send_with_retry_after(server: &Server, body: &Value) -> (u16, Option<u64>, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/requests", server.url))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (status, retry_after, response.json().await.unwrap())
}

/// The failure budget: a client flooding one key with requests the rule fails on (each costs
/// the partition its whole deadline) gets that key quarantined after `rule.breaker_failures`
/// failures: the rest are refused at once with 503 `rule_quarantined` and Retry-After, without a
/// dead letter, while another key on the same partition keeps being answered. /v1/partitions
/// and /metrics show it, and installing a rule lifts the quarantine.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_over_the_failure_budget_is_quarantined() {
    const BUDGET: u64 = 5;
    const FLOOD: u64 = 40;
    let server = Server::start_with(ServerArgs::default().rule(guests::MISBEHAVE).config(
        &format!(
            "[admin]\ntoken = \"{ADMIN_TOKEN}\"\n[rule]\nfuel = 1000000000000000\ndeadline_ms = 100\n\
             breaker_failures = {BUDGET}\nbreaker_window_ms = 600000\nbreaker_cooldown_ms = 600000\n"
        ),
    ));
    let keys = keys_on(1, 2);
    let (flooded, bystander) = (keys[0].clone(), keys[1].clone());

    // The flood runs concurrently with a well-behaved client on the same partition.
    let flood = {
        let url = server.url.clone();
        let key = flooded.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut calls = Vec::new();
            for i in 0..FLOOD {
                let request = client.post(format!("{url}/v1/requests")).json(&request(
                    "loop",
                    &key,
                    &format!("flood-{i}"),
                ));
                calls.push(tokio::spawn(async move { request.send().await.unwrap() }));
            }
            let mut answers = Vec::new();
            for call in calls {
                let response = call.await.unwrap();
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
                let body: Value = response.json().await.unwrap();
                answers.push((status, retry_after, body));
            }
            answers
        })
    };
    for i in 0..20 {
        let (status, answer) = server
            .request(request("set", &bystander, &format!("calm-{i}")))
            .await;
        assert_eq!(status, 200, "the bystander was not answered: {answer}");
    }
    let answers = flood.await.unwrap();

    let mut failed = 0;
    let mut quarantined = 0;
    for (status, retry_after, body) in &answers {
        match (status, body["error"]["code"].as_str().unwrap()) {
            (500, "rule_deadline") => failed += 1,
            (503, "rule_quarantined") => {
                let retry_after = retry_after.expect("Retry-After on rule_quarantined");
                assert!(
                    (1..=600).contains(&retry_after),
                    "Retry-After {retry_after}"
                );
                quarantined += 1;
            }
            _ => panic!("{status} {body}"),
        }
    }
    assert_eq!(failed, BUDGET, "failures past the budget reached the rule");
    assert_eq!(quarantined, FLOOD - BUDGET);
    // Still quarantined, whatever the request.
    let (status, retry_after, answer) =
        send_with_retry_after(&server, &request("set", &flooded, "after-flood")).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (503, Some("rule_quarantined"))
    );
    assert!(retry_after.is_some());

    let (_, partitions) = server.get("/v1/partitions").await;
    let partition = &partitions["partitions"][1];
    assert_eq!(partition["rule_failures"]["rule_deadline"], BUDGET);
    assert_eq!(partition["breaker"]["open_keys"], 1, "{partition}");
    assert_eq!(partition["breaker"]["opened"], 1, "{partition}");
    assert_eq!(
        partition["breaker"]["refused"],
        FLOOD - BUDGET + 1,
        "{partition}"
    );
    assert_eq!(partition["processed"], 20, "{partition}");
    let (_, metrics) = server.get_text("/metrics").await;
    assert!(
        metrics.contains(&format!(
            "turnstile_breaker_refused_total{{partition=\"1\"}} {}",
            FLOOD - BUDGET + 1
        )),
        "{metrics}"
    );
    assert!(metrics.contains("turnstile_breaker_open_keys{partition=\"1\"} 1"));
    // Refusals leave no dead letter: only the failures that reached the rule do.
    let (_, letters) = admin_get(&server, "/v1/dead-letters?partition=1").await;
    assert_eq!(
        letters["dead_letters"].as_array().unwrap().len() as u64,
        BUDGET
    );

    // A canary install on another partition leaves this one's rule, and its quarantine, alone.
    let bytes = std::fs::read(guests::ECHO).unwrap();
    let (status, answer) = server
        .admin(
            "PUT",
            "/v1/admin/rule?partitions=0",
            Some(bytes.clone()),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = server.request(request("set", &flooded, "canary")).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (503, Some("rule_quarantined"))
    );
    // An install that switches its partition lifts every quarantine there.
    let (status, answer) = server
        .admin("PUT", "/v1/admin/rule", Some(bytes), Some(ADMIN_TOKEN))
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = server.request(request("loop", &flooded, "fixed")).await;
    assert_eq!(status, 200, "{answer}");
    let (_, partitions) = server.get("/v1/partitions").await;
    assert_eq!(partitions["partitions"][1]["breaker"]["open_keys"], 0);
}

/// After the cool-down a quarantined key gets one request through (half-open): a failure
/// quarantines it again at once, a success lifts the quarantine.
#[tokio::test(flavor = "multi_thread")]
async fn a_quarantine_half_opens_after_the_cooldown() {
    let server = Server::start_with(ServerArgs::default().rule(guests::MISBEHAVE).config(
        "[rule]\nbreaker_failures = 2\nbreaker_window_ms = 600000\nbreaker_cooldown_ms = 1500\n",
    ));
    let key = keys_on(2, 1).remove(0);
    let code = |answer: &Value| answer["error"]["code"].as_str().unwrap_or("").to_string();
    for i in 0..2 {
        let (status, answer) = server
            .request(request("panic", &key, &format!("p-{i}")))
            .await;
        assert_eq!((status, code(&answer).as_str()), (500, "rule_trap"));
    }
    let (status, answer) = server.request(request("panic", &key, "p-2")).await;
    assert_eq!((status, code(&answer).as_str()), (503, "rule_quarantined"));

    // Wait out the cool-down: the first request let through is the probe; it fails.
    let mut probe = None;
    for i in 0..100 {
        let (status, answer) = server
            .request(request("panic", &key, &format!("w-{i}")))
            .await;
        if status != 503 {
            probe = Some((status, code(&answer)));
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        probe,
        Some((500, "rule_trap".to_string())),
        "no probe let through"
    );
    let (status, answer) = server.request(request("set", &key, "after-probe")).await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (503, "rule_quarantined"),
        "{answer}"
    );

    // The next probe succeeds: the key is healthy again, and one failure does not quarantine it.
    let mut healed = false;
    for i in 0..100 {
        let (status, _) = server
            .request(request("set", &key, &format!("s-{i}")))
            .await;
        if status == 200 {
            healed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(healed, "the quarantine was never lifted");
    let (status, _) = server.request(request("panic", &key, "p-again")).await;
    assert_eq!(status, 500);
    let (status, answer) = server.request(request("set", &key, "s-again")).await;
    assert_eq!(status, 200, "{answer}");
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// An output over `rule.max_output_bytes` (14 MiB of status and data, made in no time by the
/// guest) is refused before it is copied out of the guest: `rule_output` every time, with a
/// short answer, whether or not it is valid UTF-8 (it was `rule_trap` when the copy failed on
/// UTF-8), and repeating it does not grow the server's memory (it grew by over 100 MiB when
/// every output was copied first).
#[tokio::test(flavor = "multi_thread")]
async fn an_oversize_output_is_always_rule_output() {
    const ATTACKS: usize = 20;
    for guest in [guests::HUGE_OUTPUT, guests::HUGE_GARBLED_OUTPUT] {
        // memory.fill is charged fuel by the byte: enough for the fill, which is not the subject.
        let server = Server::start_with(
            ServerArgs::default()
                .rule(guest)
                .config("[rule]\nfuel = 1000000000000\n"),
        );
        // Warm up the instance pool's slot, so RSS counts what the attacks leave behind.
        let (status, _) = server.request(request("any", "warm-up", "warm-up")).await;
        assert_eq!(status, 500);
        let before = rss_kib(server.pid());
        for i in 0..ATTACKS {
            // A key each: the failure budget is not the subject here.
            let body = request("any", &format!("k-{i}"), &format!("huge-{i}"));
            let response = reqwest::Client::new()
                .post(format!("{}/v1/requests", server.url))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), 500);
            let text = response.text().await.unwrap();
            assert!(text.len() < 1024, "a {}-byte answer", text.len());
            let answer: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(answer["error"]["code"], "rule_output", "{guest}: {answer}");
        }
        let grown_kib = rss_kib(server.pid()).saturating_sub(before);
        // 20 attacks of 28 MiB each would be 560 MiB if anything were kept.
        assert!(grown_kib < 64 * 1024, "RSS grew by {grown_kib} KiB");
    }
}

/// A component whose compilation takes longer than `rule.max_compile_ms` (100 000 tiny
/// functions, allowed by a raised `max_functions`) is refused by `PUT /v1/admin/rule` when the
/// budget runs out, not after compiling for tens of seconds; nothing is installed and the
/// server keeps answering.
#[tokio::test(flavor = "multi_thread")]
async fn a_compilation_over_its_budget_is_refused() {
    let server = Server::start_with(ServerArgs::default().config(&format!(
        "[admin]\ntoken = \"{ADMIN_TOKEN}\"\n[rule]\nmax_functions = 200000\nmax_compile_ms = 5000\n"
    )));
    let bytes = std::fs::read(guests::MANY_FUNCTIONS).unwrap();
    let (status, answer) = server
        .admin("PUT", "/v1/admin/rule", Some(bytes), Some(ADMIN_TOKEN))
        .await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["code"], "rule_refused");
    let (_, rule) = admin_get(&server, "/v1/admin/rule").await;
    assert_eq!(rule["history"].as_array().unwrap().len(), 0, "{rule}");
    let (status, _) = server
        .request(json!({"kind": "reserve", "key": "K-1", "user": "u"}))
        .await;
    assert_eq!(status, 200);
}

/// `bytes` (a component) with a custom section appended: the same rule under another version id.
fn another_version(bytes: &[u8], tag: usize) -> Vec<u8> {
    let name = b"turnstile-test";
    let payload = format!("version {tag}");
    let mut content = vec![name.len() as u8];
    content.extend_from_slice(name);
    content.extend_from_slice(payload.as_bytes());
    let mut out = bytes.to_vec();
    out.push(0);
    out.push(content.len() as u8);
    out.extend_from_slice(&content);
    out
}

fn compiled_versions(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("turnstile_rule_compiled_versions "))
        .expect("turnstile_rule_compiled_versions in /metrics")
        .parse()
        .unwrap()
}

/// Installing one version after another keeps at most the running version and
/// `rule.max_idle_compiled_versions` others compiled; rolling back to a dropped version compiles
/// it again from the data dir, or without one from the bytes kept in memory, and it decides
/// again.
#[tokio::test(flavor = "multi_thread")]
async fn compiled_versions_no_partition_runs_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    roll_back_through_dropped_versions(ServerArgs::default().data_dir(dir.path())).await;
    roll_back_through_dropped_versions(ServerArgs::default()).await;
}

async fn roll_back_through_dropped_versions(args: ServerArgs) {
    const INSTALLS: usize = 6;
    let server = Server::start_with(args.config(&format!(
        "[admin]\ntoken = \"{ADMIN_TOKEN}\"\n[rule]\nmax_idle_compiled_versions = 1\n"
    )));
    let echo = std::fs::read(guests::ECHO).unwrap();
    let mut versions = Vec::new();
    for i in 0..INSTALLS {
        let (status, answer) = server
            .admin(
                "PUT",
                "/v1/admin/rule",
                Some(another_version(&echo, i)),
                Some(ADMIN_TOKEN),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        versions.push(answer["version"].as_str().unwrap().to_string());
        let (_, metrics) = server.get_text("/metrics").await;
        assert!(compiled_versions(&metrics) <= 2, "install {i}: {metrics}");
    }
    // Back through the dropped versions, each compiled again and deciding.
    for expected in versions[..INSTALLS - 1].iter().rev().take(3) {
        let (status, answer) = server
            .admin("POST", "/v1/admin/rule/rollback", None, Some(ADMIN_TOKEN))
            .await;
        assert_eq!(status, 200, "{answer}");
        let (status, answer) = server
            .request(json!({"kind": "k", "key": "K-1", "user": "u"}))
            .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["state"]["rule_version"], *expected, "{answer}");
        let (_, metrics) = server.get_text("/metrics").await;
        assert!(compiled_versions(&metrics) <= 2, "{metrics}");
    }
}

/// `turnstile test` logs the rule's lines the way `run` does (a subscriber, the same rate
/// limit), so a rule that logs costs the same in both: of 3000 lines at 20 a second, a bounded
/// handful reach stderr, and the step passes.
#[test]
fn turnstile_test_logs_rule_lines_like_run() {
    let dir = tempfile::tempdir().unwrap();
    let scenarios = dir.path().join("scenarios.toml");
    std::fs::write(
        &scenarios,
        "[[scenario]]\nname = \"flood\"\n[[scenario.step]]\nkind = \"log-flood\"\nkey = \"k\"\nuser = \"u\"\npayload = 3000\nexpect = \"transition\"\n",
    )
    .unwrap();
    let config = dir.path().join("turnstile.toml");
    std::fs::write(&config, "[rule]\nmax_log_lines_per_second = 20\n").unwrap();
    let (ok, stdout, stderr) = crate::support::run_cli(&[
        "test",
        guests::HOSTILE,
        scenarios.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    let written = stderr.lines().filter(|l| l.contains("flood line")).count();
    assert!((1..=30).contains(&written), "{written} lines: {stderr}");
}

/// A fixed number of attacks of every kind (unbounded allocation, stack overflow, a 1 MiB
/// output, a panic, a spin until the fuel runs out, 2000 log lines, a global buffer kept between
/// calls) leaves the server's memory where it was: every instance's memory goes back to the
/// pool, nothing a failure produced is kept but its bounded dead letter.
#[tokio::test(flavor = "multi_thread")]
async fn repeated_attacks_do_not_grow_the_servers_memory() {
    const ROUNDS: usize = 15;
    let attacks = [
        (guests::MISBEHAVE, "alloc"),
        (guests::MISBEHAVE, "recurse"),
        (guests::MISBEHAVE, "huge"),
        (guests::MISBEHAVE, "panic"),
        (guests::MISBEHAVE, "loop"),
        (guests::HOSTILE, "log-flood"),
        (guests::HOSTILE, "remember"),
    ];
    for guest in [guests::MISBEHAVE, guests::HOSTILE] {
        // The breaker off: every attack reaches the rule.
        let server = Server::start_with(
            ServerArgs::default()
                .rule(guest)
                .config("[rule]\nbreaker_failures = 0\n"),
        );
        let kinds: Vec<&str> = attacks
            .iter()
            .filter(|(g, _)| *g == guest)
            .map(|(_, kind)| *kind)
            .collect();
        let send = |kind: &str, round: usize| {
            let mut body = request(kind, &format!("{kind}-{round}"), &format!("{kind}-{round}"));
            body["payload"] = json!(2000);
            body["user"] = json!(format!("user-{round}"));
            server.request(body)
        };
        // One of each first, so the pool's slots and the allocator are warm.
        for kind in &kinds {
            send(kind, usize::MAX).await;
        }
        let before = rss_kib(server.pid());
        for round in 0..ROUNDS {
            for kind in &kinds {
                let (status, answer) = send(kind, round).await;
                assert!(status == 200 || status == 500, "{kind}: {status} {answer}");
            }
        }
        let grown_kib = rss_kib(server.pid()).saturating_sub(before);
        // Each `alloc` alone reaches the 16 MiB cap; 15 rounds kept would be hundreds of MiB.
        assert!(
            grown_kib < 48 * 1024,
            "{guest}: RSS grew by {grown_kib} KiB after {ROUNDS} rounds of {kinds:?}"
        );
    }
}

/// Without a data dir the version a rollback returns to is still compiled: the rule the server
/// started with counts as used, like installed ones (it was dropped once no partition ran it).
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_to_the_starting_rule_works_without_a_data_dir() {
    let server = Server::start_with(
        ServerArgs::default().config(&format!("[admin]\ntoken = \"{ADMIN_TOKEN}\"\n")),
    );
    let echo = std::fs::read(guests::ECHO).unwrap();
    let (status, answer) = server
        .admin("PUT", "/v1/admin/rule", Some(echo), Some(ADMIN_TOKEN))
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = server
        .admin("POST", "/v1/admin/rule/rollback", None, Some(ADMIN_TOKEN))
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = server
        .request(json!({"kind": "reserve", "key": "K-1", "user": "u"}))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["state"]["status"], "reserved", "{answer}");
}
