//! No data loss: acknowledged transitions survive `kill -9`, retries are idempotent, routes
//! survive restarts, and a data dir is never opened with another partition layout.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rand::Rng;
use serde_json::Value;

use turnstile::router::{HashKind, Partitioner};

use crate::support::{Server, ServerArgs, body, run_cli};

/// Users reserved before a restart can still associate by user alone after it.
#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_associate_by_user_routing() {
    let dir = tempfile::tempdir().unwrap();
    let args = ServerArgs::default().data_dir(dir.path());
    let server = Server::start_with(args.clone());
    for u in 0..20 {
        let (status, _) = server
            .request(body("reserve", Some(&format!("K-{u}")), &format!("u-{u}")))
            .await;
        assert_eq!(status, 200);
    }
    assert!(server.terminate(), "clean exit on SIGTERM");

    let server = Server::start_with(args);
    for u in 0..20 {
        let (status, answer) = server
            .request(body("associate", None, &format!("u-{u}")))
            .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["key"], format!("K-{u}"));
        assert_eq!(answer["state"]["status"], "associated");
    }
}

/// A data dir made with N = 4 is refused with N = 8, with a message that says how to migrate,
/// and its data is untouched.
#[tokio::test(flavor = "multi_thread")]
async fn other_partition_count_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(ServerArgs::default().data_dir(dir.path()));
    assert_eq!(
        server.request(body("reserve", Some("K"), "alice")).await.0,
        200
    );
    assert!(server.terminate());

    let err = Server::refused(
        ServerArgs::default()
            .data_dir(dir.path())
            .config("[partitions]\nservers = 2\ncontainers = 4\n"),
    );
    assert!(err.contains("holds 4 partitions"), "{err}");
    assert!(err.contains("turnstile repartition"), "{err}");
    let err = Server::refused(
        ServerArgs::default()
            .data_dir(dir.path())
            .config("[partitions]\nhash = \"murmur2\"\n"),
    );
    assert!(err.contains("murmur2"), "{err}");

    let server = Server::start_with(ServerArgs::default().data_dir(dir.path()));
    assert_eq!(
        server.get("/v1/keys/K").await.1["state"]["status"],
        "reserved"
    );
}

