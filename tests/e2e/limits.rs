//! No client can hold the server: header and body read timeouts, a connection limit fitted to
//! the open-file limit, a shutdown deadline, 503 `shutting_down` for requests racing shutdown,
//! a request timeout and a readiness endpoint that sees a stalled disk.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use turnstile::router::{HashKind, Partitioner};

use crate::support::{Server, ServerArgs, body, connect, read_response};

/// Sends SIGTERM to `server` and waits for it to exit; returns whether it exited cleanly, or
/// `None` if it was still running after `bound` (a hang, not a slow exit: the deadlines under
/// test are far shorter).
fn terminate_within(server: Server, bound: Duration) -> Option<bool> {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let pid = server.pid();
    std::thread::spawn(move || {
        let _ = done_tx.send(server.terminate());
    });
    let exited = done_rx.recv_timeout(bound).ok();
    if exited.is_none() {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    exited
}

/// Waits until the server's listener refuses connections (shutdown has begun).
fn wait_for_listener_closed(url: &str) {
    let addr = url.trim_start_matches("http://");
    while std::net::TcpStream::connect(addr).is_ok() {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client that sent half a request (headers and part of the body) does not keep SIGTERM from
/// completing: after `server.shutdown_timeout_ms` its connection is closed and the server exits.
#[test]
fn half_sent_request_does_not_block_shutdown() {
    let server = Server::start_with(ServerArgs::default().config(
        "[server]\nshutdown_timeout_ms = 300\nbody_read_timeout_ms = 600000\nrequest_timeout_ms = 600000\n",
    ));
    let mut stream = connect(&server.url);
    stream
        .write_all(
            b"POST /v1/requests HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"kind\":",
        )
        .unwrap();
    // The request is in flight once a second one on another connection was answered after it.
    let mut probe = connect(&server.url);
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut probe).status, 200);

    assert_eq!(
        terminate_within(server, Duration::from_secs(60)),
        Some(true),
        "the server did not exit on SIGTERM with a half-sent request open"
    );
}

/// A request whose body completes after shutdown began is answered 503 `shutting_down` (not
/// applied), not dropped with a reset.
#[test]
fn request_racing_shutdown_gets_503_shutting_down() {
    let server =
        Server::start_with(ServerArgs::default().config("[server]\nshutdown_timeout_ms = 30000\n"));
    let url = server.url.clone();
    let mut stream = connect(&url);
    let request = serde_json::to_vec(&body("reserve", Some("K-race"), "racer")).unwrap();
    write!(
        stream,
        "POST /v1/requests HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        request.len()
    )
    .unwrap();
    stream.write_all(&request[..5]).unwrap();
    let mut probe = connect(&url);
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut probe).status, 200);

    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(server.terminate());
    });
    wait_for_listener_closed(&url);
    stream.write_all(&request[5..]).unwrap();
    let response = read_response(&mut stream);
    assert_eq!(response.status, 503);
    assert_eq!(response.error().0, "shutting_down");
    assert_eq!(
        done_rx.recv_timeout(Duration::from_secs(60)).ok(),
        Some(true)
    );
}

/// A body that stops arriving is answered 408 `body_timeout` after `server.body_read_timeout_ms`;
/// a `Content-Length` of 10^12 is 413 at once, without waiting for a body.
#[test]
fn stalled_and_huge_bodies_are_answered() {
    let server =
        Server::start_with(ServerArgs::default().config("[server]\nbody_read_timeout_ms = 300\n"));
    let mut stream = connect(&server.url);
    stream
        .write_all(
            b"POST /v1/requests HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"kind\":\"res",
        )
        .unwrap();
    let response = read_response(&mut stream);
    assert_eq!(response.status, 408);
    assert_eq!(response.error().0, "body_timeout");

    let mut stream = connect(&server.url);
    stream
        .write_all(
            b"POST /v1/requests HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n",
        )
        .unwrap();
    let response = read_response(&mut stream);
    assert_eq!(response.status, 413);
    assert_eq!(response.error().0, "body_too_large");
}

