//! Hot reload: swapping rules under load loses, fails and reorders nothing; refused modules leave
//! the old version serving; rollback, canary, restart and the watched file work end to end.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use turnstile::router::{HashKind, Partitioner};

use crate::support::{Server, ServerArgs, body, guests};

const TOKEN: &str = "test-admin-token";

fn with_token() -> ServerArgs {
    ServerArgs::default().config(&format!("[admin]\ntoken = \"{TOKEN}\"\n"))
}

fn wasm(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// `PUT /v1/admin/rule[query]` with the token.
async fn install(server: &Server, query: &str, module: Vec<u8>) -> (u16, Value) {
    server
        .admin(
            "PUT",
            &format!("/v1/admin/rule{query}"),
            Some(module),
            Some(TOKEN),
        )
        .await
}

fn version_of(path: &str) -> String {
    turnstile::sandbox::version_id(&wasm(path))
}

/// A key the default partitioner (java, N = 4) puts on `partition`.
fn key_on(partition: u32) -> String {
    let partitioner = Partitioner::new(HashKind::Java, 4);
    (0..)
        .map(|i| format!("canary-{i}"))
        .find(|k| partitioner.partition(k) == partition)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_api_needs_a_token() {
    let off = Server::start();
    let (status, answer) = off
        .admin("GET", "/v1/admin/rule", None, Some("anything"))
        .await;
    assert_eq!(status, 403);
    assert_eq!(answer["error"]["code"], "admin_disabled");

    let on = Server::start_with(with_token());
    for token in [None, Some("wrong"), Some("test-admin-token-but-longer")] {
        let (status, answer) = on.admin("GET", "/v1/admin/rule", None, token).await;
        assert_eq!(status, 401, "{token:?}: {answer}");
        assert_eq!(answer["error"]["code"], "unauthorized");
        let (status, _) = on
            .admin("PUT", "/v1/admin/rule", Some(wasm(guests::ECHO)), token)
            .await;
        assert_eq!(status, 401);
    }
    let (status, answer) = on.admin("GET", "/v1/admin/rule", None, Some(TOKEN)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["partitions"].as_array().unwrap().len(), 4);
}

/// Reload between two rules with visibly different decisions many times under continuous
/// concurrent load: no request fails or is lost, per-key order holds, and in every partition's
/// log each install is one switch point.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_load_loses_and_reorders_nothing() {
    const CLIENTS: usize = 16;
    const KEYS_PER_CLIENT: usize = 8;
    const INSTALLS: usize = 12;
    let server = Arc::new(Server::start_with(with_token().rule(guests::MISBEHAVE)));
    let rules = [wasm(guests::ECHO), wasm(guests::MISBEHAVE)];
    let running = Arc::new(AtomicBool::new(true));

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (server, running) = (server.clone(), running.clone());
        clients.push(tokio::spawn(async move {
            let mut seen: Vec<(String, Value)> = Vec::new();
            let mut round = 0;
            while running.load(Ordering::Relaxed) || round < 3 {
                for k in 0..KEYS_PER_CLIENT {
                    let key = format!("load-{c}-{k}");
                    let (status, answer) = server
                        .request(json!({"kind": "set", "key": key, "user": "loader"}))
                        .await;
                    assert_eq!(status, 200, "a request failed during reload: {answer}");
                    seen.push((key, answer));
                }
                round += 1;
            }
            seen
        }));
    }
    for i in 0..INSTALLS {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let (status, answer) = install(&server, "", rules[i % 2].clone()).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["partitions"].as_array().unwrap().len(), 4);
    }
    running.store(false, Ordering::Relaxed);

    let mut per_key: HashMap<String, Vec<u64>> = HashMap::new();
    let mut per_partition: BTreeMap<u64, Vec<(u64, String)>> = BTreeMap::new();
    for client in clients {
        for (key, answer) in client.await.unwrap() {
            per_key
                .entry(key)
                .or_default()
                .push(answer["state"]["version"].as_u64().unwrap());
            per_partition
                .entry(answer["partition"].as_u64().unwrap())
                .or_default()
                .push((
                    answer["seq"].as_u64().unwrap(),
                    answer["state"]["rule_version"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                ));
        }
    }
    // Per key: versions 1, 2, 3, ... in the order the client sent them.
    for (key, versions) in &per_key {
        let expected: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(versions, &expected, "{key}: reordered or lost");
    }
    // Per partition: the log has no gap, and the deciding version changes at most once per install.
    let mut switches_seen = 0;
    for (partition, mut decisions) in per_partition {
        decisions.sort();
        let seqs: Vec<u64> = decisions.iter().map(|d| d.0).collect();
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "partition {partition}: a gap in the log");
        let switches = decisions.windows(2).filter(|w| w[0].1 != w[1].1).count();
        assert!(
            switches <= INSTALLS,
            "partition {partition}: {switches} switches for {INSTALLS} installs"
        );
        switches_seen += switches;
    }
    assert!(switches_seen > 0, "the load never saw a reload");
    let (_, partitions) = server.get("/v1/partitions").await;
    for p in partitions["partitions"].as_array().unwrap() {
        assert_eq!(
            p["rule_version"],
            version_of(guests::MISBEHAVE),
            "the last install runs"
        );
    }
}