/// `turnstile repartition` moves a data dir from N = 4 (java) to N = 6 (murmur2): every state,
/// route and dedup entry follows its key; a running server's data dir is refused.
#[tokio::test(flavor = "multi_thread")]
async fn repartition_moves_every_key_route_and_id() {
    const USERS: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(ServerArgs::default().data_dir(dir.path()));
    let mut answers = Vec::new();
    for u in 0..USERS {
        let mut reserve = body("reserve", Some(&format!("M-{u}")), &format!("mu-{u}"));
        reserve["id"] = format!("m-{u}").into();
        let (status, answer) = server.request(reserve).await;
        assert_eq!(status, 200);
        answers.push(answer);
        if u % 2 == 0 {
            assert_eq!(
                server
                    .request(body("associate", None, &format!("mu-{u}")))
                    .await
                    .0,
                200
            );
        }
    }
    let data_dir = dir.path().to_str().unwrap();
    let (ok, _, stderr) = run_cli(&[
        "repartition",
        "--data-dir",
        data_dir,
        "--servers",
        "2",
        "--containers",
        "3",
    ]);
    assert!(!ok, "repartitioned under a running server");
    assert!(stderr.contains("still running"), "{stderr}");
    assert!(server.terminate());

    let (ok, stdout, stderr) = run_cli(&[
        "repartition",
        "--data-dir",
        data_dir,
        "--servers",
        "2",
        "--containers",
        "3",
        "--hash",
        "murmur2",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains(&format!("{USERS} states")), "{stdout}");
    assert!(stdout.contains(&format!("{USERS} routes")), "{stdout}");

    Server::refused(ServerArgs::default().data_dir(dir.path()));
    let server = Server::start_with(
        ServerArgs::default()
            .data_dir(dir.path())
            .config("[partitions]\nservers = 2\ncontainers = 3\nhash = \"murmur2\"\n"),
    );
    let partitioner = Partitioner::new(HashKind::Murmur2, 6);
    let mut retried = Vec::new();
    for (u, first) in answers.iter().enumerate() {
        let key = format!("M-{u}");
        let (status, state) = server.get(&format!("/v1/keys/{key}")).await;
        assert_eq!(status, 200, "{key} lost");
        assert_eq!(state["partition"], partitioner.partition(&key));
        let expected = if u % 2 == 0 {
            ("associated", 2)
        } else {
            ("reserved", 1)
        };
        assert_eq!(state["state"]["status"], expected.0);
        assert_eq!(state["state"]["version"], expected.1);
        if u % 2 == 1 {
            // The route moved with its key: associate by user alone.
            let (status, answer) = server
                .request(body("associate", None, &format!("mu-{u}")))
                .await;
            assert_eq!(status, 200, "{answer}");
            assert_eq!(answer["key"], key);
        }
        // The dedup entry moved too: a retry is answered, not applied.
        let mut retry = body("reserve", Some(&key), &format!("mu-{u}"));
        retry["id"] = format!("m-{u}").into();
        let (status, answer) = server.request(retry).await;
        assert_eq!(status, 200);
        assert_eq!(answer["state"], first["state"]);
        assert_eq!(answer["partition"], partitioner.partition(&key));
        retried.push(answer);
    }
    // Its `seq` is where the request's log entry is now, not where it was: the old position is
    // another request's in the new layout.
    assert!(server.terminate());
    let logged = logged_ids(data_dir);
    let mut moved = 0;
    for (u, (first, answer)) in answers.iter().zip(&retried).enumerate() {
        let position = (
            answer["partition"].as_u64().unwrap(),
            answer["seq"].as_u64().unwrap(),
        );
        assert_eq!(
            logged.get(&position),
            Some(&Value::from(format!("m-{u}"))),
            "{answer}"
        );
        moved += usize::from(first["seq"] != answer["seq"]);
    }
    // Positions did change (else the check above could not tell the old one from the new).
    assert!(moved > 0);
}

/// Every log entry of a stopped data dir: (partition, seq) → the id of its request.
fn logged_ids(data_dir: &str) -> HashMap<(u64, u64), Value> {
    let (ok, stdout, stderr) = run_cli(&["inspect", "--data-dir", data_dir, "--table", "log"]);
    assert!(ok, "{stderr}");
    stdout
        .lines()
        .map(|line| {
            let record: Value = serde_json::from_str(line).unwrap();
            let position = (
                record["partition"].as_u64().unwrap(),
                record["key"].as_u64().unwrap(),
            );
            (position, record["value"]["request"]["id"].clone())
        })
        .collect()
}

/// A request whose log entry the log's retention removed before a repartition has no position
/// in the new layout: a retry answers `seq` 0, never a position another request holds.
#[tokio::test(flavor = "multi_thread")]
async fn repartition_answers_seq_0_for_a_request_whose_log_entry_is_gone() {
    const REQUESTS: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        ServerArgs::default()
            .data_dir(dir.path())
            .config("[store]\nlog_retention = 4\n"),
    );
    for i in 0..REQUESTS {
        let mut reserve = body("reserve", Some(&format!("G-{i}")), &format!("gu-{i}"));
        reserve["id"] = format!("g-{i}").into();
        assert_eq!(server.request(reserve).await.0, 200);
    }
    assert!(server.terminate());
    let data_dir = dir.path().to_str().unwrap();
    let (ok, _, stderr) = run_cli(&[
        "repartition",
        "--data-dir",
        data_dir,
        "--servers",
        "1",
        "--containers",
        "3",
    ]);
    assert!(ok, "{stderr}");
    // Read before the server runs again (with a retention it would trim the log further).
    let logged = logged_ids(data_dir);
    let config = "[partitions]\nservers = 1\ncontainers = 3\n";
    let server = Server::start_with(ServerArgs::default().data_dir(dir.path()).config(config));
    let mut answers = Vec::new();
    for i in 0..REQUESTS {
        let mut retry = body("reserve", Some(&format!("G-{i}")), &format!("gu-{i}"));
        retry["id"] = format!("g-{i}").into();
        let (status, answer) = server.request(retry).await;
        assert_eq!(status, 200, "{answer}");
        answers.push(answer);
    }
    let mut gone = 0;
    for (i, answer) in answers.iter().enumerate() {
        let id = Value::from(format!("g-{i}"));
        let position = (
            answer["partition"].as_u64().unwrap(),
            answer["seq"].as_u64().unwrap(),
        );
        if position.1 == 0 {
            gone += 1;
            assert!(
                !logged.values().any(|logged| *logged == id),
                "{id} is logged: {answer}"
            );
        } else {
            assert_eq!(logged.get(&position), Some(&id), "{answer}");
        }
    }
    // The retention did remove entries, and kept some.
    assert!(
        gone > 0 && gone < REQUESTS,
        "{gone} of {REQUESTS} answered seq 0"
    );
}

