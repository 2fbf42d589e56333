//! The crash test (issue 12): the server is killed with `kill -9` ten times under concurrent
//! load with client ids, user-only requests among them; a request whose answer was lost in a
//! kill is retried with its id after the restart (a user-only one with only the user and the
//! id). At the end every acknowledged answer is checked against the final state: nothing
//! acknowledged is lost, nothing is applied twice, and each user's route is their last key.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde_json::Value;

use crate::support::{Server, ServerArgs, body};

const CYCLES: usize = 10;
const WORKERS: usize = 12;
const USERS: usize = 300;

/// Each user's requests, in order: reserve a first key, associate by user only (routed by the
/// route cache), then reserve a second key, which moves the route.
fn steps(u: usize) -> [Value; 3] {
    let user = format!("crash-{u}");
    let mut reserve = body("reserve", Some(&format!("X-{u}")), &user);
    reserve["id"] = format!("x-reserve-{u}").into();
    let mut associate = body("associate", None, &user);
    associate["id"] = format!("x-associate-{u}").into();
    let mut moved = body("reserve", Some(&format!("Y-{u}")), &user);
    moved["id"] = format!("x-move-{u}").into();
    [reserve, associate, moved]
}

/// A user's progress: the next of their [`steps`] to send (a step whose answer was lost is sent
/// again, with the same id).
struct Job {
    user: usize,
    step: usize,
}

/// Acknowledged answers by request id.
type Acks = Arc<Mutex<HashMap<String, Value>>>;

/// Per step: how many times a request of that step lost its answer to a kill and was sent again
/// after the restart.
type Interrupted = Arc<[AtomicUsize; 3]>;

/// Sends a request; `None` when no answer came back (the server was killed).
async fn send(client: &reqwest::Client, url: &str, request: &Value) -> Option<(u16, Value)> {
    let response = client
        .post(format!("{url}/v1/requests"))
        .json(request)
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.ok()?))
}

/// Works through users until the queue is empty or the server stops answering; an unfinished
/// user goes back to the front of the queue, to be retried first after the restart.
async fn work(url: String, queue: Arc<Mutex<VecDeque<Job>>>, acks: Acks, interrupted: Interrupted) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    loop {
        let Some(mut job) = queue.lock().unwrap().pop_front() else {
            return;
        };
        let requests = steps(job.user);
        while job.step < requests.len() {
            let request = &requests[job.step];
            match send(&client, &url, request).await {
                Some((200, answer)) => {
                    let id = request["id"].as_str().unwrap().to_string();
                    let mut acks = acks.lock().unwrap();
                    if let Some(first) = acks.get(&id) {
                        assert_eq!(&answer, first, "{id} answered twice, differently");
                    }
                    acks.insert(id, answer);
                    job.step += 1;
                }
                None => {
                    interrupted[job.step].fetch_add(1, Ordering::Relaxed);
                    queue.lock().unwrap().push_front(job);
                    return;
                }
                Some((status, answer)) => panic!("{request} -> {status} {answer}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_kill_9_cycles_lose_nothing_acknowledged_and_apply_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let args = ServerArgs::default().data_dir(dir.path());
    let queue: Arc<Mutex<VecDeque<Job>>> = Arc::new(Mutex::new(
        (0..USERS).map(|user| Job { user, step: 0 }).collect(),
    ));
    let acks: Acks = Arc::default();

    let interrupted: Interrupted = Arc::default();
    let spawn_workers = |url: &str| -> Vec<_> {
        (0..WORKERS)
            .map(|_| {
                tokio::spawn(work(
                    url.to_string(),
                    queue.clone(),
                    acks.clone(),
                    interrupted.clone(),
                ))
            })
            .collect()
    };
    let started = std::time::Instant::now();
    for cycle in 0..CYCLES {
        let server = Server::start_with(args.clone());
        let workers = spawn_workers(&server.url);
        let uptime = rand::rng().random_range(200..600);
        tokio::time::sleep(Duration::from_millis(uptime)).await;
        server.kill9();
        for w in workers {
            w.await.unwrap();
        }
        eprintln!(
            "cycle {cycle}: {} answers acknowledged, {} users left",
            acks.lock().unwrap().len(),
            queue.lock().unwrap().len()
        );
    }

    // The last run finishes every user, then every request is sent again.
    let server = Server::start_with(args);
    for w in spawn_workers(&server.url) {
        w.await.unwrap();
    }
    assert!(queue.lock().unwrap().is_empty(), "every user finished");
    let acks = acks.lock().unwrap().clone();
    assert_eq!(acks.len(), 3 * USERS);
    let interrupted: Vec<usize> = interrupted
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .collect();
    eprintln!(
        "{CYCLES} kills in {:?}; answers lost to a kill and retried, per step: {interrupted:?}",
        started.elapsed()
    );
    assert!(
        interrupted[1] > 0,
        "no user-only request lost its answer to a kill and was retried"
    );

    // Checked from several clients at once, to keep the test short on a loaded machine.
    let (server, acks) = (Arc::new(server), Arc::new(acks));
    let checkers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (server, acks) = (server.clone(), acks.clone());
            tokio::spawn(async move {
                for u in (w..USERS).step_by(WORKERS) {
                    check_user(&server, &acks, u).await;
                }
            })
        })
        .collect();
    for c in checkers {
        c.await.unwrap();
    }
}

/// Every request of user `u` sent again gets its acknowledged answer, and the final state is
/// what each request applied once makes it.
async fn check_user(server: &Server, acks: &HashMap<String, Value>, u: usize) {
    // Newest first: the user-only associate is retried while the route points to the second
    // key, and the old reserve's retry must not move it back.
    for request in steps(u).into_iter().rev() {
        let (status, answer) = server.request(request.clone()).await;
        assert_eq!(status, 200, "{request} -> {answer}");
        let first = &acks[request["id"].as_str().unwrap()];
        assert_eq!(
            &answer, first,
            "a retry of {request} gets the acknowledged answer"
        );
    }
    let (status, first) = server.get(&format!("/v1/keys/X-{u}")).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["state"]["status"], "associated", "X-{u}: {first}");
    assert_eq!(
        first["state"]["version"], 2,
        "X-{u}: exactly two transitions"
    );
    let (status, second) = server.get(&format!("/v1/keys/Y-{u}")).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["state"]["status"], "reserved", "Y-{u}: {second}");
    assert_eq!(
        second["state"]["version"], 1,
        "Y-{u}: exactly one transition"
    );
    let (_, view) = server.get(&format!("/v1/users/crash-{u}")).await;
    assert_eq!(view["key"], format!("Y-{u}"), "{view}");
}