/// A hostile or malformed module is refused with 422 `rule_refused`; the old version keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn refused_modules_leave_the_old_version_serving() {
    let server = Server::start_with(with_token());
    let (_, before) = server
        .admin("GET", "/v1/admin/rule", None, Some(TOKEN))
        .await;
    for module in [
        b"garbage".to_vec(),
        b"\0asm\x01\0\0\0".to_vec(),
        wasm(guests::OTHER_WORLD),
        wasm(guests::FORBIDDEN_IMPORT),
    ] {
        let (status, answer) = install(&server, "", module).await;
        assert_eq!(status, 422, "{answer}");
        assert_eq!(answer["error"]["code"], "rule_refused");
    }
    let (status, answer) = install(&server, "?partitions=0,9", wasm(guests::ECHO)).await;
    assert_eq!(status, 400, "{answer}");
    let (_, after) = server
        .admin("GET", "/v1/admin/rule", None, Some(TOKEN))
        .await;
    assert_eq!(before["partitions"], after["partitions"]);
    assert_eq!(
        server.request(body("reserve", Some("K"), "alice")).await.0,
        200
    );
    assert_eq!(
        server.request(body("reserve", Some("K"), "alice")).await.0,
        409,
        "still the reference rule"
    );
}

/// A canary on partitions 0 and 1, a rollback, and a promotion.
#[tokio::test(flavor = "multi_thread")]
async fn canary_rollback_and_promotion() {
    let server = Server::start_with(with_token());
    let (on_0, on_2) = (key_on(0), key_on(2));
    let echo = version_of(guests::ECHO);

    let (status, answer) = install(&server, "?partitions=0,1", wasm(guests::ECHO)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["version"], echo);
    assert_eq!(answer["partitions"], json!([0, 1]));
    let (_, status_doc) = server
        .admin("GET", "/v1/admin/rule", None, Some(TOKEN))
        .await;
    let running: Vec<&str> = status_doc["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["version"].as_str().unwrap())
        .collect();
    assert_eq!(running[0], echo);
    assert_eq!(running[1], echo);
    assert_ne!(running[2], echo);
    assert_eq!(
        server.request(body("reserve", Some(&on_0), "u")).await.1["state"]["status"],
        "echo-reserve"
    );
    assert_eq!(
        server.request(body("reserve", Some(&on_2), "u")).await.1["state"]["status"],
        "reserved"
    );

    let (status, answer) = server
        .admin("POST", "/v1/admin/rule/rollback", None, Some(TOKEN))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["partitions"], json!([0, 1]));
    let (status, answer) = server.request(body("associate", Some(&on_0), "u")).await;
    assert_eq!(
        status, 409,
        "back on the reference rule, which rejects this: {answer}"
    );
    let (status, answer) = server
        .admin("POST", "/v1/admin/rule/rollback", None, Some(TOKEN))
        .await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["error"]["code"], "nothing_to_roll_back");

    // Promotion is a normal install.
    let (status, answer) = install(&server, "", wasm(guests::ECHO)).await;
    assert_eq!(status, 200);
    assert_eq!(answer["partitions"], json!([0, 1, 2, 3]));
    assert_eq!(
        server.request(body("reserve", Some(&on_2), "u")).await.1["state"]["status"],
        "echo-reserve"
    );
    let (_, status_doc) = server
        .admin("GET", "/v1/admin/rule", None, Some(TOKEN))
        .await;
    let actions: Vec<&str> = status_doc["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["install", "rollback", "install"]);
}

