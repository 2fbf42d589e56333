//! Damaged data dirs: an emptied partition file is refused, never re-created; bytes changed in
//! the middle of a file are found, named by file and key, and never kill a partition thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use turnstile::router::{HashKind, Partitioner};

use crate::support::{Server, ServerArgs, body, run_cli};

/// The file of the partition that holds `key` in a fresh data dir (generation 1, N = 4, java).
fn file_of(dir: &Path, key: &str) -> PathBuf {
    let partition = Partitioner::new(HashKind::Java, 4).partition(key);
    dir.join(format!("generation-1/partition-{partition:04}.redb"))
}

/// A data dir whose server reserved `key` for `user` and stopped cleanly.
async fn data_dir_with(key: &str, user: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(ServerArgs::default().data_dir(dir.path()));
    let (status, answer) = server.request(body("reserve", Some(key), user)).await;
    assert_eq!(status, 200, "{answer}");
    assert!(server.terminate());
    dir
}

/// A partition file truncated to zero bytes stops the server and `turnstile repartition`, by
/// path; it is not replaced by an empty database (which would lose the acknowledged key).
#[tokio::test(flavor = "multi_thread")]
async fn emptied_partition_file_is_refused_not_recreated() {
    let dir = data_dir_with("K-empty", "alice").await;
    let file = file_of(dir.path(), "K-empty");
    std::fs::File::create(&file).unwrap();

    let err = Server::refused(ServerArgs::default().data_dir(dir.path()));
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        0,
        "file re-created"
    );

    let (ok, _, stderr) = run_cli(&[
        "repartition",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--servers",
        "2",
        "--containers",
        "3",
    ]);
    assert!(!ok, "repartition over an emptied file succeeded");
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        0,
        "file re-created"
    );
    let layout = std::fs::read_to_string(dir.path().join("turnstile.json")).unwrap();
    assert!(layout.contains("\"generation\": 1"), "{layout}");
}

/// Replaces every occurrence of `needle` in `file` by `replacement` (same length); returns how
/// many it replaced.
fn rewrite(file: &Path, needle: &[u8], replacement: &[u8]) -> usize {
    assert_eq!(needle.len(), replacement.len());
    let mut bytes = std::fs::read(file).unwrap();
    let mut count = 0;
    let mut at = 0;
    while let Some(i) = bytes[at..].windows(needle.len()).position(|w| w == needle) {
        bytes[at + i..at + i + needle.len()].copy_from_slice(replacement);
        at += i + needle.len();
        count += 1;
    }
    std::fs::write(file, bytes).unwrap();
    count
}