/// A missing or corrupt partition file is reported by path, not silently recreated empty.
#[test]
fn missing_or_corrupt_partition_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(ServerArgs::default().data_dir(dir.path()));
    assert!(server.terminate());
    let file = dir.path().join("generation-1/partition-0002.redb");
    std::fs::remove_file(&file).unwrap();
    let err = Server::refused(ServerArgs::default().data_dir(dir.path()));
    assert!(err.contains("partition-0002.redb"), "{err}");

    // A corrupt one is reported by path too, not replaced by an empty one.
    std::fs::write(
        &file,
        b"this is not a redb file, it is garbage of some length",
    )
    .unwrap();
    let err = Server::refused(ServerArgs::default().data_dir(dir.path()));
    assert!(err.contains("partition-0002.redb"), "{err}");
}

const CRASH_USERS: usize = 600;
const CRASH_ROUNDS: usize = 4;

/// What the load generator saw acknowledged: request id → answer.
type Acks = Arc<std::sync::Mutex<HashMap<String, Value>>>;

/// Kill -9 the server at random moments under concurrent load, restart it on the same data dir,
/// and check that every acknowledged request survived and that retrying everything converges,
/// with every request applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_loses_no_acknowledged_request() {
    let dir = tempfile::tempdir().unwrap();
    let args = ServerArgs::default().data_dir(dir.path());
    let acks: Acks = Arc::default();
    let next_user = Arc::new(AtomicUsize::new(0));

    for round in 0..CRASH_ROUNDS {
        let server = Arc::new(Server::start_with(args.clone()));
        check_acknowledged(&server, &acks).await;

        let mut workers = Vec::new();
        for _ in 0..16 {
            let (server, acks, next_user) = (server.clone(), acks.clone(), next_user.clone());
            workers.push(tokio::spawn(async move {
                loop {
                    let u = next_user.fetch_add(1, Ordering::Relaxed) % CRASH_USERS;
                    for request in user_requests(u) {
                        match try_request(&server, &request).await {
                            Some((200, answer)) => {
                                acks.lock()
                                    .unwrap()
                                    .insert(request["id"].as_str().unwrap().into(), answer);
                            }
                            Some((status, answer)) => panic!("{request} -> {status} {answer}"),
                            None => return, // the server is gone
                        }
                    }
                }
            }));
        }
        let uptime = rand::rng().random_range(150..600);
        tokio::time::sleep(Duration::from_millis(uptime)).await;
        match Arc::try_unwrap(server) {
            Ok(server) => server.kill9(),
            Err(server) => {
                // Workers still hold it: kill by pid, then let them see the dead socket.
                let _ = std::process::Command::new("kill")
                    .args(["-9", &server.pid().to_string()])
                    .status();
            }
        }
        for w in workers {
            w.await.unwrap();
        }
        eprintln!(
            "round {round}: {} requests acknowledged so far",
            acks.lock().unwrap().len()
        );
    }

    let server = Server::start_with(args);
    check_acknowledged(&server, &acks).await;
    assert!(
        acks.lock().unwrap().len() > 50,
        "the load generator got acknowledgements"
    );

    // Retry every request of every user, acknowledged or not: the acknowledged ones get their
    // original answer (a transition, not a reject: nothing is applied twice), the others apply now.
    for u in 0..CRASH_USERS {
        for (i, request) in user_requests(u).into_iter().enumerate() {
            let (status, answer) = server.request(request.clone()).await;
            assert_eq!(status, 200, "{request} -> {answer}");
            assert_eq!(
                answer["state"]["version"],
                i as u64 + 1,
                "{request} -> {answer}"
            );
            if let Some(first) = acks.lock().unwrap().get(request["id"].as_str().unwrap()) {
                assert_eq!(&answer, first, "a retry returns the acknowledged answer");
            }
        }
        let (_, key) = server.get(&format!("/v1/keys/C-{u}")).await;
        assert_eq!(key["state"]["status"], "associated");
        assert_eq!(key["state"]["version"], 2);
    }
}

fn user_requests(u: usize) -> [Value; 2] {
    let mut reserve = body("reserve", Some(&format!("C-{u}")), &format!("cu-{u}"));
    reserve["id"] = format!("c-reserve-{u}").into();
    let mut associate = body("associate", Some(&format!("C-{u}")), &format!("cu-{u}"));
    associate["id"] = format!("c-associate-{u}").into();
    [reserve, associate]
}