/// The installed version survives a restart.
#[tokio::test(flavor = "multi_thread")]
async fn installed_version_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(with_token().data_dir(dir.path()));
    assert_eq!(install(&server, "", wasm(guests::ECHO)).await.0, 200);
    assert!(server.terminate());
    let server = Server::start_with(with_token().data_dir(dir.path()));
    let (_, partitions) = server.get("/v1/partitions").await;
    for p in partitions["partitions"].as_array().unwrap() {
        assert_eq!(p["rule_version"], version_of(guests::ECHO));
    }
    assert_eq!(
        server.request(body("go", Some("K"), "u")).await.1["state"]["status"],
        "echo-go"
    );
}

/// With `rule.watch`, replacing the file installs it; a broken file is ignored.
#[tokio::test(flavor = "multi_thread")]
async fn watched_file_reloads_and_ignores_broken_files() {
    let dir = tempfile::tempdir().unwrap();
    let rule = dir.path().join("rule.wasm");
    std::fs::write(&rule, turnstile::sandbox::REFERENCE_RULE).unwrap();
    let config = format!(
        "[admin]\ntoken = \"{TOKEN}\"\n[rule]\npath = \"{}\"\nwatch = true\nwatch_interval_ms = 50\n",
        rule.display()
    );
    let server = Server::start_with(ServerArgs::default().config(&config));
    assert_eq!(server.request(body("reserve", Some("W"), "u")).await.0, 200);
    assert_eq!(server.request(body("reserve", Some("W"), "u")).await.0, 409);

    let replace = |bytes: &[u8]| {
        let tmp = dir.path().join("rule.wasm.new");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, &rule).unwrap();
    };
    replace(&wasm(guests::ECHO));
    let echo = version_of(guests::ECHO);
    wait_for_version(&server, &echo).await;
    assert_eq!(
        server.request(body("reserve", Some("W"), "u")).await.1["state"]["status"],
        "echo-reserve"
    );

    replace(b"not a component");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, status_doc) = server
        .admin("GET", "/v1/admin/rule", None, Some(TOKEN))
        .await;
    for p in status_doc["partitions"].as_array().unwrap() {
        assert_eq!(
            p["version"], echo,
            "a broken file replaced the running rule"
        );
    }
    assert_eq!(server.request(body("reserve", Some("W"), "u")).await.0, 200);
}

async fn wait_for_version(server: &Server, version: &str) {
    for _ in 0..200 {
        let (_, status_doc) = server
            .admin("GET", "/v1/admin/rule", None, Some(TOKEN))
            .await;
        if status_doc["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["version"] == version)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the watched file was not installed within 10 s");
}

/// The dead-letter workflow: a rule fails on a request, a fixed rule is installed, and the dead
/// letter is resubmitted and applied.
#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_can_be_resubmitted_after_a_fix() {
    let server = Server::start_with(with_token().rule(guests::MISBEHAVE));
    let (status, answer) = server
        .request(json!({"kind": "panic", "key": "DL", "user": "u", "id": "dl-1"}))
        .await;
    assert_eq!(status, 500, "{answer}");
    let (_, letters) = server
        .admin("GET", "/v1/dead-letters", None, Some(TOKEN))
        .await;
    let letter = &letters["dead_letters"][0];
    let path = format!(
        "/v1/dead-letters/{}/{}/resubmit",
        letter["partition"], letter["seq"]
    );

    let (status, answer) = server.admin("POST", &path, None, Some(TOKEN)).await;
    assert_eq!(status, 500, "the same rule fails again: {answer}");
    assert_eq!(answer["error"]["code"], "rule_trap");

    assert_eq!(install(&server, "", wasm(guests::ECHO)).await.0, 200);
    let (status, answer) = server.admin("POST", &path, None, Some(TOKEN)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["id"], "dl-1", "the client's id is kept");
    assert_eq!(answer["state"]["status"], "echo-panic");
    let (status, answer) = server
        .admin("POST", "/v1/dead-letters/0/999/resubmit", None, Some(TOKEN))
        .await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(answer["error"]["code"], "unknown_dead_letter");
}
