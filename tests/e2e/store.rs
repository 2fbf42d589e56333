//! The store's on-disk format: a data dir written by the previous version (format 2, JSON
//! records) is served and extended by this one without loss, and `turnstile inspect` prints any
//! data dir's records as JSON lines.

use std::path::Path;

use serde_json::Value;

use crate::support::{Server, ServerArgs, body, run_cli};

/// A data dir written by the release of the commit before binary records (format 2): 4
/// partitions, java hash, the reference rule. `K-old-1` reserved by `old-alice` (id
/// `old-r1`) then associated (id `old-a1`); `K-old-2` reserved by `old-bob` (id `old-r2`) and
/// not associated; `K-old-3` reserved by `old-carol` (no id) then reserved again by `old-dave`
/// (a reject).
const FORMAT_2_FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/format-2-data-dir");

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn with_id(kind: &str, key: Option<&str>, user: &str, id: &str) -> Value {
    let mut b = body(kind, key, user);
    b["id"] = id.into();
    b
}

/// Every line `turnstile inspect` prints for `args`, parsed.
fn inspect(dir: &Path, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["inspect", "--data-dir", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = run_cli(&all);
    assert!(ok, "inspect failed: {stderr}");
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn layout_format(dir: &Path) -> u64 {
    let layout: Value =
        serde_json::from_slice(&std::fs::read(dir.join("turnstile.json")).unwrap()).unwrap();
    layout["format"].as_u64().unwrap()
}

/// A format 2 data dir written by the previous release: every state, route, dedup entry and log
/// entry in it is served as before (a retry of an old id gets the old answer, a user-only
/// request follows an old route), new records go beside the old ones, and the whole dir stays
/// verifiable and inspectable. The layout is marked format 3 so an older release refuses it by
/// its format.
#[tokio::test(flavor = "multi_thread")]
async fn a_data_dir_of_the_previous_format_is_served_and_extended() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    copy_dir(Path::new(FORMAT_2_FIXTURE), &dir);
    assert_eq!(layout_format(&dir), 2);
    let before = inspect(&dir, &[]);
    assert!(
        before.iter().all(|l| l.get("value").is_some()),
        "{before:?}"
    );
    let old_log = before.iter().filter(|l| l["table"] == "log").count();
    assert_eq!(old_log, 5, "{before:?}");

    let server = Server::start_with(ServerArgs::default().data_dir(&dir));
    let (status, state) = server.get("/v1/keys/K-old-1").await;
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["state"]["status"], "associated");
    assert_eq!(state["state"]["version"], 2);
    let (status, first) = server
        .request(with_id("reserve", Some("K-old-2"), "old-bob", "old-r2"))
        .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(
        first["seq"], 1,
        "an old id's retry must get the old answer: {first}"
    );
    // The route old-bob → K-old-2 was stored by the previous release.
    let (status, associated) = server
        .request(with_id("associate", None, "old-bob", "new-a2"))
        .await;
    assert_eq!(status, 200, "{associated}");
    assert_eq!(associated["key"], "K-old-2");
    assert_eq!(associated["state"]["version"], 2);
    let (status, rejected) = server.request(body("associate", None, "old-alice")).await;
    assert_eq!(status, 409, "{rejected}");
    let (status, new) = server
        .request(with_id("reserve", Some("K-new-1"), "new-erin", "new-r1"))
        .await;
    assert_eq!(status, 200, "{new}");
    assert!(server.terminate());

    assert_eq!(layout_format(&dir), 3);
    let (ok, stdout, stderr) = run_cli(&["verify", "--data-dir", dir.to_str().unwrap()]);
    assert!(ok, "{stdout}{stderr}");
    let after = inspect(&dir, &[]);
    assert!(after.iter().all(|l| l.get("value").is_some()), "{after:?}");
    assert_eq!(
        after.iter().filter(|l| l["table"] == "log").count(),
        old_log + 3,
        "{after:?}"
    );
    let state = |key: &str| {
        after
            .iter()
            .find(|l| l["table"] == "states" && l["key"] == key)
            .map(|l| l["value"].clone())
    };
    assert_eq!(state("K-old-2").unwrap()["status"], "associated");
    assert_eq!(state("K-new-1").unwrap()["status"], "reserved");
    assert_eq!(state("K-old-3").unwrap()["user"], "old-carol");

    // And the mixed data dir starts again.
    let server = Server::start_with(ServerArgs::default().data_dir(&dir));
    let (status, again) = server
        .request(with_id("reserve", Some("K-new-1"), "new-erin", "new-r1"))
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["seq"], new["seq"]);
    assert!(server.terminate());
}