/// Sends a request; `None` when the server is unreachable (killed).
async fn try_request(server: &Server, request: &Value) -> Option<(u16, Value)> {
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{}/v1/requests", server.url))
        .json(request)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    let answer = response.json().await.ok()?;
    Some((status, answer))
}

/// Every acknowledged request's effect is in the store.
async fn check_acknowledged(server: &Server, acks: &Acks) {
    let acks = acks.lock().unwrap().clone();
    for (id, answer) in acks {
        let key = answer["key"].as_str().unwrap();
        let (status, state) = server.get(&format!("/v1/keys/{key}")).await;
        assert_eq!(status, 200, "acknowledged {id} lost: {key} has no state");
        let acked_version = answer["state"]["version"].as_u64().unwrap();
        let version = state["state"]["version"].as_u64().unwrap();
        assert!(
            version >= acked_version,
            "acknowledged {id} (version {acked_version}) lost: now {version}"
        );
    }
}

/// A tmpfs mount that is unmounted when dropped (also when the test panics).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "this test needs to mount a small tmpfs (run it as root, as CI does)"
        );
        SmallDisk { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A full disk fails the requests of the batch with 503 `store_unavailable` (nothing of them is
/// stored or acknowledged), and the partition recovers when space comes back.
#[tokio::test(flavor = "multi_thread")]
async fn full_disk_fails_the_batch_and_recovers() {
    let disk = SmallDisk::mount("8m");
    let data = disk.dir.path().join("data");
    let server = Server::start_with(
        ServerArgs::default()
            .data_dir(&data)
            .config("[server]\nreadiness_stall_ms = 300\n"),
    );
    assert_eq!(
        server
            .request(body("reserve", Some("before"), "u0"))
            .await
            .0,
        200
    );

    // Fill the disk.
    let filler = disk.dir.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }

    let payload = "x".repeat(16 * 1024);
    let mut failed = Vec::new();
    for i in 0..400 {
        let mut request = body("reserve", Some(&format!("full-{i}")), &format!("fu-{i}"));
        request["id"] = format!("full-{i}").into();
        request["payload"] = payload.clone().into();
        let (status, answer) = server.request(request.clone()).await;
        match status {
            200 => {}
            503 => {
                assert_eq!(answer["error"]["code"], "store_unavailable", "{answer}");
                failed.push(request);
                if failed.len() >= 3 {
                    break;
                }
            }
            _ => panic!("{status} {answer}"),
        }
    }
    assert!(!failed.is_empty(), "the disk never filled up");
    for request in &failed {
        let key = request["key"].as_str().unwrap();
        let (status, doc) = server.get(&format!("/v1/keys/{key}")).await;
        assert_eq!(status, 404, "{key} was stored: {doc}");
    }

    // A partition whose every batch fails is not ready, although its queue stays short (a
    // full disk answers at once).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut not_ready = false;
    let mut i = 0;
    while !not_ready && std::time::Instant::now() < deadline {
        let mut request = body("reserve", Some(&format!("more-{i}")), &format!("mo-{i}"));
        request["payload"] = payload.clone().into();
        let (status, _) = server.request(request).await;
        assert_eq!(status, 503);
        not_ready = server.get("/readyz").await.0 == 503;
        i += 1;
    }
    assert!(
        not_ready,
        "/readyz said ready while every write failed: {}",
        server.get("/v1/partitions").await.1
    );

    std::fs::remove_file(&filler).unwrap();
    for request in &failed {
        let (status, answer) = server.request(request.clone()).await;
        assert_eq!(status, 200, "no recovery after the disk freed up: {answer}");
        assert_eq!(answer["state"]["version"], 1);
    }
    assert_eq!(server.get("/v1/keys/before").await.1["state"]["version"], 1);
    // A partition that saw failures and then nothing more is ready again once
    // `readiness_stall_ms` (300 ms here) has passed without a failure; the sampler looks every
    // 100 ms, so allow it a few rounds.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut ready = server.get("/readyz").await;
    while ready.0 != 200 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready = server.get("/readyz").await;
    }
    assert_eq!(
        ready.0, 200,
        "not ready again once writes commit: {}",
        ready.1
    );
    assert!(server.terminate());
}

