//! The HTTP API of `turnstile run`: the reserve → associate flow, every reject path of the
//! reference rule, routing errors, input validation.

use serde_json::json;

use crate::support::{Server, body, connect, raw_exchange, read_response};

/// The patent's flow: reserve with key + user, then associate with only the user. Both land on
/// the same partition, whose one dedicated thread applied both.
#[tokio::test(flavor = "multi_thread")]
async fn reserve_then_associate_by_user_lands_on_the_same_partition() {
    let server = Server::start();
    let (status, reserved) = server
        .request(body("reserve", Some("R-1001"), "alice"))
        .await;
    assert_eq!(status, 200, "{reserved}");
    assert_eq!(reserved["outcome"], "transition");
    assert_eq!(reserved["state"]["status"], "reserved");
    assert_eq!(reserved["state"]["user"], "alice");
    assert_eq!(reserved["state"]["version"], 1);

    let (status, associated) = server.request(body("associate", None, "alice")).await;
    assert_eq!(status, 200, "{associated}");
    assert_eq!(
        associated["key"], "R-1001",
        "routed through the route cache"
    );
    assert_eq!(associated["state"]["status"], "associated");
    assert_eq!(associated["state"]["version"], 2);
    assert_eq!(associated["partition"], reserved["partition"]);
    let partition = reserved["partition"].as_u64().unwrap();

    let (_, partitions) = server.get("/v1/partitions").await;
    assert_eq!(partitions["count"], 4);
    for p in partitions["partitions"].as_array().unwrap() {
        let id = p["id"].as_u64().unwrap();
        assert_eq!(p["thread"], format!("partition-{id}"));
        let expected = if id == partition { 2 } else { 0 };
        assert_eq!(p["processed"], expected, "partition {id}: {p}");
    }

    // The threads are real, named OS threads of the server process: one per partition.
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", server.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .filter(|n| n.starts_with("partition-"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["partition-0", "partition-1", "partition-2", "partition-3"]
    );

    let (status, user) = server.get("/v1/users/alice").await;
    assert_eq!(status, 200);
    assert_eq!(user["key"], "R-1001");
    assert_eq!(user["state"]["status"], "associated");
    let (status, key) = server.get("/v1/keys/R-1001").await;
    assert_eq!(status, 200);
    assert_eq!(key["state"]["version"], 2);
    assert_eq!(key["partition"], reserved["partition"]);
}

/// Every reject path of the reference rule answers 409 with a reason that says which, and
/// leaves the state unchanged.
#[tokio::test(flavor = "multi_thread")]
async fn reference_rule_reject_paths() {
    let server = Server::start();
    let cases = [
        // associate on a key with no state
        (body("associate", Some("K-none"), "alice"), "no reservation"),
        // unknown kind
        (body("cancel", Some("K-1"), "alice"), "unknown kind"),
    ];
    for (request, reason) in cases {
        let (status, answer) = server.request(request.clone()).await;
        assert_eq!(status, 409, "{request} -> {answer}");
        assert_eq!(answer["outcome"], "reject");
        assert!(
            answer["reason"].as_str().unwrap().contains(reason),
            "{answer}"
        );
    }
    assert_eq!(server.get("/v1/keys/K-none").await.0, 404);

    assert_eq!(
        server
            .request(body("reserve", Some("K-1"), "alice"))
            .await
            .0,
        200
    );
    // reserve on an existing key
    let (status, answer) = server.request(body("reserve", Some("K-1"), "bob")).await;
    assert_eq!(status, 409);
    assert!(
        answer["reason"]
            .as_str()
            .unwrap()
            .contains("already reserved"),
        "{answer}"
    );
    // associate by another user
    let (status, answer) = server
        .request(body("associate", Some("K-1"), "carol"))
        .await;
    assert_eq!(status, 409);
    assert!(
        answer["reason"].as_str().unwrap().contains("another user"),
        "{answer}"
    );
    assert_eq!(server.get("/v1/keys/K-1").await.1["state"]["version"], 1);

    assert_eq!(
        server
            .request(body("associate", Some("K-1"), "alice"))
            .await
            .0,
        200
    );
    // associate on an associated key
    let (status, answer) = server
        .request(body("associate", Some("K-1"), "alice"))
        .await;
    assert_eq!(status, 409);
    assert!(
        answer["reason"]
            .as_str()
            .unwrap()
            .contains("already associated"),
        "{answer}"
    );
    let (_, key) = server.get("/v1/keys/K-1").await;
    assert_eq!(key["state"]["status"], "associated");
    assert_eq!(key["state"]["version"], 2);
}

/// A request with only a user, for a user never seen, is 404 `unknown_route`: never a guess.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_user_is_404() {
    let server = Server::start();
    let (status, answer) = server.request(body("associate", None, "nobody")).await;
    assert_eq!(status, 404);
    assert_eq!(answer["error"]["code"], "unknown_route");
    let (status, answer) = server.get("/v1/users/nobody").await;
    assert_eq!(status, 404);
    assert_eq!(answer["error"]["code"], "unknown_route");
}