/// More slow (slowloris) connections than the process has file descriptors do not lock other
/// clients out: the connection limit keeps descriptors free, and the header timeout closes the
/// slow connections so waiting clients get in.
#[test]
fn slowloris_connections_do_not_lock_out_others() {
    const SLOW: usize = 300;
    let server = Server::start_with(ServerArgs {
        open_file_limit: Some(128),
        ..ServerArgs::default().config("[server]\nheader_read_timeout_ms = 500\n")
    });
    let addr = server.url.trim_start_matches("http://").to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow = {
        let stop = stop.clone();
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut open: Vec<std::net::TcpStream> = (0..SLOW)
                .filter_map(|_| std::net::TcpStream::connect(&addr).ok())
                .collect();
            for s in &mut open {
                let _ = s.write_all(b"GET /healthz HTTP/1.1\r\n");
            }
            // Trickle a header byte now and then, never finishing the headers.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in &mut open {
                    let _ = s.write_all(b"X");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut stream = connect(&server.url);
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let response = read_response(&mut stream);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    slow.join().unwrap();
    assert_eq!(response.status, 200);
}

/// An ext4 file system on a loop device, frozen and thawed on demand (`fsfreeze`): a disk that
/// stalls every write and fsync until thawed. Thawed, unmounted and detached when dropped.
struct FreezableDisk {
    /// Where the file system is mounted.
    mount: tempfile::TempDir,
    /// Holds the disk image; kept (unread) so the image outlives the mount.
    _image: tempfile::TempDir,
    /// The loop device, detached on drop.
    device: String,
}

impl FreezableDisk {
    fn new() -> FreezableDisk {
        let image = tempfile::tempdir().unwrap();
        let file = image.path().join("disk.img");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let run = |cmd: &mut Command| {
            let out = cmd.output().expect("running a disk setup command");
            assert!(
                out.status.success(),
                "this test needs root, loop devices, mkfs.ext4 and fsfreeze ({:?}: {})",
                cmd,
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&file));
        let device = run(Command::new("losetup").args(["-f", "--show"]).arg(&file));
        let mount = tempfile::tempdir().unwrap();
        run(Command::new("mount").arg(&device).arg(mount.path()));
        FreezableDisk {
            mount,
            _image: image,
            device,
        }
    }

    fn path(&self) -> PathBuf {
        self.mount.path().join("data")
    }

    fn freeze(&self, frozen: bool) {
        let status = Command::new("fsfreeze")
            .arg(if frozen { "-f" } else { "-u" })
            .arg(self.mount.path())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for FreezableDisk {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(self.mount.path())
            .status();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.mount.path())
            .status();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// The keys of `partition` among `K-stall-0..`, `count` of them.
fn keys_of(partition: u32, count: usize) -> Vec<String> {
    let partitioner = Partitioner::new(HashKind::Java, 4);
    (0..)
        .map(|i| format!("K-stall-{i}"))
        .filter(|k| partitioner.partition(k) == partition)
        .take(count)
        .collect()
}

/// With the data dir's disk frozen, requests to it answer 503 `request_timeout` instead of
/// waiting for the disk, `/readyz` turns 503 `not_ready` while `/healthz` stays 200 (the process
/// is alive), and both recover when the disk thaws.
#[tokio::test(flavor = "multi_thread")]
async fn stalled_disk_makes_readyz_not_ready_and_requests_time_out() {
    let disk = FreezableDisk::new();
    let server = Server::start_with(
        ServerArgs::default()
            .data_dir(&disk.path())
            .config("[server]\nreadiness_stall_ms = 300\nrequest_timeout_ms = 1000\n"),
    );
    assert_eq!(server.get("/readyz").await.0, 200);
    let keys = keys_of(0, 8);
    assert_eq!(
        server
            .request(body("reserve", Some(&keys[0]), "u-0"))
            .await
            .0,
        200
    );

    disk.freeze(true);
    let server = std::sync::Arc::new(server);
    let mut pending = Vec::new();
    for (i, key) in keys.iter().enumerate().skip(1) {
        let server = server.clone();
        let key = key.clone();
        pending.push(tokio::spawn(async move {
            server
                .request(body("reserve", Some(&key), &format!("u-{i}")))
                .await
        }));
        // The first request's batch blocks on the frozen disk; the later ones queue behind it.
        if i == 1 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for answer in pending {
        let (status, answer) = answer.await.unwrap();
        assert_eq!(status, 503, "{answer}");
        assert_eq!(answer["error"]["code"], "request_timeout");
    }
    // Not ready once the stall is longer than readiness_stall_ms; the requests above took a
    // request timeout (longer) to answer, so it already is.
    let (status, answer) = server.get("/readyz").await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "not_ready");
    assert_eq!(server.get("/healthz").await.0, 200);

    disk.freeze(false);
    loop {
        if server.get("/readyz").await.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, answer) = server.get(&format!("/v1/keys/{}", keys[0])).await;
    assert_eq!(status, 200, "{answer}");
}

/// SIGTERM while a partition is stuck on a frozen disk: the process still exits (after the
/// connections' and the partitions' shutdown deadlines) instead of waiting for the disk, and
/// what it acknowledged is there at the next start.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_completes_while_the_disk_is_frozen() {
    let disk = FreezableDisk::new();
    let args = ServerArgs::default()
        .data_dir(&disk.path())
        .config("[server]\nshutdown_timeout_ms = 1000\nrequest_timeout_ms = 1000\n");
    let server = Server::start_with(args.clone());
    let keys = keys_of(0, 2);
    let (status, _) = server.request(body("reserve", Some(&keys[0]), "u-0")).await;
    assert_eq!(status, 200);

    disk.freeze(true);
    // A batch blocks on the frozen disk.
    let (status, _) = server.request(body("reserve", Some(&keys[1]), "u-1")).await;
    assert_eq!(status, 503);
    let pid = server.pid();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let exited = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('Z'))
            })
            .unwrap_or(true)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !exited(pid) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopped = exited(pid);
    disk.freeze(false);
    assert!(
        stopped,
        "SIGTERM did not end the process while the disk was frozen"
    );
    drop(server);

    let server = Server::start_with(args);
    let (status, answer) = server.get(&format!("/v1/keys/{}", keys[0])).await;
    assert_eq!(status, 200, "{answer}");
}