/// `durability = "none"` loses at most `store.flush_interval_ms` on a crash: keys written, an
/// idle wait longer than the window, `kill -9`, and every key is there after a restart.
#[tokio::test(flavor = "multi_thread")]
async fn durability_none_syncs_within_the_flush_interval() {
    let dir = tempfile::tempdir().unwrap();
    let args = ServerArgs::default()
        .data_dir(dir.path())
        .config("[store]\ndurability = \"none\"\nflush_interval_ms = 200\n");
    let server = Server::start_with(args.clone());
    for u in 0..200 {
        let (status, answer) = server
            .request(body("reserve", Some(&format!("N-{u}")), &format!("n-{u}")))
            .await;
        assert_eq!(status, 200, "{answer}");
    }
    // Longer than the window: an idle partition must sync on its own.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill9();

    let server = Server::start_with(args);
    for u in 0..200 {
        let (status, doc) = server.get(&format!("/v1/keys/N-{u}")).await;
        assert_eq!(status, 200, "N-{u} lost: {doc}");
    }
}

/// Two keys, the first on a later old partition (java, N = 4) than the second, both on the same
/// new partition (java, N = 6): the layout where "last scanned wins" keeps the older record.
fn older_scanned_last(prefix: &str) -> (String, String) {
    let old = Partitioner::new(HashKind::Java, 4);
    let new = Partitioner::new(HashKind::Java, 6);
    let keys: Vec<String> = (0..200).map(|i| format!("{prefix}-{i}")).collect();
    for older in &keys {
        for newer in &keys {
            if old.partition(older) > old.partition(newer)
                && new.partition(older) == new.partition(newer)
            {
                return (older.clone(), newer.clone());
            }
        }
    }
    unreachable!("no such pair among {} keys", keys.len())
}

/// A user who reserved two keys over time, and a client id used for two requests on different
/// partitions: after a repartition the user's route is the newest one, and a retry of the newest
/// request with that id gets its answer, whatever order the old files were read in.
#[tokio::test(flavor = "multi_thread")]
async fn repartition_keeps_the_newest_route_and_dedup_entry() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(ServerArgs::default().data_dir(dir.path()));
    let (older, newer) = older_scanned_last("R");
    for key in [&older, &newer] {
        let (status, answer) = server.request(body("reserve", Some(key), "roamer")).await;
        assert_eq!(status, 200, "{answer}");
    }
    let (older_id_key, newer_id_key) = older_scanned_last("D");
    let mut first = body("reserve", Some(&older_id_key), "d-user-1");
    first["id"] = "shared-id".into();
    assert_eq!(server.request(first).await.0, 200);
    let mut second = body("reserve", Some(&newer_id_key), "d-user-2");
    second["id"] = "shared-id".into();
    let (status, second_answer) = server.request(second.clone()).await;
    assert_eq!(status, 200, "{second_answer}");
    assert!(server.terminate());

    let (ok, stdout, stderr) = run_cli(&[
        "repartition",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--servers",
        "2",
        "--containers",
        "3",
    ]);
    assert!(ok, "{stderr}");
    // Counted in the new files: one route per user, one entry per id.
    assert!(stdout.contains("4 states"), "{stdout}");
    assert!(stdout.contains("3 routes"), "{stdout}");
    assert!(stdout.contains("1 dedup entries"), "{stdout}");

    let server = Server::start_with(
        ServerArgs::default()
            .data_dir(dir.path())
            .config("[partitions]\nservers = 2\ncontainers = 3\n"),
    );
    let (status, answer) = server.get("/v1/users/roamer").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["key"], newer.as_str());
    let (status, answer) = server.request(body("associate", None, "roamer")).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["key"], newer.as_str());

    let (status, retried) = server.request(second).await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(retried["seq"], second_answer["seq"]);
    assert_eq!(retried["state"], second_answer["state"]);
}

const ADMIN_TOKEN: &str = "durability-admin-token";

