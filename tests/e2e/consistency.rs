//! Consistency under concurrency, the patent's promise: thousands of users, each sending reserve
//! then associate from many concurrent clients with random interleaving across users; every user
//! ends `associated` with exactly two transitions, and no request is lost or applied twice.
//!
//! Routes (issue 12): a user's route is what the applied keyed requests made it, in applied
//! order: requests that were not applied, retries answered from dedup and clock steps move
//! nothing; a user-only retry gets its first answer wherever the route went; unknown users'
//! lookups stay off the partitions' write queues.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde_json::Value;
use tokio::sync::Semaphore;
use turnstile::router::{HashKind, Partitioner};

use crate::support::{Server, ServerArgs, body, guests};

const USERS: usize = 2000;
const CLIENTS: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_user_ends_associated_under_concurrent_load() {
    let dir = tempfile::tempdir().unwrap();
    let server = Arc::new(Server::start_with(
        ServerArgs::default()
            .data_dir(dir.path())
            // The default deadline: it counts CPU time, so 2 cores shared with the other tests
            // do not turn this ordering test into a timing one.
            .config("[partitions]\nservers = 2\ncontainers = 3\n"),
    ));
    let clients = Arc::new(Semaphore::new(CLIENTS));
    let mut tasks = Vec::with_capacity(USERS);
    for u in 0..USERS {
        let (server, clients) = (server.clone(), clients.clone());
        tasks.push(tokio::spawn(async move {
            let pause = || Duration::from_micros(rand::rng().random_range(0..3000));
            tokio::time::sleep(pause()).await;
            let reserved = {
                let _client = clients.acquire().await.unwrap();
                let mut request = body("reserve", Some(&format!("R-{u}")), &format!("user-{u}"));
                request["id"] = format!("reserve-{u}").into();
                server.request(request).await
            };
            tokio::time::sleep(pause()).await;
            let associated = {
                let _client = clients.acquire().await.unwrap();
                // Only the user: routed through the route cache.
                let mut request = body("associate", None, &format!("user-{u}"));
                request["id"] = format!("associate-{u}").into();
                server.request(request).await
            };
            (u, reserved, associated)
        }));
    }
    for task in tasks {
        let (u, (s1, reserved), (s2, associated)) = task.await.unwrap();
        assert_eq!(s1, 200, "user {u} reserve: {reserved}");
        assert_eq!(s2, 200, "user {u} associate: {associated}");
        assert_eq!(associated["key"], format!("R-{u}"));
        assert_eq!(associated["partition"], reserved["partition"], "user {u}");
        assert_eq!(reserved["state"]["version"], 1);
        assert_eq!(associated["state"]["version"], 2);
    }

    for u in 0..USERS {
        let (status, key) = server.get(&format!("/v1/keys/R-{u}")).await;
        assert_eq!(status, 200);
        assert_eq!(key["state"]["status"], "associated", "R-{u}");
        assert_eq!(key["state"]["version"], 2, "R-{u}: exactly two transitions");
        assert_eq!(key["state"]["user"], format!("user-{u}"));
    }

    let (_, partitions) = server.get("/v1/partitions").await;
    let partitions = partitions["partitions"].as_array().unwrap().clone();
    assert_eq!(partitions.len(), 6);
    let processed: u64 = partitions
        .iter()
        .map(|p| p["processed"].as_u64().unwrap())
        .sum();
    let deduplicated: u64 = partitions
        .iter()
        .map(|p| p["deduplicated"].as_u64().unwrap())
        .sum();
    assert_eq!(
        processed,
        2 * USERS as u64,
        "every request applied exactly once"
    );
    assert_eq!(deduplicated, 0);
    for p in &partitions {
        assert!(
            p["processed"].as_u64().unwrap() > 0,
            "load reached every partition: {p}"
        );
    }
}

/// Keys of `partition` under the default layout (4 partitions, Java hash).
fn keys_on(partition: u32, prefix: &str, count: usize) -> Vec<String> {
    let partitioner = Partitioner::new(HashKind::Java, 4);
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|k| partitioner.partition(k) == partition)
        .take(count)
        .collect()
}

/// The key `user`'s route points to, as `GET /v1/users/{user}` shows it.
async fn route_of(server: &Server, user: &str) -> String {
    let (status, view) = server.get(&format!("/v1/users/{user}")).await;
    assert_eq!(status, 200, "{view}");
    view["key"].as_str().unwrap().to_string()
}