/// One changed byte inside a stored record (the redb structure intact): the record is
/// quarantined, not the partition. The server starts; the damaged key answers 500
/// `record_damaged` (read and write), while other keys of the same partition, sent alongside it
/// so they share batches, keep committing; `/v1/partitions` and `/metrics` count it; `turnstile
/// verify` (server stopped) names the file and the key and exits non-zero.
#[tokio::test(flavor = "multi_thread")]
async fn changed_record_bytes_quarantine_only_that_record() {
    let dir = data_dir_with("K-flip", "flip-user-1").await;
    let (ok, stdout, stderr) = run_cli(&["verify", "--data-dir", dir.path().to_str().unwrap()]);
    assert!(ok, "healthy data dir: {stdout}{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok ")).count(), 4);

    let file = file_of(dir.path(), "K-flip");
    assert!(rewrite(&file, b"flip-user-1", b"flip-user-2") > 0);

    let partitioner = Partitioner::new(HashKind::Java, 4);
    let partition = partitioner.partition("K-flip");
    let neighbours: Vec<String> = (0..200)
        .map(|i| format!("K-near-{i}"))
        .filter(|k| partitioner.partition(k) == partition)
        .take(20)
        .collect();
    assert!(neighbours.len() >= 5);

    let server = Arc::new(Server::start_with(
        ServerArgs::default().data_dir(dir.path()),
    ));
    let (status, answer) = server.get("/v1/keys/K-flip").await;
    assert_eq!(status, 500, "{answer}");
    assert_eq!(answer["error"]["code"], "record_damaged", "{answer}");

    // The damaged key and healthy keys of its partition, all at once.
    let mut tasks = Vec::new();
    for (i, key) in std::iter::once("K-flip")
        .chain(neighbours.iter().map(String::as_str))
        .enumerate()
    {
        let (server, key) = (server.clone(), key.to_string());
        tasks.push(tokio::spawn(async move {
            server
                .request(body("reserve", Some(&key), &format!("near-user-{i}")))
                .await
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    let (status, answer) = &answers[0];
    assert_eq!(*status, 500, "{answer}");
    assert_eq!(answer["error"]["code"], "record_damaged", "{answer}");
    for (status, answer) in &answers[1..] {
        assert_eq!(*status, 200, "{answer}");
    }
    for key in &neighbours {
        let (status, answer) = server.get(&format!("/v1/keys/{key}")).await;
        assert_eq!(status, 200, "{answer}");
    }

    let (_, partitions) = server.get("/v1/partitions").await;
    let quarantined = partitions["partitions"][partition as usize]["quarantined_records"]
        .as_u64()
        .unwrap();
    assert!(quarantined >= 1, "{partitions}");
    let (_, metrics) = server.get_text("/metrics").await;
    assert!(
        metrics.contains(&format!(
            "turnstile_partition_quarantined_records{{partition=\"{partition}\"}} {quarantined}"
        )),
        "{metrics}"
    );
    let server = Arc::into_inner(server).expect("no task holds the server");
    assert!(server.terminate());

    let (ok, stdout, stderr) = run_cli(&["verify", "--data-dir", dir.path().to_str().unwrap()]);
    assert!(!ok, "verify passed a damaged file: {stdout}");
    let named: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("damaged "))
        .collect();
    assert!(
        named
            .iter()
            .any(|l| l.contains(&file.display().to_string()) && l.contains("K-flip")),
        "{stdout}{stderr}"
    );
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok ")).count(), 3);

    // The operator gives the damaged records up: the file verifies again and the key is free.
    let data_dir = dir.path().to_str().unwrap();
    let (ok, stdout, stderr) = run_cli(&["verify", "--data-dir", data_dir, "--drop-damaged"]);
    assert!(ok, "{stdout}{stderr}");
    let (ok, stdout, stderr) = run_cli(&["verify", "--data-dir", data_dir]);
    assert!(ok, "{stdout}{stderr}");
    let server = Server::start_with(ServerArgs::default().data_dir(dir.path()));
    let (status, answer) = server
        .request(body("reserve", Some("K-flip"), "after-repair"))
        .await;
    assert_eq!(status, 200, "{answer}");
    let (_, partitions) = server.get("/v1/partitions").await;
    assert_eq!(
        partitions["partitions"][partition as usize]["quarantined_records"],
        0
    );
}

/// Garbage over a whole region in the middle of a partition file (page headers included): the
/// server is refused naming the file, never with a partition thread dying.
#[tokio::test(flavor = "multi_thread")]
async fn garbage_in_the_middle_of_a_file_is_reported_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(ServerArgs::default().data_dir(dir.path()));
    let partitioner = Partitioner::new(HashKind::Java, 4);
    let keys: Vec<String> = (0..400)
        .map(|i| format!("K-garbage-{i}"))
        .filter(|k| partitioner.partition(k) == 1)
        .collect();
    for (i, key) in keys.iter().enumerate() {
        let (status, _) = server
            .request(body("reserve", Some(key), &format!("garbage-user-{i}")))
            .await;
        assert_eq!(status, 200);
    }
    assert!(server.terminate());

    let file = dir.path().join("generation-1/partition-0001.redb");
    let mut bytes = std::fs::read(&file).unwrap();
    // Where the records are: from the first stored key on, a page and a half of garbage.
    let first = bytes
        .windows(b"K-garbage-".len())
        .position(|w| w == b"K-garbage-")
        .expect("a key in the file");
    let start = first & !4095;
    let end = (start + 6144).min(bytes.len());
    for (i, b) in bytes[start..end].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37) ^ 0x5A;
    }
    std::fs::write(&file, &bytes).unwrap();

    let err = Server::refused(ServerArgs::default().data_dir(dir.path()));
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(!err.contains("thread died"), "{err}");
    let (ok, stdout, _) = run_cli(&["verify", "--data-dir", dir.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stdout.contains(&format!("damaged {}", file.display())),
        "{stdout}"
    );
}