/// The rule version running on every partition survives a repartition (with its history);
/// a repartition during a canary is refused and changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn repartition_keeps_the_running_rule_and_refuses_during_a_canary() {
    let dir = tempfile::tempdir().unwrap();
    let admin = format!("[admin]\ntoken = \"{ADMIN_TOKEN}\"\n");
    let args = ServerArgs::default().data_dir(dir.path()).config(&admin);
    let v2 = std::fs::read(crate::support::guests::RESERVATION_V2).unwrap();
    let server = Server::start_with(args.clone());
    let (status, answer) = server
        .admin(
            "PUT",
            "/v1/admin/rule?partitions=1",
            Some(v2.clone()),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let version = answer["version"].as_str().unwrap().to_string();
    assert!(server.terminate());

    let repartition = || {
        run_cli(&[
            "repartition",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--servers",
            "2",
            "--containers",
            "3",
        ])
    };
    let (ok, _, stderr) = repartition();
    assert!(!ok, "repartitioned during a canary");
    assert!(stderr.contains("canary"), "{stderr}");
    let layout = std::fs::read_to_string(dir.path().join("turnstile.json")).unwrap();
    assert!(layout.contains("\"partitions\": 4"), "{layout}");

    let server = Server::start_with(args);
    let (status, answer) = server
        .admin("PUT", "/v1/admin/rule", Some(v2), Some(ADMIN_TOKEN))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert!(server.terminate());
    let (ok, _, stderr) = repartition();
    assert!(ok, "{stderr}");

    let server = Server::start_with(ServerArgs::default().data_dir(dir.path()).config(&format!(
        "{admin}[partitions]\nservers = 2\ncontainers = 3\n"
    )));
    let (status, answer) = server
        .admin("GET", "/v1/admin/rule", None, Some(ADMIN_TOKEN))
        .await;
    assert_eq!(status, 200, "{answer}");
    let running: Vec<&str> = answer["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["version"].as_str().unwrap())
        .collect();
    assert_eq!(running, vec![version.as_str(); 6], "{answer}");
    assert_eq!(answer["history"].as_array().unwrap().len(), 2, "{answer}");
}

/// `turnstile backup` under concurrent load (issue 12 item 11): every key acknowledged before
/// the backup started is in it, `turnstile run` on the backup serves them with the rule version
/// that was running, and `turnstile replay` reads it; replay on the live dir says it is in use
/// by a running server.
#[tokio::test(flavor = "multi_thread")]
async fn online_backup_under_load_serves_every_acknowledged_key() {
    let dir = tempfile::tempdir().unwrap();
    let backup_parent = tempfile::tempdir().unwrap();
    let out = backup_parent.path().join("backup");
    let admin = format!("[admin]\ntoken = \"{ADMIN_TOKEN}\"\n");
    let server = Arc::new(Server::start_with(
        ServerArgs::default().data_dir(dir.path()).config(&admin),
    ));
    let v2 = std::fs::read(crate::support::guests::RESERVATION_V2).unwrap();
    let (status, answer) = server
        .admin("PUT", "/v1/admin/rule", Some(v2), Some(ADMIN_TOKEN))
        .await;
    assert_eq!(status, 200, "{answer}");
    let version = answer["version"].as_str().unwrap().to_string();

    // Writers keep going until told to stop; each acknowledged key is recorded with whether it
    // was acknowledged before the backup was asked for.
    let backup_asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (server, backup_asked, stop) = (server.clone(), backup_asked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut before = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) || i < 50 {
                let key = format!("B-{w}-{i}");
                let mut request = body("reserve", Some(&key), &format!("b-user-{w}-{i}"));
                request["id"] = format!("b-{w}-{i}").into();
                let asked = backup_asked.load(Ordering::SeqCst);
                let (status, answer) = server.request(request).await;
                assert_eq!(status, 200, "{answer}");
                if !asked {
                    before.push(key);
                }
                i += 1;
            }
            before
        }));
    }
    while server.get("/v1/partitions").await.1["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["processed"].as_u64().unwrap())
        .sum::<u64>()
        < 100
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Replaying the live dir names the running server, not a crash.
    let (ok, _, stderr) = run_cli(&[
        "replay",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--rule",
        crate::support::guests::RESERVATION,
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("in use") && stderr.contains("running"),
        "{stderr}"
    );

    backup_asked.store(true, Ordering::SeqCst);
    let (url, out_arg) = (server.url.clone(), out.to_str().unwrap().to_string());
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || {
        run_cli(&[
            "backup",
            "--url",
            &url,
            "--out",
            &out_arg,
            "--token",
            ADMIN_TOKEN,
        ])
    })
    .await
    .unwrap();
    assert!(ok, "{stdout}{stderr}");
    stop.store(true, Ordering::SeqCst);
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.unwrap());
    }
    assert!(acknowledged.len() >= 100);

    // A second backup into the same directory is refused: it is not empty.
    let (status, answer) = server
        .admin(
            "POST",
            &format!("/v1/admin/backup?out={}", out.display()),
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    // Nor into the data dir itself (it would copy `rules/` into itself, or sit in a generation
    // directory that a repartition replaces).
    for inside in ["rules/backup", "generation-2", "generation-1/backup"] {
        let (status, answer) = server
            .admin(
                "POST",
                &format!("/v1/admin/backup?out={}", dir.path().join(inside).display()),
                None,
                Some(ADMIN_TOKEN),
            )
            .await;
        assert_eq!(status, 400, "{inside}: {answer}");
    }
    assert!(!dir.path().join("rules/backup").exists());

    let (ok, stdout, stderr) = run_cli(&[
        "replay",
        "--data-dir",
        out.to_str().unwrap(),
        "--rule",
        crate::support::guests::RESERVATION_V2,
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert!(report["decisions"].as_u64().unwrap() >= acknowledged.len() as u64);
    assert_eq!(report["different"], 0, "{report}");

    let restored = Server::start_with(ServerArgs::default().data_dir(&out).config(&admin));
    for key in &acknowledged {
        let (status, answer) = restored.get(&format!("/v1/keys/{key}")).await;
        assert_eq!(status, 200, "{key}: {answer}");
        assert_eq!(answer["state"]["status"], "reserved", "{key}: {answer}");
    }
    let (_, rules) = restored
        .admin("GET", "/v1/admin/rule", None, Some(ADMIN_TOKEN))
        .await;
    for partition in rules["partitions"].as_array().unwrap() {
        assert_eq!(partition["version"], version.as_str(), "{rules}");
    }
}

/// A server without a data dir keeps its rule versions in memory only; its backup still runs
/// the version its states were decided by (an installed one, not the one it started with).
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_of_a_server_without_a_data_dir_runs_its_installed_rule() {
    let backup_parent = tempfile::tempdir().unwrap();
    let out = backup_parent.path().join("backup");
    let admin = format!("[admin]\ntoken = \"{ADMIN_TOKEN}\"\n");
    let server = Server::start_with(ServerArgs::default().config(&admin));
    let v2 = std::fs::read(crate::support::guests::RESERVATION_V2).unwrap();
    let (status, answer) = server
        .admin("PUT", "/v1/admin/rule", Some(v2), Some(ADMIN_TOKEN))
        .await;
    assert_eq!(status, 200, "{answer}");
    let version = answer["version"].as_str().unwrap().to_string();
    for i in 0..20 {
        let (status, answer) = server
            .request(body("reserve", Some(&format!("M-{i}")), &format!("m-{i}")))
            .await;
        assert_eq!(status, 200, "{answer}");
    }
    let (url, out_arg) = (server.url.clone(), out.to_str().unwrap().to_string());
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || {
        run_cli(&[
            "backup",
            "--url",
            &url,
            "--out",
            &out_arg,
            "--token",
            ADMIN_TOKEN,
        ])
    })
    .await
    .unwrap();
    assert!(ok, "{stdout}{stderr}");

    let restored = Server::start_with(ServerArgs::default().data_dir(&out).config(&admin));
    let (_, rules) = restored
        .admin("GET", "/v1/admin/rule", None, Some(ADMIN_TOKEN))
        .await;
    for partition in rules["partitions"].as_array().unwrap() {
        assert_eq!(partition["version"], version.as_str(), "{rules}");
    }
    for i in 0..20 {
        let (status, answer) = restored.get(&format!("/v1/keys/M-{i}")).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            answer["state"]["rule_version"],
            version.as_str(),
            "{answer}"
        );
    }
}