fn with_id(mut request: Value, id: &str) -> Value {
    request["id"] = id.into();
    request
}

/// The server for the tests of requests that are not applied: the `misbehave` rule (whose
/// `loop` holds a partition until the deadline), one queue slot per partition.
fn misbehaving_server() -> Arc<Server> {
    Arc::new(Server::start_with(
        ServerArgs::default().rule(guests::MISBEHAVE).config(
            "[partitions]\nqueue_capacity = 1\nmax_batch = 1\n\
             [rule]\nfuel = 1000000000000000\ndeadline_ms = 1500\n",
        ),
    ))
}

/// A keyed request the rule failed on (`rule_trap`) was not applied: the user's route stays on
/// the key of the last applied one.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_the_rule_failed_on_moves_no_route() {
    let server = misbehaving_server();
    let on_0 = keys_on(0, "applied", 1).remove(0);
    let on_3 = keys_on(3, "trap", 1).remove(0);
    assert_eq!(
        server.request(body("set", Some(&on_0), "trapped")).await.0,
        200
    );
    let (status, answer) = server.request(body("panic", Some(&on_3), "trapped")).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (500, Some("rule_trap"))
    );
    assert_eq!(route_of(&server, "trapped").await, on_0);
    let (status, answer) = server.request(body("set", None, "trapped")).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["key"], on_0.as_str());
}