/// Malformed input is 400 with a message that says what is wrong, and reaches no partition.
#[tokio::test(flavor = "multi_thread")]
async fn bad_inputs_are_400_and_reach_no_partition() {
    let server = Server::start();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{\"kind\": \"reserve\", \"user\": ".to_vec(), "EOF"),
        (b"".to_vec(), "empty"),
        (b"[1, 2]".to_vec(), "valid request"),
        (
            json!({"kind": "reserve"}).to_string().into_bytes(),
            "missing field `user`",
        ),
        (
            json!({"user": "a"}).to_string().into_bytes(),
            "missing field `kind`",
        ),
        (
            json!({"kind": "", "user": "a"}).to_string().into_bytes(),
            "`kind` must not be empty",
        ),
        (
            json!({"kind": "reserve", "user": ""})
                .to_string()
                .into_bytes(),
            "`user` must not be empty",
        ),
        (
            json!({"kind": "reserve", "user": "a", "key": ""})
                .to_string()
                .into_bytes(),
            "`key` must not be empty",
        ),
        (
            json!({"kind": "reserve", "user": "a", "id": ""})
                .to_string()
                .into_bytes(),
            "`id` must not be empty",
        ),
        (
            json!({"kind": "reserve", "user": "a", "kye": "k"})
                .to_string()
                .into_bytes(),
            "unknown field `kye`",
        ),
        (
            json!({"kind": 7, "user": "a"}).to_string().into_bytes(),
            "invalid type",
        ),
        (
            json!({"kind": "reserve", "user": "x".repeat(2000)})
                .to_string()
                .into_bytes(),
            "more than 1024",
        ),
        (
            b"{\"kind\": \"reserve\", \"user\": \"\xff\xfe\"}".to_vec(),
            "UTF-8",
        ),
        (
            json!({"kind": " \t", "user": "a"}).to_string().into_bytes(),
            "`kind` must not be empty",
        ),
        (
            json!({"kind": "reserve", "user": "  "})
                .to_string()
                .into_bytes(),
            "`user` must not be empty",
        ),
        // A present `key` or `id` is a string: `null` is not read as leaving it out (which
        // would send a keyed reserve down the route cache as a user-only request).
        (
            json!({"kind": "reserve", "key": null, "user": "a"})
                .to_string()
                .into_bytes(),
            "`key` must be a string when present, not null",
        ),
        (
            json!({"kind": "reserve", "key": "K", "user": "a", "id": null})
                .to_string()
                .into_bytes(),
            "`id` must be a string when present, not null",
        ),
    ];
    for (raw, expected) in cases {
        let shown = String::from_utf8_lossy(&raw[..raw.len().min(60)]).into_owned();
        let (status, answer) = server.request_raw(raw).await;
        assert_eq!(status, 400, "{shown} -> {answer}");
        assert_eq!(answer["error"]["code"], "invalid_request");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(expected),
            "{shown}: {message:?} lacks {expected:?}"
        );
    }
    let (_, partitions) = server.get("/v1/partitions").await;
    for p in partitions["partitions"].as_array().unwrap() {
        assert_eq!(p["processed"], 0, "{p}");
        assert_eq!(p["queue_depth"], 0, "{p}");
    }
    assert_eq!(server.get("/v1/no-such-thing").await.0, 404);
}