/// `turnstile inspect` prints every record as a JSON line, filtered by partition, table and
/// key; a damaged record is printed as damaged, not skipped; bad filters are refused.
#[tokio::test(flavor = "multi_thread")]
async fn inspect_prints_records_as_json_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let server = Server::start_with(ServerArgs::default().data_dir(dir));
    let (status, reserved) = server
        .request(with_id("reserve", Some("K-see"), "see-user", "see-r1"))
        .await;
    assert_eq!(status, 200, "{reserved}");
    let (status, _) = server.request(body("associate", None, "see-user")).await;
    assert_eq!(status, 200);
    assert!(server.terminate());
    let partition = reserved["partition"].as_u64().unwrap();

    let all = inspect(dir, &[]);
    let of = |table: &'static str| all.iter().filter(move |l| l["table"] == table);
    let state = of("states").find(|l| l["key"] == "K-see").unwrap();
    assert_eq!(state["partition"], partition);
    assert_eq!(state["value"]["status"], "associated");
    assert_eq!(state["value"]["version"], 2);
    let route = of("routes").find(|l| l["key"] == "see-user").unwrap();
    assert_eq!(route["value"]["key"], "K-see");
    let dedup = of("dedup").find(|l| l["key"] == "see-r1").unwrap();
    assert_eq!(dedup["value"]["decision"]["id"], "see-r1");
    let log: Vec<&Value> = of("log").collect();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0]["key"], 1);
    assert_eq!(log[0]["value"]["seq"], 1);
    assert_eq!(log[0]["value"]["request"]["kind"], "reserve");
    assert_eq!(log[1]["value"]["request"]["kind"], "associate");
    assert_eq!(
        log[1]["value"]["rule_version"],
        state["value"]["rule_version"]
    );

    let p = partition.to_string();
    let one = inspect(
        dir,
        &["--partition", &p, "--table", "states", "--key", "K-see"],
    );
    assert_eq!(one.len(), 1, "{one:?}");
    assert_eq!(one[0], *state);
    let entry = inspect(dir, &["--table", "log", "--key", "2"]);
    assert_eq!(entry.len(), 1, "{entry:?}");
    let other = (partition + 1) % 4;
    assert!(inspect(dir, &["--partition", &other.to_string(), "--table", "log"]).is_empty());

    // A changed byte: the record is printed as damaged, with its key.
    let file = dir.join(format!("generation-1/partition-{partition:04}.redb"));
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes
        .windows(b"see-user".len())
        .position(|w| w == b"see-user")
        .unwrap();
    bytes[at] = b'S';
    std::fs::write(&file, bytes).unwrap();
    let damaged: Vec<Value> = inspect(dir, &["--partition", &p])
        .into_iter()
        .filter(|l| l.get("damaged").is_some())
        .collect();
    assert!(!damaged.is_empty());
    assert!(damaged.iter().all(|l| l.get("value").is_none()));

    for bad in [&["--table", "nope"][..], &["--partition", "4"][..]] {
        let mut args = vec!["inspect", "--data-dir", dir.to_str().unwrap()];
        args.extend_from_slice(bad);
        let (ok, _, _) = run_cli(&args);
        assert!(!ok, "{bad:?} accepted");
    }
}