/// A keyed request refused with 503 `backpressure` (its partition's queue full) leaves the
/// user's route where it was: the next user-only request goes to the old key.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_refused_with_backpressure_moves_no_route() {
    let server = misbehaving_server();
    let on_0 = keys_on(0, "applied", 1).remove(0);
    let busy = keys_on(3, "busy", 3);

    // Partition 3 held by a `loop` request until its deadline, its one queue slot taken: the
    // next request for it is refused at once. Retried with a fresh user in case the slot was
    // not taken yet when it came.
    let mut refused = 0;
    for attempt in 0..5 {
        let user = format!("refused-{attempt}");
        assert_eq!(server.request(body("set", Some(&on_0), &user)).await.0, 200);
        let holder = {
            let server = server.clone();
            let key = busy[1].clone();
            tokio::spawn(async move { server.request(body("loop", Some(&key), "holder")).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let queued = {
            let server = server.clone();
            let key = busy[2].clone();
            tokio::spawn(async move { server.request(body("set", Some(&key), "queued")).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (status, answer) = server.request(body("set", Some(&busy[0]), &user)).await;
        holder.await.unwrap();
        queued.await.unwrap();
        if status == 503 {
            assert_eq!(answer["error"]["code"], "backpressure", "{answer}");
            assert_eq!(route_of(&server, &user).await, on_0);
            let (status, answer) = server.request(body("set", None, &user)).await;
            assert_eq!(status, 200, "{answer}");
            assert_eq!(answer["key"], on_0.as_str());
            refused += 1;
            break;
        }
    }
    assert!(refused > 0, "no request was refused with backpressure");
}

/// A retry of an old idempotent reserve is answered from dedup and changes nothing: the route
/// stays on the key reserved since.
#[tokio::test(flavor = "multi_thread")]
async fn an_old_retry_answered_from_dedup_moves_no_route() {
    let server = Server::start();
    let first = with_id(body("reserve", Some("OLD-1"), "retrier"), "old-reserve-1");
    let (status, answer) = server.request(first.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let second = with_id(body("reserve", Some("OLD-2"), "retrier"), "old-reserve-2");
    assert_eq!(server.request(second).await.0, 200);

    let (status, retried) = server.request(first).await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(retried, answer, "the retry gets the first answer");
    assert_eq!(route_of(&server, "retrier").await, "OLD-2");
    let (status, associated) = server.request(body("associate", None, "retrier")).await;
    assert_eq!(status, 200, "{associated}");
    assert_eq!(associated["key"], "OLD-2");
}

/// A user-only request retried with the same id after the user's route moved gets its first
/// answer, whether the new key is on the same partition as the old one or not; the new key is
/// not touched.
#[tokio::test(flavor = "multi_thread")]
async fn a_user_only_retry_gets_its_first_answer_after_the_route_moved() {
    let server = Server::start();
    let same = keys_on(1, "same", 2);
    let cases = [
        (same[0].clone(), same[1].clone()),
        (
            keys_on(1, "cross", 1).remove(0),
            keys_on(2, "cross", 1).remove(0),
        ),
    ];
    for (case, (old_key, new_key)) in cases.iter().enumerate() {
        let user = format!("mover-{case}");
        assert_eq!(
            server
                .request(body("reserve", Some(old_key), &user))
                .await
                .0,
            200
        );
        let associate = with_id(body("associate", None, &user), &format!("assoc-{case}"));
        let (status, first) = server.request(associate.clone()).await;
        assert_eq!(status, 200, "{first}");
        assert_eq!(first["key"], old_key.as_str());

        assert_eq!(
            server
                .request(body("reserve", Some(new_key), &user))
                .await
                .0,
            200
        );
        assert_eq!(route_of(&server, &user).await, *new_key);

        let (status, retried) = server.request(associate).await;
        assert_eq!(status, 200, "{retried}");
        assert_eq!(retried, first, "the retry gets the first answer");
        let (_, state) = server.get(&format!("/v1/keys/{new_key}")).await;
        assert_eq!(state["state"]["status"], "reserved", "{state}");
        assert_eq!(state["state"]["version"], 1, "{state}");
    }
}

/// Route recency is the order requests were applied in, not the clock: after the clock steps
/// back a minute, the route recorded after the step wins, in the cache and after a restart (the
/// library API lets the test choose each request's time).
#[tokio::test(flavor = "multi_thread")]
async fn a_clock_step_back_does_not_make_a_stale_route_win() {
    let dir = tempfile::tempdir().unwrap();
    let config = turnstile::config::Config::parse(&format!(
        "[store]\ndata_dir = {:?}\n",
        dir.path().display().to_string()
    ))
    .unwrap();
    let request = |kind: &str, key: Option<&str>| turnstile::model::Request {
        id: None,
        kind: kind.to_string(),
        key: key.map(str::to_string),
        user: "stepper".to_string(),
        payload: None,
    };
    // Keys on two partitions, so the stores too must agree on which route is newer.
    let before = keys_on(0, "step", 1).remove(0);
    let after = keys_on(3, "step", 1).remove(0);
    let now = turnstile::model::now_ms();
    let stepped_back = now - 60_000;
    {
        let runtime = turnstile::runtime::Runtime::start(&config, None).unwrap();
        runtime
            .submit_at(request("reserve", Some(&before)), now)
            .await
            .unwrap();
        runtime
            .submit_at(request("reserve", Some(&after)), stepped_back)
            .await
            .unwrap();
        let decision = runtime
            .submit_at(request("associate", None), stepped_back + 1)
            .await
            .unwrap();
        assert_eq!(decision.key, after);
        runtime.shutdown();
    }
    let runtime = turnstile::runtime::Runtime::start(&config, None).unwrap();
    let view = runtime
        .user_at("stepper", stepped_back + 2)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(view.key, after, "after a restart");
    runtime.shutdown();
}

/// A flood of requests from unknown users (each a route lookup) does not turn writes into 503s:
/// lookups do not go through the partitions' write queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_users_do_not_turn_writes_into_backpressure() {
    let server = Arc::new(Server::start_with(
        ServerArgs::default().config("[partitions]\nqueue_capacity = 2\n"),
    ));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = Vec::new();
    for f in 0..32 {
        let (server, stop) = (server.clone(), stop.clone());
        flood.push(tokio::spawn(async move {
            let (mut sent, mut other_answers) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let user = format!("stranger-{f}-{sent}");
                let (status, answer) = server.request(body("associate", None, &user)).await;
                if (status, answer["error"]["code"].as_str()) != (404, Some("unknown_route")) {
                    other_answers.push(format!("{status} {answer}"));
                }
                sent += 1;
            }
            (sent, other_answers)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut refused = Vec::new();
    for w in 0..200 {
        let (status, answer) = server
            .request(body(
                "reserve",
                Some(&format!("W-{w}")),
                &format!("writer-{w}"),
            ))
            .await;
        if status != 200 {
            refused.push(format!("{status} {answer}"));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut lookups, mut other_answers) = (0, Vec::new());
    for f in flood {
        let (sent, other) = f.await.unwrap();
        lookups += sent;
        other_answers.extend(other);
    }
    assert!(refused.is_empty(), "writes refused: {refused:?}");
    assert!(lookups > 200, "the flood sent {lookups} lookups");
    assert!(
        other_answers.is_empty(),
        "unknown users not answered 404 unknown_route: {other_answers:?}"
    );
}

/// Of two concurrent keyed requests of one user, the one applied last is the route. Both keys
/// are on one partition, so the log sequence numbers in the answers say which was applied last.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_two_concurrent_reserves_the_one_applied_last_is_the_route() {
    let config = turnstile::config::Config::parse("").unwrap();
    let runtime = Arc::new(turnstile::runtime::Runtime::start(&config, None).unwrap());
    let keys = keys_on(2, "race", 2000);
    let mut pairs = Vec::new();
    for (u, pair) in keys.chunks(2).enumerate() {
        let user = format!("racer-{u}");
        let submit = |key: &str| {
            let (runtime, request) = (
                runtime.clone(),
                turnstile::model::Request {
                    id: None,
                    kind: "reserve".into(),
                    key: Some(key.to_string()),
                    user: user.clone(),
                    payload: None,
                },
            );
            tokio::spawn(async move { runtime.submit(request).await.unwrap() })
        };
        pairs.push((user.clone(), submit(&pair[0]), submit(&pair[1])));
    }
    for (user, first, second) in pairs {
        let (first, second) = (first.await.unwrap(), second.await.unwrap());
        let last = if first.seq > second.seq {
            first
        } else {
            second
        };
        let view = runtime.user(&user).await.unwrap().unwrap();
        assert_eq!(view.key, last.key, "{user}");
    }
    runtime.shutdown();
}

/// After a restart the stored routes are loaded into the route cache in the background, while
/// requests are already served. Users whose routes the warm-up reaches last move to another key
/// right after the start; once the warm-up is over, their routes are where the moves put them
/// (the stored copies it loaded were older) and a user-only request follows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_route_moved_during_the_warm_up_stays_moved() {
    const STORED: usize = 30_000;
    let dir = tempfile::tempdir().unwrap();
    let mut config = turnstile::config::Config::parse("").unwrap();
    config.store.data_dir = Some(dir.path().to_path_buf());
    config.store.durability = turnstile::config::Durability::None;
    let reserve = |user: String, key: String| turnstile::model::Request {
        id: None,
        kind: "reserve".into(),
        key: Some(key),
        user,
        payload: None,
    };
    {
        let runtime = Arc::new(turnstile::runtime::Runtime::start(&config, None).unwrap());
        let clients = Arc::new(Semaphore::new(CLIENTS));
        let mut tasks = Vec::new();
        for u in 0..STORED {
            let (runtime, clients) = (runtime.clone(), clients.clone());
            let request = reserve(format!("warm-{u:05}"), format!("old-{u}"));
            tasks.push(tokio::spawn(async move {
                let _slot = clients.acquire().await.unwrap();
                runtime.submit(request).await.unwrap();
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        runtime.shutdown();
    }

    // The warm-up walks partition 0 to 3, each in user order: the highest-numbered users whose
    // old key is on partition 3 come last.
    let partitioner = Partitioner::new(HashKind::Java, 4);
    let last: Vec<usize> = (0..STORED)
        .rev()
        .filter(|u| partitioner.partition(&format!("old-{u}")) == 3)
        .take(50)
        .collect();
    let runtime = Arc::new(turnstile::runtime::Runtime::start(&config, None).unwrap());
    let moves: Vec<_> = last
        .iter()
        .map(|&u| {
            let runtime = runtime.clone();
            let request = reserve(format!("warm-{u:05}"), format!("new-{u}"));
            tokio::spawn(async move { runtime.submit(request).await.unwrap() })
        })
        .collect();
    for decision in moves {
        decision.await.unwrap();
    }
    assert!(
        !runtime.routes_warmed(),
        "the warm-up was over before the routes moved: nothing was tested"
    );
    while !runtime.routes_warmed() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for &u in &last {
        let user = format!("warm-{u:05}");
        let view = runtime.user(&user).await.unwrap().unwrap();
        assert_eq!(view.key, format!("new-{u}"), "{user}");
        let decision = runtime
            .submit(turnstile::model::Request {
                id: None,
                kind: "associate".into(),
                key: None,
                user: user.clone(),
                payload: None,
            })
            .await
            .unwrap();
        assert_eq!(decision.key, format!("new-{u}"), "{user}");
    }
    // A user the moves did not touch is served from its stored route.
    let view = runtime.user("warm-00000").await.unwrap().unwrap();
    assert_eq!(view.key, "old-0");
    runtime.shutdown();
}