/// Retrying with the same id returns the first answer and changes nothing; reusing an id for a
/// different request is a 409 `id_conflict`.
#[tokio::test(flavor = "multi_thread")]
async fn same_id_twice_is_applied_once() {
    let server = Server::start();
    let mut reserve = body("reserve", Some("K-idem"), "alice");
    reserve["id"] = "req-1".into();
    let first = server.request(reserve.clone()).await;
    let second = server.request(reserve.clone()).await;
    assert_eq!(first.0, 200);
    assert_eq!(first, second, "a retry gets the original answer");
    assert_eq!(server.get("/v1/keys/K-idem").await.1["state"]["version"], 1);

    // Same id, same key, another body (here another payload): refused, nothing applied.
    let mut other = body("reserve", Some("K-idem"), "alice");
    other["id"] = "req-1".into();
    other["payload"] = serde_json::json!({"seats": 2});
    let (status, answer) = server.request(other).await;
    assert_eq!(status, 409);
    assert_eq!(answer["error"]["code"], "id_conflict");
    assert_eq!(server.get("/v1/keys/K-idem").await.1["state"]["version"], 1);

    // A rejected request is deduplicated too: its retry is the same reject, not a new decision.
    let mut again = body("reserve", Some("K-idem"), "bob");
    again["id"] = "req-2".into();
    let first = server.request(again.clone()).await;
    assert_eq!(first.0, 409);
    assert_eq!(server.request(again).await, first);

    let (_, partitions) = server.get("/v1/partitions").await;
    let total = |field: &str| -> u64 {
        partitions["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[field].as_u64().unwrap())
            .sum()
    };
    assert_eq!(total("processed"), 2);
    assert_eq!(total("deduplicated"), 2);
}

/// `/metrics` speaks Prometheus: requests by kind and outcome, latency, per-partition series.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_requests_by_kind_and_outcome() {
    let server = Server::start();
    assert_eq!(
        server
            .request(body("reserve", Some("M-1"), "alice"))
            .await
            .0,
        200
    );
    assert_eq!(
        server.request(body("reserve", Some("M-1"), "bob")).await.0,
        409
    );
    assert_eq!(
        server.request(body("associate", None, "nobody")).await.0,
        404
    );
    let (status, text) = server.get_text("/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "turnstile_requests_total{kind=\"reserve\",outcome=\"transition\"} 1",
        "turnstile_requests_total{kind=\"reserve\",outcome=\"reject\"} 1",
        "turnstile_requests_total{kind=\"associate\",outcome=\"error\"} 1",
        "turnstile_request_duration_seconds_count{} 3",
        "turnstile_partition_queue_depth{partition=\"3\"} 0",
        "turnstile_rule_failures_total{partition=\"0\",code=\"rule_trap\"} 0",
        "turnstile_route_cache_entries 2",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    let applied: u64 = text
        .lines()
        .filter(|l| l.starts_with("turnstile_partition_applied_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(applied, 2);
    assert!(text.contains("turnstile_batch_size_bucket{partition=\"0\",le=\"1\"}"));
    assert!(text.contains("turnstile_rule_version_info{partition=\"0\",version=\""));
    assert!(
        text.lines()
            .filter(|l| l.starts_with("turnstile_partition_fuel_used_total"))
            .any(|l| !l.ends_with(" 0"))
    );
}

/// Every error the server writes is `{"error":{"code","message"}}` with a JSON content type:
/// bad path encodings, non-numeric path numbers, wrong methods, oversized headers, malformed
/// request lines, cut-short or malformed bodies, and bodies over the limit (413).
#[tokio::test(flavor = "multi_thread")]
async fn every_error_is_the_documented_json() {
    let server = Server::start();
    let url = server.url.clone();
    let long_header = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(500_000)
    );
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            b"GET /v1/keys/%FF HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
            400,
            "invalid_request",
        ),
        (
            b"GET /v1/users/%C3%28 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
            400,
            "invalid_request",
        ),
        (
            format!(
                "GET /v1/keys/{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                "k".repeat(5000)
            )
            .into_bytes(),
            400,
            "invalid_request",
        ),
        (
            b"POST /v1/dead-letters/two/1/resubmit HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
            400,
            "invalid_request",
        ),
        (
            b"DELETE /v1/requests HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
            405,
            "method_not_allowed",
        ),
        (long_header.into_bytes(), 431, "headers_too_large"),
        (
            b"THIS IS NOT HTTP\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
        (
            b"POST /v1/requests HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n".to_vec(),
            400,
            "invalid_request",
        ),
        (
            b"POST /v1/requests HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\nConnection: close\r\n\r\n".to_vec(),
            413,
            "body_too_large",
        ),
        (
            format!(
                "POST /v1/requests HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\nConnection: close\r\n\r\n{}",
                " ".repeat(70_000)
            )
            .into_bytes(),
            413,
            "body_too_large",
        ),
    ];
    for (request, status, code) in cases {
        let shown = String::from_utf8_lossy(&request[..request.len().min(60)]).into_owned();
        let url = url.clone();
        // The server answers an oversized request before reading all of it and closes; a
        // loaded kernel may then reset the connection before the answer is read (TCP, not the
        // server: it wrote the answer). A client retries that, so does this test, a few times.
        let response = tokio::task::spawn_blocking(move || {
            let mut tries = 0;
            loop {
                tries += 1;
                let request = request.clone();
                let url = url.clone();
                match std::panic::catch_unwind(move || raw_exchange(&url, &request)) {
                    Ok(response) if response.status == status || tries >= 5 => break response,
                    Err(panic) if tries >= 5 => std::panic::resume_unwind(panic),
                    _ => std::thread::sleep(std::time::Duration::from_millis(200)),
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(response.status, status, "{shown}");
        assert_eq!(response.error().0, code, "{shown}");
    }

    // A body cut short (the client closes its side early) is 400, not "too large".
    let cut = url.clone();
    let response = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut stream = connect(&cut);
        stream
            .write_all(
                b"POST /v1/requests HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"kind\":",
            )
            .unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        read_response(&mut stream)
    })
    .await
    .unwrap();
    assert_eq!(response.status, 400);
    assert_eq!(response.error().0, "invalid_request");

    // A chunked body over the limit (no Content-Length to refuse it by) is 413 too.
    let chunked = format!(
        "POST /v1/requests HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        70_000,
        " ".repeat(70_000)
    );
    let response = tokio::task::spawn_blocking(move || raw_exchange(&url, chunked.as_bytes()))
        .await
        .unwrap();
    assert_eq!(response.status, 413);
    assert_eq!(response.error().0, "body_too_large");
}