/// Retention for the steady workloads; the wall-clock rule deadline is the sandbox tests'
/// subject, and on 2 shared cores a descheduled partition thread must not fail a request here.
const STEADY_CONFIG: &str = "[store]\nlog_retention = 1000\n[rule]\ndeadline_ms = 2000\n";

/// A steady workload: `requests` reserves over 400 keys and users (so states and routes stop
/// growing after the first round), from 8 concurrent clients; every answer is 200 or 409.
async fn steady_load(server: &Arc<Server>, round: usize, requests: usize) {
    let mut clients = Vec::new();
    for c in 0..8 {
        let server = server.clone();
        clients.push(tokio::spawn(async move {
            for i in 0..requests / 8 {
                let k = (round * requests + i * 8 + c) % 400;
                let (status, answer) = server
                    .request(body(
                        "reserve",
                        Some(&format!("S-{k}")),
                        &format!("s-user-{k}"),
                    ))
                    .await;
                assert!(status == 200 || status == 409, "{status} {answer}");
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
}

/// Resident set size of a process, from /proc, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Issue 12 item 8, memory mode: with a log retention, RSS plateaus under a steady workload
/// (without one it grows about 1.1 KiB per request, ~13 MiB over the measured 12 000).
#[tokio::test(flavor = "multi_thread")]
async fn memory_mode_rss_plateaus_with_a_log_retention() {
    let server = Arc::new(Server::start_with(
        ServerArgs::default().config(STEADY_CONFIG),
    ));
    steady_load(&server, 0, 4000).await;
    let before = rss_kib(server.pid());
    for round in 1..4 {
        steady_load(&server, round, 4000).await;
    }
    let after = rss_kib(server.pid());
    assert!(
        after < before + 4 * 1024,
        "RSS grew from {before} KiB to {after} KiB over 12 000 requests"
    );
}

/// The total size of a data dir's partition files.
fn partition_files_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir.join("generation-1"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// Issue 12 item 8, data dir: with a log retention the partition files stop growing under a
/// steady workload (redb reuses the freed pages; without it they grow ~1 KiB per request), the
/// size shows in `/v1/partitions` and `/metrics`, and `replay` reads the trimmed log, telling
/// which decisions it could not replay.
#[tokio::test(flavor = "multi_thread")]
async fn data_dir_stops_growing_with_a_log_retention() {
    let dir = tempfile::tempdir().unwrap();
    let server = Arc::new(Server::start_with(
        ServerArgs::default()
            .data_dir(dir.path())
            .config(STEADY_CONFIG),
    ));
    steady_load(&server, 0, 4000).await;
    steady_load(&server, 1, 4000).await;
    let before = partition_files_bytes(dir.path());
    for round in 2..4 {
        steady_load(&server, round, 4000).await;
    }
    let after = partition_files_bytes(dir.path());
    assert!(
        after <= before + before / 4,
        "partition files grew from {before} to {after} bytes over 8 000 requests"
    );

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, partitions) = server.get("/v1/partitions").await;
        let sizes: Vec<u64> = partitions["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["data_bytes"].as_u64().unwrap())
            .collect();
        if sizes.iter().all(|s| *s > 0) {
            assert!(sizes.iter().sum::<u64>() <= after + after / 4, "{sizes:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{partitions}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, metrics) = server.get_text("/metrics").await;
    assert!(
        metrics.contains("turnstile_partition_data_bytes{partition=\"0\"}"),
        "{metrics}"
    );
    let server = Arc::into_inner(server).expect("no client holds the server");
    assert!(server.terminate());

    let (ok, stdout, stderr) = run_cli(&[
        "replay",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--rule",
        crate::support::guests::RESERVATION,
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let kept = report["decisions"].as_u64().unwrap() + report["skipped"].as_u64().unwrap();
    assert!(kept <= 4 * 1000, "{report}");
    assert!(report["skipped"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["different"], 0, "{report}");
}

/// Issue 12 item 8: stored routes expire with `routes.ttl_seconds` on disk too, removed in the
/// background; after the server stops, the partition files hold none of them.
#[tokio::test(flavor = "multi_thread")]
async fn stored_routes_expire_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        ServerArgs::default()
            .data_dir(dir.path())
            .config("[routes]\nttl_seconds = 1\n[rule]\ndeadline_ms = 2000\n"),
    );
    for u in 0..20 {
        let (status, answer) = server
            .request(body(
                "reserve",
                Some(&format!("T-{u}")),
                &format!("t-user-{u}"),
            ))
            .await;
        assert_eq!(status, 200, "{answer}");
    }
    // Wait for the sweeps to report every route removed (an event, not a duration).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, metrics) = server.get_text("/metrics").await;
        let expired: u64 = metrics
            .lines()
            .filter(|l| l.starts_with("turnstile_partition_routes_expired_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        if expired >= 20 {
            assert_eq!(expired, 20, "{metrics}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(server.terminate());

    let generation = dir.path().join("generation-1");
    for p in 0..4 {
        let store = turnstile::store::PartitionStore::open(
            &turnstile::store::Location::Dir(generation.clone()),
            p,
            turnstile::config::Durability::Sync,
            10,
        )
        .unwrap();
        let left = store.reader().routes_page(None, 100).unwrap();
        assert_eq!(left.len(), 0, "partition {p}");
    }
}
