//! Damaged data dirs: an emptied partition file is refused, never re-created; bytes changed in
//! the middle of a file are found, named by file and key, and never kill a partition thread.

use std::path::{Path, PathBuf};

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

/// One changed byte inside a stored record (the redb structure intact): the server refuses to
/// start naming the file and the key; `turnstile verify` names them too and exits non-zero.
#[tokio::test(flavor = "multi_thread")]
async fn changed_record_bytes_are_found_and_named() {
    let dir = data_dir_with("K-flip", "flip-user-1").await;
    let (ok, stdout, stderr) = run_cli(&["verify", "--data-dir", dir.path().to_str().unwrap()]);
    assert!(ok, "healthy data dir: {stdout}{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok ")).count(), 4);

    let file = file_of(dir.path(), "K-flip");
    assert!(rewrite(&file, b"flip-user-1", b"flip-user-2") > 0);

    let err = Server::refused(ServerArgs::default().data_dir(dir.path()));
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains("K-flip"), "{err}");
    assert!(!err.contains("thread died"), "{err}");

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
