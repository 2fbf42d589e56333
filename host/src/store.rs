//! Durable per-partition state: one redb database per partition, written only by that
//! partition's thread.
//!
//! # What a partition file holds
//!
//! | table          | key                | value                                             |
//! |----------------|--------------------|---------------------------------------------------|
//! | `states`       | key                | the key's [`State`]                               |
//! | `routes`       | user               | the user's [`Route`] (key + when recorded)        |
//! | `dedup`        | client request id  | fingerprint of the request + the [`Decision`]     |
//! | `dedup_order`  | sequence number    | client request id (oldest first, for retention)   |
//! | `log`          | sequence number    | [`LogEntry`]: request, outcome, rule version, time |
//! | `dead_letters` | sequence number    | [`DeadLetter`]: request, failure, rule version    |
//! | `meta`         | name               | `last_order`: the highest record order written    |
//! | `checkpoints`  | name               | Kafka mode: the changelog position the file reflects |
//!
//! Routes and dedup entries carry a *record order*: a number from one process-wide counter,
//! taken when the partition thread writes them, so it follows the order requests were applied
//! in (across partitions, unlike sequence numbers) and never the wall clock. Each partition keeps
//! the highest it wrote in `meta`, and every open raises the counter above it, so orders keep
//! growing across restarts. `turnstile repartition` keeps, per user and per client id, the
//! record with the highest order (records from before orders existed have order 0 and fall back
//! to the route's time).
//!
//! Every value is a checksummed record: one marker byte, the CRC-32 of the record's key and
//! value, then the value in a compact binary encoding ([`record`]; `turnstile inspect` prints
//! any file as JSON lines). Records written by data dir format 2 (JSON after the checksum) and
//! 1 (bare JSON) are still read: the marker byte tells the three apart. A record
//! whose checksum does not match, or that does not decode, is *damaged*: it is quarantined
//! (requests that need it are refused, the rest of the partition goes on; see [`Quarantine`]).
//! Damage of the file's structure, which redb meets itself, refuses the partition: it does not
//! start, or, if met while running, refuses every further write ([`StoreErrorKind::Damaged`]).
//!
//! A batch writes each key's state and each user's route once, at its end, however many of its
//! requests touched them ([`Pending`]); requests later in the batch read them from there.
//!
//! # Invariants
//!
//! 1. **One writer.** Only the partition's own thread opens the file for writing, so the write
//!    path takes no lock of ours; redb's own file lock keeps a second process out.
//! 2. **A batch is one transaction.** Every effect of every request in a batch (state, route,
//!    dedup entry, log entry, dead letter) is written in one redb write transaction. Either the
//!    whole batch is committed or none of it is.
//! 3. **Acknowledge after commit.** With durability `sync` a reply leaves the partition thread
//!    only after `commit` returned, and redb's `Immediate` durability has fsynced by then. So an
//!    acknowledged request is on disk; an unacknowledged one may or may not be (a crash between
//!    commit and reply), which is why clients retry with the same id and deduplication answers.
//! 4. **Applied exactly once.** A request with a client id is applied at most once: its dedup
//!    entry is written in the same transaction as its effect, so after any crash either both exist
//!    or neither does.
//! 5. **The log is the history.** Sequence numbers grow by one per applied request (accepted or
//!    rejected) with no gaps, in the order the partition applied them; replaying the log through
//!    the same rule gives the same states.
//! 6. **The layout is fixed.** `turnstile.json` in the data dir records the number of partitions,
//!    the hash and the generation directory that holds the files; a process with other settings
//!    refuses to start rather than misroute keys. `turnstile repartition` writes a whole new
//!    generation and then replaces `turnstile.json` atomically: that rename is its only commit
//!    point, so a crash leaves either the old layout or the new one, never a mix.
//! 7. **Files are never re-created.** [`prepare_dir`] creates every partition file of a new data
//!    dir before `turnstile.json` names it; afterwards a file is only ever opened
//!    ([`open_existing`]), and a missing or empty one is an error naming the path.
//! 8. **Damage is found, not served.** Every record carries a CRC-32 of its key and value; all
//!    are checked at open, each again when read. A damaged record is quarantined, refused alone;
//!    a partition whose file structure is damaged refuses writes (reads of healthy records go
//!    on); redb panics on bad pages are caught ([`guard`]).
//!
//! # Assumptions about the disk
//!
//! - `fsync` (what redb calls for `Immediate` durability) means the data survives power loss; a
//!   disk or file system that lies about it voids invariant 3.
//! - A failed write or sync is reported as an error, not silently dropped. On such an error the
//!   batch is failed (nothing in it is acknowledged) and the database is reopened before the next
//!   batch, so the partition recovers when the disk does.
//! - Files are not edited by anything but Turnstile while it runs (redb locks them). Bytes that
//!   change anyway (a bad disk, a stray write) are detected by the record checksums, not trusted.

use std::path::{Path, PathBuf};

use redb::{
    Database, Durability as RedbDurability, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::Durability;
use crate::model::{Decision, Outcome, RoutedRequest, State};
use crate::router::{HashKind, Route};
use crate::sandbox::RuleFailure;

pub mod inspect;
pub(crate) mod record;

pub(crate) const STATES: TableDefinition<&str, &[u8]> = TableDefinition::new("states");
pub(crate) const ROUTES: TableDefinition<&str, &[u8]> = TableDefinition::new("routes");
pub(crate) const DEDUP: TableDefinition<&str, &[u8]> = TableDefinition::new("dedup");
pub(crate) const DEDUP_ORDER: TableDefinition<u64, &str> = TableDefinition::new("dedup_order");
pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
pub(crate) const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(crate) const CHECKPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("checkpoints");

/// The `meta` entry holding the highest record order a partition wrote.
const LAST_ORDER: &str = "last_order";

/// The process-wide record order counter (see the module docs): the last order handed out.
static RECORD_ORDER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A new record order, above every order handed out or read from a file by this process.
fn next_record_order() -> u64 {
    RECORD_ORDER.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
}

/// Raises the counter to at least `order` (an order found on disk).
pub(crate) fn observe_record_order(order: u64) {
    RECORD_ORDER.fetch_max(order, std::sync::atomic::Ordering::SeqCst);
}

/// A route as stored: the route and its record order. Serialized flat, so a stored route
/// still reads as a [`Route`], and a route stored before orders existed reads with order 0.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredRoute {
    /// The route.
    #[serde(flatten)]
    pub route: Route,
    /// When it was written, as a record order.
    #[serde(default)]
    pub order: u64,
}

/// A dedup entry as stored: the entry and its record order (flat, as [`StoredRoute`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredDedup {
    /// The entry.
    #[serde(flatten)]
    pub entry: DedupEntry,
    /// When it was written, as a record order.
    #[serde(default)]
    pub order: u64,
}

/// Reads a partition's committed routes and dedup entries from any thread, beside the partition's
/// writer (a redb read transaction does not wait for writes), so a lookup never queues behind
/// the partition's requests. It follows the store's reopens.
#[derive(Clone, Default)]
pub struct StoreReader {
    /// The partition's open database; `None` while the store reopens it after a failed write.
    db: std::sync::Arc<std::sync::RwLock<Option<std::sync::Arc<Database>>>>,
}

impl StoreReader {
    fn set(&self, db: Option<std::sync::Arc<Database>>) {
        *self.db.write().unwrap_or_else(|e| e.into_inner()) = db;
    }

    fn with<R>(&self, f: impl FnOnce(&Database) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let db = self
            .db
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| StoreError::unavailable("the partition's store is being reopened"))?;
        guard(|| f(&db)).and_then(|r| r)
    }

    /// The route of `user` this partition holds, with its record order.
    pub fn route(&self, user: &str) -> Result<Option<StoredRoute>, StoreError> {
        self.get(ROUTES, "routes", user)
    }

    /// Up to `limit` stored routes of users after `after` (from the first when `None`), in user
    /// order, each in its own short read transaction's page so a long walk never holds back the
    /// writer's page reuse. A damaged route is skipped: the check at open already quarantined
    /// it. An empty page means the walk is over.
    pub fn routes_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, StoredRoute)>, StoreError> {
        self.with(|db| {
            let txn = db.begin_read().map_err(db_error)?;
            let table = match txn.open_table(ROUTES) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(db_error(e)),
            };
            let rows = match after {
                Some(after) => table
                    .range::<&str>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
                None => table.iter(),
            }
            .map_err(db_error)?;
            let mut out = Vec::with_capacity(limit);
            for row in rows.take(limit) {
                let (user, value) = row.map_err(db_error)?;
                let user = user.value();
                match decode(user, value.value()) {
                    Ok(route) => out.push((user.to_string(), route)),
                    Err(e) if e.is_record_damage() => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(out)
        })
    }

    /// The dedup entry of a client request id, if this partition applied it.
    pub fn dedup(&self, id: &str) -> Result<Option<DedupEntry>, StoreError> {
        self.get::<StoredDedup>(DEDUP, "dedup", id)
            .map(|d| d.map(|d| d.entry))
    }

    fn get<T: Stored>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        name: &str,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        self.with(|db| {
            let txn = db.begin_read().map_err(db_error)?;
            // A file no batch has written to yet has no tables: nothing recorded.
            let table = match txn.open_table(table) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(db_error(e)),
            };
            get_record(&table, name, key)
        })
    }
}

/// File in the data dir that records the layout (invariant 6).
pub const LAYOUT_FILE: &str = "turnstile.json";

/// A store failure: nothing of the batch it hit was applied.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    /// Whether a retry can help.
    pub kind: StoreErrorKind,
    /// What failed, with the file (and key, for damage) it concerns.
    pub message: String,
}

/// Whether a store failure is transient, the file is damaged, or one record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The disk or the database failed; the partition reopens the file before its next batch,
    /// so a retry with the same id is safe and may succeed (503 `store_unavailable`).
    Unavailable,
    /// The file holds bytes Turnstile did not write (a checksum mismatch, an undecodable record,
    /// or a redb structure redb itself cannot read). Retrying cannot help: the partition refuses
    /// every write until the file is restored (500 `store_damaged`).
    Damaged,
    /// One record's bytes are damaged (a checksum mismatch or undecodable JSON) while redb's
    /// structure is intact. The record is *quarantined*: requests that need it are refused
    /// (500 `record_damaged`), everything else on the partition goes on (see [`Quarantine`]).
    RecordDamaged,
}

impl StoreError {
    fn at(what: impl std::fmt::Display, e: impl std::fmt::Display) -> StoreError {
        StoreError::unavailable(format!("{what}: {e}"))
    }

    /// A transient failure.
    pub fn unavailable(message: impl Into<String>) -> StoreError {
        StoreError {
            kind: StoreErrorKind::Unavailable,
            message: message.into(),
        }
    }

    /// Damage in a file.
    pub fn damaged(message: impl Into<String>) -> StoreError {
        StoreError {
            kind: StoreErrorKind::Damaged,
            message: message.into(),
        }
    }

    /// Whether the file is damaged (see [`StoreErrorKind::Damaged`]).
    pub fn is_damage(&self) -> bool {
        self.kind == StoreErrorKind::Damaged
    }

    /// Whether one record is damaged (see [`StoreErrorKind::RecordDamaged`]).
    pub fn is_record_damage(&self) -> bool {
        self.kind == StoreErrorKind::RecordDamaged
    }
}

/// redb reports damage it notices itself (a page checksum, a malformed page) as `Corrupted`.
fn db_error(e: impl Into<redb::Error>) -> StoreError {
    let e = e.into();
    if matches!(&e, redb::Error::Corrupted(_)) {
        StoreError::damaged(e.to_string())
    } else {
        StoreError::unavailable(e.to_string())
    }
}

/// Where partition files live.
#[derive(Debug, Clone)]
pub enum Location {
    /// Files in this directory (a data dir's generation directory).
    Dir(PathBuf),
    /// In memory, lost on exit.
    Memory,
}

/// The layout a data dir was created with (`turnstile.json`, the data dir's commit point).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Format of the data dir; bumped on incompatible changes.
    pub format: u32,
    /// N.
    pub partitions: u32,
    /// The partitioner's hash.
    pub hash: HashKind,
    /// Which `generation-G` directory holds the partition files. `turnstile repartition` writes
    /// a new generation beside the old one and switches by replacing this file atomically.
    pub generation: u64,
}

/// The current data dir format: 3 writes binary records ([`record`]), 2 wrote checksummed
/// JSON, 1 bare JSON. Every record says which it is (its first byte), so all three are read
/// side by side and nothing is rewritten on upgrade; a data dir of an older format is marked 3
/// when a server opens it, since it then gets records an older Turnstile could not read (which
/// then refuses it by its format, naming it, rather than reporting the new records as damage).
pub const FORMAT: u32 = 3;

/// The oldest data dir format this Turnstile reads.
const OLDEST_FORMAT: u32 = 1;

/// Why a data dir cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The data dir was made for another N or hash.
    #[error(
        "{dir} holds {old_n} partitions hashed with `{old_hash}`, but the configuration asks for {new_n} with `{new_hash}`; \
         keys would be routed to partitions that do not hold them. Start with the old settings, or migrate with \
         `turnstile repartition --data-dir {dir} --servers S --containers C --hash {new_hash}` while the server is stopped",
        old_hash = .old.hash.name(), old_n = .old.partitions, new_n = .new_partitions, new_hash = .new_hash.name(),
        dir = .dir.display()
    )]
    Mismatch {
        /// The data dir.
        dir: PathBuf,
        /// What it holds.
        old: Layout,
        /// N asked for.
        new_partitions: u32,
        /// Hash asked for.
        new_hash: HashKind,
    },
    /// A partition file is missing.
    #[error("partition file {} is missing; the data dir is incomplete: {MISSING_RECOVERY}", .0.display())]
    MissingPartition(PathBuf),
    /// The layout file or dir is unreadable, or a partition file is corrupt.
    #[error("{0}")]
    Other(String),
}

/// The directory of generation `generation` under `dir`.
pub fn generation_dir(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("generation-{generation}"))
}

/// The file of partition `partition` in a generation directory.
pub fn partition_path(generation_dir: &Path, partition: u32) -> PathBuf {
    generation_dir.join(format!("partition-{partition:04}.redb"))
}

/// Reads `turnstile.json`, if the data dir has one.
pub fn read_layout(dir: &Path) -> Result<Option<Layout>, LayoutError> {
    let other = |what: String| LayoutError::Other(what);
    let layout_path = dir.join(LAYOUT_FILE);
    match std::fs::read(&layout_path) {
        Ok(bytes) => {
            let layout: Layout = serde_json::from_slice(&bytes).map_err(|e| {
                other(format!(
                    "{} is not a layout file: {e}",
                    layout_path.display()
                ))
            })?;
            if !(OLDEST_FORMAT..=FORMAT).contains(&layout.format) {
                return Err(other(format!(
                    "{} has data dir format {}, this turnstile reads formats {OLDEST_FORMAT} to {FORMAT}",
                    layout_path.display(),
                    layout.format
                )));
            }
            Ok(Some(layout))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(other(format!("reading {}: {e}", layout_path.display()))),
    }
}

/// Checks (or, for a new dir, creates) a data dir for `partitions` partitions hashed with
/// `hash`, before any partition opens. Returns the directory that holds the partition files.
pub fn prepare_dir(dir: &Path, partitions: u32, hash: HashKind) -> Result<PathBuf, LayoutError> {
    let other = |what: String| LayoutError::Other(what);
    std::fs::create_dir_all(dir).map_err(|e| other(format!("creating {}: {e}", dir.display())))?;
    match read_layout(dir)? {
        Some(old) => {
            if old.partitions != partitions || old.hash != hash {
                return Err(LayoutError::Mismatch {
                    dir: dir.to_path_buf(),
                    old,
                    new_partitions: partitions,
                    new_hash: hash,
                });
            }
            let generation = generation_dir(dir, old.generation);
            for p in 0..partitions {
                let path = partition_path(&generation, p);
                if !path.exists() {
                    return Err(LayoutError::MissingPartition(path));
                }
            }
            if old.format < FORMAT {
                write_layout(
                    dir,
                    &Layout {
                        format: FORMAT,
                        ..old
                    },
                )
                .map_err(other)?;
            }
            Ok(generation)
        }
        None => {
            let entries = std::fs::read_dir(dir)
                .map_err(|e| other(format!("reading {}: {e}", dir.display())))?;
            if let Some(stray) = entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "redb") || p.is_dir())
            {
                return Err(other(format!(
                    "{} exists but {} does not; refusing to guess the layout of this data dir",
                    stray.display(),
                    dir.join(LAYOUT_FILE).display()
                )));
            }
            let layout = Layout {
                format: FORMAT,
                partitions,
                hash,
                generation: 1,
            };
            let generation = generation_dir(dir, layout.generation);
            std::fs::create_dir_all(&generation)
                .map_err(|e| other(format!("creating {}: {e}", generation.display())))?;
            // Every partition file exists before the layout names the generation, so from then
            // on a missing or empty file is damage, never something to create.
            create_partition_files(&generation, partitions).map_err(other)?;
            write_layout(dir, &layout).map_err(other)?;
            Ok(generation)
        }
    }
}

/// Creates the (empty) redb files of partitions `0..partitions` in `generation_dir` and syncs
/// the directory. Only for a generation no layout names yet.
pub fn create_partition_files(generation_dir: &Path, partitions: u32) -> Result<(), String> {
    for p in 0..partitions {
        let path = partition_path(generation_dir, p);
        Database::create(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
    }
    std::fs::File::open(generation_dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("syncing {}: {e}", generation_dir.display()))
}

/// Writes `turnstile.json` atomically (write a temporary file, sync it, rename it, sync the
/// directory): the rename is the commit point of a new data dir or of a repartition.
pub fn write_layout(dir: &Path, layout: &Layout) -> Result<(), String> {
    let path = dir.join(LAYOUT_FILE);
    let tmp = dir.join(format!("{LAYOUT_FILE}.tmp"));
    let text = serde_json::to_vec_pretty(layout).map_err(|e| e.to_string())?;
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| format!("writing {}: {e}", path.display()))
}

/// What the dedup table keeps per client request id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DedupEntry {
    /// sha256 (hex) of the request's kind, key, user and payload.
    pub fingerprint: String,
    /// The answer the first attempt got.
    pub decision: Decision,
}

/// One applied request in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Position in the partition's log (from 1, no gaps).
    pub seq: u64,
    /// The request as applied.
    pub request: RoutedRequest,
    /// What the rule decided.
    pub outcome: Outcome,
    /// The key's version after this request (unchanged by a reject).
    pub state_version: u64,
    /// Version id of the rule that decided.
    pub rule_version: String,
    /// Host time of the commit's batch, ms since the Unix epoch.
    pub applied_at_ms: u64,
}

/// A request a rule failed on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Position among the partition's dead letters (from 1).
    pub seq: u64,
    /// The partition.
    pub partition: u32,
    /// The request.
    pub request: RoutedRequest,
    /// What went wrong.
    pub failure: Failure,
    /// Version id of the rule that failed (or that was running when the request was refused).
    pub rule_version: String,
    /// Host time of the failure, ms since the Unix epoch.
    pub failed_at_ms: u64,
    /// The record the request was read from, when it came from a Kafka topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<crate::partition::RecordSource>,
    /// Set once the letter was resubmitted (`POST /v1/dead-letters/{partition}/{seq}/resubmit`),
    /// so an operator sees which letters were dealt with; the last resubmission wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resubmitted: Option<Resubmitted>,
}

impl DeadLetter {
    /// The request to submit again: same kind, key, user and payload, and the same id, the
    /// client's or the one the host made for it, so that a letter resubmitted twice (or
    /// concurrently) is applied at most once and later resubmits get the first answer.
    pub fn resubmission(&self) -> crate::model::Request {
        let request = &self.request;
        crate::model::Request {
            id: Some(request.id.clone()),
            kind: request.kind.clone(),
            key: Some(request.key.clone()),
            user: request.user.clone(),
            payload: Some(request.payload.clone()),
        }
    }
}

/// Why a request became a dead letter: the rule failed on it, or it was refused before the
/// rule saw it (malformed, or produced to the wrong partition).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// `trap`, `fuel_exhausted`, `deadline`, `memory`, `output` for a rule failure (the API code
    /// without `rule_`); `refused` for a request that never reached the rule.
    pub kind: String,
    /// What happened: short, one line, the same for the same kind of failure.
    pub message: String,
    /// A rule failure's longer detail (a trap's text), escaped and bounded
    /// (`rule.max_failure_detail_bytes`); only here, never in an API error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Failure {
    /// The failure of a rule call.
    pub fn rule(failure: &RuleFailure) -> Failure {
        Failure {
            kind: failure.kind.code().trim_start_matches("rule_").to_string(),
            message: failure.message.clone(),
            detail: failure.detail.clone(),
        }
    }

    /// A request refused before the rule saw it.
    pub fn refused(error: &impl std::fmt::Display) -> Failure {
        Failure {
            kind: "refused".to_string(),
            message: error.to_string(),
            detail: None,
        }
    }
}

/// When a dead letter was resubmitted and what came of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resubmitted {
    /// Host time of the resubmission, ms since the Unix epoch.
    pub at_ms: u64,
    /// `transition`, `reject`, or the error code it failed with again.
    pub outcome: String,
}

impl Resubmitted {
    /// The mark for a resubmission that got `result`, now.
    pub fn of(result: &Result<crate::model::Decision, impl ErrorCode>) -> Resubmitted {
        let outcome = match result {
            Ok(decision) => match decision.verdict {
                crate::model::Verdict::Transition(_) => "transition".to_string(),
                crate::model::Verdict::Reject(_) => "reject".to_string(),
            },
            Err(e) => e.error_code().to_string(),
        };
        Resubmitted {
            at_ms: crate::model::now_ms(),
            outcome,
        }
    }
}

/// An error with a stable API code.
pub trait ErrorCode {
    /// The code.
    fn error_code(&self) -> &'static str;
}

/// Counters derived from the file at open and advanced by each committed batch.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    /// Sequence number of the next log entry.
    next_log_seq: u64,
    /// Sequence number of the next dead letter.
    next_dead_seq: u64,
    /// Sequence number of the next dedup entry.
    next_dedup_seq: u64,
    /// Entries in the dedup table.
    dedup_len: u64,
    /// Highest record order written to this file.
    last_order: u64,
}

/// One partition's database, owned by its thread.
pub struct PartitionStore {
    /// The open database; `None` after a failed commit, until it is reopened. Shared with
    /// [`StoreReader`]s, which read beside the writer.
    db: Option<std::sync::Arc<Database>>,
    /// Where this store publishes its open database for readers on other threads.
    reader: StoreReader,
    location: Location,
    partition: u32,
    durability: RedbDurability,
    dedup_retention: u64,
    /// Dead letters kept; older ones are pruned as new ones arrive.
    dead_letter_retention: u64,
    counters: Counters,
    /// Set once damage is found in the file: every later write is refused with it, since
    /// writing into a damaged file can only spread the damage (reads of healthy records go on).
    damaged: Option<StoreError>,
    /// Damaged records refused one by one while the rest of the file is served.
    quarantine: Quarantine,
    /// What is trimmed, and when.
    retention: Retention,
    /// The user after which the next route sweep starts (sweeps walk the table a slice at a
    /// time and wrap around).
    sweep_after: Option<String>,
    /// When the last maintenance (route sweep, size sample) ran.
    maintained_at: Option<std::time::Instant>,
    /// With durability `none`: when the oldest commit not yet synced to disk was made.
    unsynced_since: Option<std::time::Instant>,
    /// The batches' write-once maps and encoding buffer, kept for their capacity.
    pending: Pending,
}

impl Drop for PartitionStore {
    fn drop(&mut self) {
        // Readers on other threads (the runtime's lookups) hold the database too: withdraw it
        // from them, so that the file is closed cleanly when the partition's thread ends, not
        // whenever the last reader happens to be dropped (possibly never, at process exit,
        // which would leave the file needing recovery).
        self.reader.set(None);
    }
}

/// What a partition trims (item 8 of issue 12). Zero means "keep everything" for each limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Most log entries kept per partition (`store.log_retention`); the oldest go first.
    pub log_entries: u64,
    /// Oldest log entry kept, by its batch's time (`store.log_retention_seconds`), in ms.
    pub log_age_ms: u64,
    /// Stored routes older than this are removed in the background (`routes.ttl_seconds`), in
    /// ms; the route cache forgets them at the same age.
    pub route_ttl_ms: u64,
}

impl Retention {
    /// The retention a configuration asks for.
    pub fn of(config: &crate::config::Config) -> Retention {
        Retention {
            log_entries: config.store.log_retention,
            log_age_ms: config.store.log_retention_seconds.saturating_mul(1000),
            route_ttl_ms: config.routes.ttl_seconds.saturating_mul(1000),
        }
    }
}

/// Most log entries one batch removes, so lowering the retention on a big file does not stall
/// one batch: the rest goes with the following batches (each removes more than it appends).
const LOG_TRIM_PER_BATCH: u64 = 1024;

/// Stored routes one background sweep reads (and at most removes).
const ROUTES_PER_SWEEP: usize = 1000;

/// How often a partition sweeps expired routes and samples its file's size.
const MAINTENANCE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Most damaged records a partition quarantines at open; more than that is not a stray fault
/// but a file to restore, and the partition refuses to start.
pub const QUARANTINE_LIMIT: usize = 1000;

/// Dead letters a partition keeps unless told otherwise (`store.dead_letter_retention`).
pub const DEFAULT_DEAD_LETTER_RETENTION: u64 = 10_000;

/// Most bytes of dead letters one page read returns (at least one letter): a page of huge
/// letters must not be built whole in memory.
pub const DEAD_LETTER_PAGE_BYTES: usize = 1024 * 1024;

impl PartitionStore {
    /// Opens partition `partition`'s database: for a data dir, the file [`prepare_dir`] made
    /// (never re-created), verified record by record before the partition serves anything.
    pub fn open(
        location: &Location,
        partition: u32,
        durability: Durability,
        dedup_retention: u64,
    ) -> Result<PartitionStore, StoreError> {
        let db = open_db(location, partition)?;
        let quarantine = Quarantine::default();
        if let Location::Dir(dir) = location {
            let path = partition_path(dir, partition);
            let found = scan(&db, QUARANTINE_LIMIT + 1);
            // Damage redb itself meets (the file's structure), or more damaged records than a
            // disk fault explains, refuse the partition; single damaged records are quarantined.
            let structural = found.iter().any(|d| d.key.is_none());
            if structural || found.len() > QUARANTINE_LIMIT {
                let listed: Vec<String> = found.iter().take(5).map(|d| d.to_string()).collect();
                return Err(StoreError::damaged(format!(
                    "{} is damaged: {}; {DAMAGE_RECOVERY}",
                    path.display(),
                    listed.join("; ")
                )));
            }
            let place = path.display().to_string();
            for damage in &found {
                let key = damage.key.as_deref().unwrap_or_default();
                let e = StoreError {
                    kind: StoreErrorKind::RecordDamaged,
                    message: format!("{}: {}", record_name(&damage.table, key), damage.problem),
                };
                quarantine.note(&place, &e);
            }
        }
        let db = std::sync::Arc::new(db);
        let reader = StoreReader::default();
        reader.set(Some(db.clone()));
        let mut store = PartitionStore {
            db: Some(db),
            reader,
            location: location.clone(),
            partition,
            durability: match durability {
                Durability::Sync => RedbDurability::Immediate,
                Durability::None => RedbDurability::None,
            },
            dedup_retention: dedup_retention.max(1),
            dead_letter_retention: DEFAULT_DEAD_LETTER_RETENTION,
            counters: Counters::default(),
            damaged: None,
            quarantine,
            retention: Retention::default(),
            sweep_after: None,
            maintained_at: None,
            unsynced_since: None,
            pending: Pending::default(),
        };
        store.counters = store.read_counters()?;
        Ok(store)
    }

    /// A handle for reading this store's committed routes and dedup entries from other threads.
    pub fn reader(&self) -> StoreReader {
        self.reader.clone()
    }

    /// Drops the database handle so the next call reopens it; readers let go of it first, since
    /// redb refuses to open a file a live handle still holds.
    fn forget_handle(&mut self) {
        self.reader.set(None);
        self.db = None;
    }

    /// Keeps only the newest `count` dead letters (at least one).
    pub fn with_dead_letter_retention(mut self, count: u64) -> PartitionStore {
        self.dead_letter_retention = count.max(1);
        self
    }

    /// Trims by `retention` from now on.
    pub fn with_retention(mut self, retention: Retention) -> PartitionStore {
        self.retention = retention;
        self
    }

    /// Whether [`Self::maintain`] is due.
    pub fn maintenance_due(&self) -> bool {
        self.maintained_at
            .is_none_or(|t| t.elapsed() >= MAINTENANCE_INTERVAL)
    }

    /// Background upkeep between batches, at most once per [`MAINTENANCE_INTERVAL`]: removes a
    /// slice of expired stored routes (in its own transaction, only when there is something to
    /// remove). Returns how many routes it removed and the partition file's size in bytes
    /// (`None` in memory).
    pub fn maintain(&mut self, now_ms: u64) -> (u64, Option<u64>) {
        self.maintained_at = Some(std::time::Instant::now());
        let mut removed = 0;
        if self.retention.route_ttl_ms > 0 && self.damaged.is_none() {
            match self.sweep_routes(now_ms) {
                Ok(n) => removed = n as u64,
                Err(e) => tracing::warn!(partition = self.partition, "sweeping routes: {e}"),
            }
        }
        let size = match &self.location {
            Location::Dir(dir) => std::fs::metadata(partition_path(dir, self.partition))
                .ok()
                .map(|m| m.len()),
            Location::Memory => None,
        };
        (removed, size)
    }

    /// Reads the next [`ROUTES_PER_SWEEP`] stored routes and removes those older than the
    /// route TTL. Returns how many it removed.
    fn sweep_routes(&mut self, now_ms: u64) -> Result<usize, StoreError> {
        let oldest_live = now_ms.saturating_sub(self.retention.route_ttl_ms);
        let after = self.sweep_after.clone();
        let durability = self.durability;
        let (removed, next) = self.with_db(|db| {
            let mut expired = Vec::new();
            let mut last = None;
            let mut read = 0;
            {
                let txn = db.begin_read().map_err(db_error)?;
                let table = txn.open_table(ROUTES).map_err(db_error)?;
                let rows = match &after {
                    Some(after) => table.range::<&str>((
                        std::ops::Bound::Excluded(after.as_str()),
                        std::ops::Bound::Unbounded,
                    )),
                    None => table.range::<&str>(..),
                }
                .map_err(db_error)?;
                for row in rows.take(ROUTES_PER_SWEEP) {
                    let (user, value) = row.map_err(db_error)?;
                    let user = user.value().to_string();
                    // A damaged route is quarantined, not swept: removing is the operator's call.
                    if let Ok(stored) = decode::<_, StoredRoute>(user.as_str(), value.value())
                        && stored.route.recorded_at_ms < oldest_live
                    {
                        expired.push(user.clone());
                    }
                    last = Some(user);
                    read += 1;
                }
            }
            if !expired.is_empty() {
                let mut txn = db.begin_write().map_err(db_error)?;
                txn.set_durability(durability).map_err(db_error)?;
                {
                    let mut table = txn.open_table(ROUTES).map_err(db_error)?;
                    for user in &expired {
                        table.remove(user.as_str()).map_err(db_error)?;
                    }
                }
                txn.commit().map_err(db_error)?;
            }
            // A slice shorter than asked for reached the end: the next sweep starts over.
            Ok((expired.len(), last.filter(|_| read == ROUTES_PER_SWEEP)))
        })?;
        if removed > 0 && matches!(durability, RedbDurability::None) {
            self.unsynced_since
                .get_or_insert_with(std::time::Instant::now);
        }
        self.sweep_after = next;
        Ok(removed)
    }

    /// Where this partition's data lives, for messages.
    fn describe(&self) -> String {
        match &self.location {
            Location::Dir(dir) => partition_path(dir, self.partition).display().to_string(),
            Location::Memory => format!("partition {} (memory)", self.partition),
        }
    }

    /// Runs `f` over the open database (reopening it after a failed commit). Damage it meets is
    /// logged once, named by file, and remembered so later writes are refused; a redb panic is
    /// caught and treated as damage.
    fn with_db<R>(
        &mut self,
        f: impl FnOnce(&Database) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        if self.db.is_none() {
            // A previous commit failed; redb may have given up on the handle. Reopening replays
            // its recovery, and the counters come from what is really on disk.
            let db = std::sync::Arc::new(open_db(&self.location, self.partition)?);
            self.db = Some(db.clone());
            match self.read_counters() {
                Ok(c) => {
                    self.counters = c;
                    self.reader.set(Some(db));
                }
                Err(e) => {
                    self.db = None;
                    return Err(e);
                }
            }
        }
        let db = self.db.as_ref().expect("just opened");
        let result = guard(|| f(db)).and_then(|r| r);
        match result {
            Err(e) if e.is_damage() => Err(self.mark_damaged(e)),
            Err(e) if e.is_record_damage() => {
                let place = self.describe();
                self.quarantine.note(&place, &e);
                Err(StoreError {
                    kind: e.kind,
                    message: format!("{place}: {}", e.message),
                })
            }
            other => other,
        }
    }

    /// The partition's damaged records.
    pub fn quarantine(&self) -> &Quarantine {
        &self.quarantine
    }

    /// Records damage (the first one wins) and returns it with the file named.
    fn mark_damaged(&mut self, e: StoreError) -> StoreError {
        let e = StoreError::damaged(format!(
            "{} is damaged: {}; writes to partition {} are refused until it is restored ({DAMAGE_RECOVERY})",
            self.describe(),
            e.message,
            self.partition
        ));
        if self.damaged.is_none() {
            tracing::error!(partition = self.partition, "{e}");
            self.damaged = Some(e.clone());
        }
        e
    }

    fn read_counters(&mut self) -> Result<Counters, StoreError> {
        let db = self.db.as_ref().expect("open");
        guard(|| read_counters(db)).and_then(|r| r)
    }

    /// Runs `f` over one write transaction and commits it (invariant 2). If `f` or the commit
    /// fails nothing of it is stored, and the error says why. A damaged partition refuses.
    pub fn write_batch<R>(
        &mut self,
        f: impl FnOnce(&mut Batch<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        if let Some(damage) = &self.damaged {
            return Err(damage.clone());
        }
        let durability = self.durability;
        let dedup_retention = self.dedup_retention;
        let dead_letter_retention = self.dead_letter_retention;
        let counters = self.counters;
        let partition = self.partition;
        let quarantine = self.quarantine.clone();
        let place = self.describe();
        let retention = self.retention;
        // The buffers go into the batch and come back after it, emptied but with their capacity.
        let pending = std::mem::take(&mut self.pending);
        let mut returned = Pending::default();
        let pending_slot = &mut returned;
        // `None` from the closure: the commit failed and the handle must be reopened.
        let outcome = self.with_db(|db| {
            let mut txn = db.begin_write().map_err(db_error)?;
            txn.set_durability(durability).map_err(db_error)?;
            let result = {
                let mut batch = Batch {
                    states: txn.open_table(STATES).map_err(db_error)?,
                    routes: txn.open_table(ROUTES).map_err(db_error)?,
                    dedup: txn.open_table(DEDUP).map_err(db_error)?,
                    dedup_order: txn.open_table(DEDUP_ORDER).map_err(db_error)?,
                    log: txn.open_table(LOG).map_err(db_error)?,
                    dead_letters: txn.open_table(DEAD_LETTERS).map_err(db_error)?,
                    meta: txn.open_table(META).map_err(db_error)?,
                    checkpoints: txn.open_table(CHECKPOINTS).map_err(db_error)?,
                    counters,
                    dedup_retention,
                    dead_letter_retention,
                    quarantine,
                    place,
                    retention,
                    pending,
                };
                let result = f(&mut batch)
                    .and_then(|r| batch.flush().map(|()| r))
                    .and_then(|r| batch.trim_dedup().map(|()| r))
                    .and_then(|r| batch.trim_log().map(|()| r))
                    .and_then(|r| batch.save_last_order(counters.last_order).map(|()| r));
                *pending_slot = std::mem::take(&mut batch.pending);
                result.map(|r| (r, batch.counters))
            };
            match result {
                Ok((r, counters)) => match txn.commit() {
                    Ok(()) => Ok(Ok((r, counters))),
                    Err(e) => Ok(Err(StoreError::at(
                        format_args!("committing partition {partition}"),
                        db_error(e),
                    ))),
                },
                Err(e) => {
                    let _ = txn.abort();
                    Err(e)
                }
            }
        });
        // A failed batch may leave values behind: they belong to no later batch.
        returned.states.clear();
        returned.routes.clear();
        self.pending = returned;
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                // A write that failed inside the transaction (a full disk fails the insert that
                // needs a new page, not only the commit) can leave redb's handle refusing every
                // later call: reopen it before the next batch, as after a failed commit.
                self.forget_handle();
                return Err(e);
            }
        };
        match outcome {
            Ok((r, counters)) => {
                self.counters = counters;
                if matches!(durability, RedbDurability::None) {
                    self.unsynced_since
                        .get_or_insert_with(std::time::Instant::now);
                }
                Ok(r)
            }
            Err(e) => {
                self.forget_handle();
                if e.is_damage() {
                    return Err(self.mark_damaged(e));
                }
                Err(e)
            }
        }
    }

    /// Whether a commit has waited longer than `interval` to be synced (durability `none`).
    pub fn sync_due(&self, interval: std::time::Duration) -> bool {
        self.unsynced_since.is_some_and(|t| t.elapsed() >= interval)
    }

    /// Syncs every commit made so far to disk: redb persists a non-durable commit only when a
    /// durable one follows, so this is an empty durable commit. A no-op when nothing is unsynced.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.unsynced_since.is_none() {
            return Ok(());
        }
        let partition = self.partition;
        self.with_db(|db| {
            let txn = db.begin_write().map_err(db_error)?;
            txn.commit().map_err(|e| {
                StoreError::at(format_args!("syncing partition {partition}"), db_error(e))
            })
        })?;
        self.unsynced_since = None;
        Ok(())
    }

    /// A named checkpoint of the file's own bookkeeping (Kafka mode: the changelog position the
    /// file reflects), from committed data.
    pub fn checkpoint<T: DeserializeOwned>(&mut self, name: &str) -> Result<Option<T>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(db_error)?;
            // Created by the first batch that stores a checkpoint (Kafka mode only), not at
            // open: opening must not need to write (a full disk would fail every read).
            let table = match txn.open_table(CHECKPOINTS) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(db_error(e)),
            };
            match table.get(name).map_err(db_error)? {
                Some(value) => decode_json(name, value.value())
                    .map(Some)
                    .map_err(|e| located(e, "checkpoints", name)),
                None => Ok(None),
            }
        })
    }

    /// A read transaction over everything committed so far (a backup's snapshot).
    pub fn snapshot(&mut self) -> Result<redb::ReadTransaction, StoreError> {
        self.with_db(|db| db.begin_read().map_err(db_error))
    }

    /// The current state of `key`, from committed data.
    pub fn state(&mut self, key: &str) -> Result<Option<State>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(db_error)?;
            let table = txn.open_table(STATES).map_err(db_error)?;
            get_record(&table, "states", key)
        })
    }

    /// Up to `limit` dead letters with a sequence number above `after`, oldest first, and no
    /// more than [`DEAD_LETTER_PAGE_BYTES`] of them (but at least one). A damaged letter is
    /// left out of the page (and quarantined), so the others can still be paged through.
    pub fn dead_letters(
        &mut self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let quarantine = self.quarantine.clone();
        let place = self.describe();
        self.with_db(|db| {
            let txn = db.begin_read().map_err(db_error)?;
            let table = txn.open_table(DEAD_LETTERS).map_err(db_error)?;
            let mut out = Vec::new();
            let mut bytes = 0;
            for row in table
                .range(after.saturating_add(1)..)
                .map_err(db_error)?
                .take(limit)
            {
                let (seq, value) = row.map_err(db_error)?;
                let seq = seq.value();
                bytes += value.value().len();
                if bytes > DEAD_LETTER_PAGE_BYTES && !out.is_empty() {
                    break;
                }
                match decode(&seq, value.value())
                    .map_err(|e| located(e, "dead_letters", &seq.to_string()))
                {
                    Ok(letter) => out.push(letter),
                    Err(e) if e.is_record_damage() => quarantine.note(&place, &e),
                    Err(e) => return Err(e),
                }
            }
            Ok(out)
        })
    }

    /// Records on dead letter `seq` that it was resubmitted; `false` if there is no such letter.
    pub fn mark_resubmitted(&mut self, seq: u64, mark: Resubmitted) -> Result<bool, StoreError> {
        if let Some(damage) = &self.damaged {
            return Err(damage.clone());
        }
        self.with_db(|db| {
            let txn = db.begin_write().map_err(db_error)?;
            {
                let mut table = txn.open_table(DEAD_LETTERS).map_err(db_error)?;
                let letter: DeadLetter = match table.get(seq).map_err(db_error)? {
                    Some(value) => decode(&seq, value.value())
                        .map_err(|e| located(e, "dead_letters", &seq.to_string()))?,
                    None => return Ok(false),
                };
                let letter = DeadLetter {
                    resubmitted: Some(mark),
                    ..letter
                };
                table
                    .insert(seq, encode(&seq, &letter).as_slice())
                    .map_err(db_error)?;
            }
            txn.commit().map_err(db_error)?;
            Ok(true)
        })
    }

    /// Up to `limit` log entries from sequence number `from`, in order.
    pub fn log(&mut self, from: u64, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(db_error)?;
            let table = txn.open_table(LOG).map_err(db_error)?;
            let mut out = Vec::new();
            for row in table.range(from..).map_err(db_error)?.take(limit) {
                let (seq, value) = row.map_err(db_error)?;
                let seq = seq.value();
                out.push(
                    decode(&seq, value.value()).map_err(|e| located(e, "log", &seq.to_string()))?,
                );
            }
            Ok(out)
        })
    }
}

fn read_counters(db: &Database) -> Result<Counters, StoreError> {
    // Make sure every table exists, so readers never meet a missing one. Only a file that lacks
    // one is written: a reopen (after a failed commit, e.g. on a full disk) must need no space.
    let missing = {
        let txn = db.begin_read().map_err(db_error)?;
        let missing = |e: redb::TableError| match e {
            redb::TableError::TableDoesNotExist(_) => Ok(true),
            e => Err(db_error(e)),
        };
        let found = [
            txn.open_table(STATES).map(|_| false),
            txn.open_table(ROUTES).map(|_| false),
            txn.open_table(DEDUP).map(|_| false),
            txn.open_table(LOG).map(|_| false),
            txn.open_table(DEAD_LETTERS).map(|_| false),
        ];
        let mut any = false;
        for table in found {
            any |= table.or_else(missing)?;
        }
        any |= txn
            .open_table(DEDUP_ORDER)
            .map(|_| false)
            .or_else(missing)?;
        any |= txn.open_table(META).map(|_| false).or_else(missing)?;
        any
    };
    if missing {
        let txn = db.begin_write().map_err(db_error)?;
        {
            txn.open_table(STATES).map_err(db_error)?;
            txn.open_table(ROUTES).map_err(db_error)?;
            txn.open_table(DEDUP).map_err(db_error)?;
            txn.open_table(DEDUP_ORDER).map_err(db_error)?;
            txn.open_table(LOG).map_err(db_error)?;
            txn.open_table(DEAD_LETTERS).map_err(db_error)?;
            txn.open_table(META).map_err(db_error)?;
        }
        txn.commit().map_err(db_error)?;
    }
    let txn = db.begin_read().map_err(db_error)?;
    let last = |t: &redb::ReadOnlyTable<u64, &[u8]>| -> Result<u64, StoreError> {
        Ok(t.last()
            .map_err(db_error)?
            .map(|(k, _)| k.value())
            .unwrap_or(0))
    };
    let log = txn.open_table(LOG).map_err(db_error)?;
    let dead = txn.open_table(DEAD_LETTERS).map_err(db_error)?;
    let order = txn.open_table(DEDUP_ORDER).map_err(db_error)?;
    let last_order = txn
        .open_table(META)
        .map_err(db_error)?
        .get(LAST_ORDER)
        .map_err(db_error)?
        .map(|v| v.value())
        .unwrap_or(0);
    observe_record_order(last_order);
    Ok(Counters {
        last_order,
        next_log_seq: last(&log)? + 1,
        next_dead_seq: last(&dead)? + 1,
        next_dedup_seq: order
            .last()
            .map_err(db_error)?
            .map(|(k, _)| k.value())
            .unwrap_or(0)
            + 1,
        dedup_len: order.len().map_err(db_error)?,
    })
}

/// Names the table and key of a damaged record in its error; a record's own damage (its
/// checksum or decoding) becomes [`StoreErrorKind::RecordDamaged`], so only that record is
/// quarantined.
fn located(e: StoreError, table: &str, key: &str) -> StoreError {
    StoreError {
        kind: match e.kind {
            StoreErrorKind::Damaged => StoreErrorKind::RecordDamaged,
            other => other,
        },
        message: format!("{}: {}", record_name(table, key), e.message),
    }
}

/// How a damaged record is named in errors, logs and the quarantine.
fn record_name(table: &str, key: &str) -> String {
    format!("table `{table}`, key `{key}`")
}

/// The damaged records of one partition (item 10 of issue 12): found by the verify pass at open
/// or met while running. Each is logged once with the file and key, and counted
/// (`/v1/partitions`, `/metrics`); requests that need one are refused with 500 `record_damaged`
/// (its checksum fails on every read, so nothing here serves the refusal), while the rest of the
/// batch and of the partition commit. Shared with the partition's batches (the same thread, so
/// the lock is never contended).
#[derive(Debug, Clone, Default)]
pub struct Quarantine(std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>);

impl Quarantine {
    /// Remembers a damaged record (by its error, which names it), logging it the first time.
    fn note(&self, place: &str, e: &StoreError) {
        let name = e
            .message
            .split(": ")
            .next()
            .unwrap_or(&e.message)
            .to_string();
        let new = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name);
        if new {
            tracing::error!(
                "{place}: damaged record quarantined (requests that need it answer `record_damaged`, the rest of the partition goes on): {}; {DAMAGE_RECOVERY}",
                e.message
            );
        }
    }

    /// How many damaged records are known.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Opens the existing partition file at `path`: never creates one, and refuses an empty file
/// (what a truncation leaves), which redb would otherwise initialise as an empty database and so
/// silently lose every acknowledged key in it.
pub fn open_existing(path: &Path) -> Result<Database, StoreError> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StoreError::damaged(format!(
                "partition file {} is missing; {MISSING_RECOVERY}",
                path.display()
            )));
        }
        Err(e) => return Err(StoreError::at(path.display(), e)),
    };
    if meta.len() == 0 {
        return Err(StoreError::damaged(format!(
            "partition file {} is empty (0 bytes): it was truncated, so its acknowledged data is gone; {MISSING_RECOVERY}",
            path.display()
        )));
    }
    match guard(|| Database::open(path)) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(StoreError::unavailable(format!(
            "{} is in use: a turnstile server is still running on this data dir (stop it first)",
            path.display()
        ))),
        // A file redb does not recognise (a damaged header: "not a redb database") is damage
        // like any other.
        Ok(Err(e @ redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)))) => Err(
            StoreError::damaged(format!("{}: {e}; {DAMAGE_RECOVERY}", path.display())),
        ),
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))))
            if e.kind() == std::io::ErrorKind::InvalidData =>
        {
            Err(StoreError::damaged(format!(
                "{}: {e}; {DAMAGE_RECOVERY}",
                path.display()
            )))
        }
        Ok(Err(e)) => {
            let e = db_error(e);
            Err(StoreError {
                kind: e.kind,
                message: format!("opening {}: {}", path.display(), e.message),
            })
        }
        Err(e) => Err(StoreError::damaged(format!(
            "{}: {}; {DAMAGE_RECOVERY}",
            path.display(),
            e.message
        ))),
    }
}

/// What to do about a missing or emptied partition file.
pub const MISSING_RECOVERY: &str = "restore the file (or the whole data dir) from a backup; \
     to give up that partition's data instead, start over with an empty data dir \
     (Turnstile never re-creates a single partition file, since keys, routes and request ids \
     acknowledged in it would silently disappear)";

fn open_db(location: &Location, partition: u32) -> Result<Database, StoreError> {
    match location {
        Location::Memory => redb::Builder::new()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| {
                StoreError::at(format_args!("partition {partition} (memory)"), db_error(e))
            }),
        Location::Dir(dir) => open_existing(&partition_path(dir, partition)),
    }
}

/// The tables of one write transaction, open for one batch.
pub struct Batch<'txn> {
    states: redb::Table<'txn, &'static str, &'static [u8]>,
    routes: redb::Table<'txn, &'static str, &'static [u8]>,
    dedup: redb::Table<'txn, &'static str, &'static [u8]>,
    dedup_order: redb::Table<'txn, u64, &'static str>,
    log: redb::Table<'txn, u64, &'static [u8]>,
    dead_letters: redb::Table<'txn, u64, &'static [u8]>,
    meta: redb::Table<'txn, &'static str, u64>,
    checkpoints: redb::Table<'txn, &'static str, &'static [u8]>,
    counters: Counters,
    dedup_retention: u64,
    dead_letter_retention: u64,
    /// The partition's damaged records, to note one met by this batch.
    quarantine: Quarantine,
    /// The partition file, for the log line of a damaged record.
    place: String,
    /// How much of the log to keep.
    retention: Retention,
    /// States and routes written by this batch, stored once each at its end.
    pending: Pending,
}

/// What a batch writes once per key at its end rather than once per request: a key (or user)
/// touched by several requests of one batch is encoded and inserted into its B-tree once, with
/// its last value. Kept by the partition between batches so the maps and the encoding buffer
/// keep their capacity.
#[derive(Default)]
pub(crate) struct Pending {
    /// Key → its newest state in this batch.
    states: std::collections::HashMap<String, State>,
    /// User → its newest route in this batch.
    routes: std::collections::HashMap<String, StoredRoute>,
    /// The encoding buffer every insert of the batch reuses.
    bytes: Vec<u8>,
}

impl Batch<'_> {
    /// The damaged record `request` needs, if any: its key's state, or its id's dedup entry.
    /// Such a request is refused alone, before it writes anything, so the rest of the batch
    /// commits (item 10 of issue 12); any other failure aborts the batch as usual.
    pub fn damaged_record_for(
        &self,
        request: &RoutedRequest,
    ) -> Result<Option<StoreError>, StoreError> {
        // Checksums only: the request reads (and decodes) what it needs right after.
        let state = match self.pending.states.contains_key(&request.key) {
            true => Ok(()),
            false => check_stored(&self.states, "states", &request.key),
        };
        let dedup = match request.idempotent {
            true => check_stored(&self.dedup, "dedup", &request.id),
            false => Ok(()),
        };
        for read in [state, dedup] {
            match read {
                Ok(()) => {}
                Err(e) if e.is_record_damage() => {
                    self.quarantine.note(&self.place, &e);
                    return Ok(Some(StoreError {
                        kind: e.kind,
                        message: format!("{}: {}", self.place, e.message),
                    }));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// The state of `key` as this batch has it so far (earlier requests in the batch included).
    pub fn state(&self, key: &str) -> Result<Option<State>, StoreError> {
        if let Some(state) = self.pending.states.get(key) {
            return Ok(Some(state.clone()));
        }
        get_record(&self.states, "states", key)
    }

    /// The state of `key` as the batch found it, before any of its own writes.
    pub fn committed_state(&self, key: &str) -> Result<Option<State>, StoreError> {
        get_record(&self.states, "states", key)
    }

    /// The route of `user` as the batch found it, before any of its own writes.
    pub fn committed_route(&self, user: &str) -> Result<Option<Route>, StoreError> {
        get_record::<StoredRoute>(&self.routes, "routes", user).map(|r| r.map(|r| r.route))
    }

    /// The dedup entry of a client request id, if one was applied before.
    pub fn dedup(&self, id: &str) -> Result<Option<DedupEntry>, StoreError> {
        get_record::<StoredDedup>(&self.dedup, "dedup", id).map(|d| d.map(|d| d.entry))
    }

    /// The route of `user` as this batch has it so far.
    pub fn route(&self, user: &str) -> Result<Option<Route>, StoreError> {
        if let Some(stored) = self.pending.routes.get(user) {
            return Ok(Some(stored.route.clone()));
        }
        get_record::<StoredRoute>(&self.routes, "routes", user).map(|r| r.map(|r| r.route))
    }

    /// Stores a named checkpoint (Kafka mode: the changelog position the file reflects), in the
    /// batch's transaction so it commits with the state it describes.
    pub fn put_checkpoint<T: Serialize>(
        &mut self,
        name: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        self.checkpoints
            .insert(name, encode_json(name, value).as_slice())
            .map_err(db_error)?;
        Ok(())
    }

    /// Records `user → route` durably, with a new record order, which it returns.
    pub fn record_route(&mut self, user: &str, route: &Route) -> Result<u64, StoreError> {
        let order = self.take_order();
        let stored = StoredRoute {
            route: route.clone(),
            order,
        };
        match self.pending.routes.get_mut(user) {
            Some(pending) => *pending = stored,
            None => {
                self.pending.routes.insert(user.to_string(), stored);
            }
        }
        Ok(order)
    }

    /// Stores the states and routes this batch wrote, one insert per key: called once, at the
    /// end of the batch, before anything that reads the tables directly.
    fn flush(&mut self) -> Result<(), StoreError> {
        let Pending {
            states,
            routes,
            bytes,
        } = &mut self.pending;
        for (key, state) in states.drain() {
            encode_into(bytes, key.as_str(), &state);
            self.states
                .insert(key.as_str(), bytes.as_slice())
                .map_err(db_error)?;
        }
        for (user, stored) in routes.drain() {
            encode_into(bytes, user.as_str(), &stored);
            self.routes
                .insert(user.as_str(), bytes.as_slice())
                .map_err(db_error)?;
        }
        Ok(())
    }

    fn take_order(&mut self) -> u64 {
        let order = next_record_order();
        self.counters.last_order = self.counters.last_order.max(order);
        order
    }

    /// Writes the highest record order of this file if this batch raised it.
    fn save_last_order(&mut self, before: u64) -> Result<(), StoreError> {
        if self.counters.last_order > before {
            self.meta
                .insert(LAST_ORDER, self.counters.last_order)
                .map_err(db_error)?;
        }
        Ok(())
    }

    /// Stores a new state for `key`.
    pub fn put_state(&mut self, key: &str, state: &State) -> Result<(), StoreError> {
        match self.pending.states.get_mut(key) {
            Some(pending) => pending.clone_from(state),
            None => {
                self.pending.states.insert(key.to_string(), state.clone());
            }
        }
        Ok(())
    }

    /// Appends an applied request to the log and returns its sequence number.
    pub fn append_log(&mut self, mut entry: LogEntry) -> Result<u64, StoreError> {
        let seq = self.counters.next_log_seq;
        entry.seq = seq;
        encode_into(&mut self.pending.bytes, &seq, &entry);
        self.log
            .insert(seq, self.pending.bytes.as_slice())
            .map_err(db_error)?;
        self.counters.next_log_seq += 1;
        Ok(seq)
    }

    /// Makes the next log entry's sequence number `seq`. Kafka mode numbers its log by the
    /// requests partition's offsets (offset + 1), so a partition's numbers do not restart when
    /// it moves to another process.
    pub fn set_next_log_seq(&mut self, seq: u64) {
        self.counters.next_log_seq = seq;
    }

    /// Remembers the answer to a client request id, with a new record order.
    pub fn put_dedup(&mut self, id: &str, entry: &DedupEntry) -> Result<(), StoreError> {
        let stored = StoredDedup {
            entry: entry.clone(),
            order: self.take_order(),
        };
        encode_into(&mut self.pending.bytes, id, &stored);
        let previous = self
            .dedup
            .insert(id, self.pending.bytes.as_slice())
            .map_err(db_error)?;
        if previous.is_none() {
            drop(previous);
            let seq = self.counters.next_dedup_seq;
            self.dedup_order.insert(seq, id).map_err(db_error)?;
            self.counters.next_dedup_seq += 1;
            self.counters.dedup_len += 1;
        }
        Ok(())
    }

    /// Records a request the rule failed on.
    pub fn dead_letter(&mut self, mut letter: DeadLetter) -> Result<u64, StoreError> {
        let seq = self.counters.next_dead_seq;
        letter.seq = seq;
        self.dead_letters
            .insert(seq, encode(&seq, &letter).as_slice())
            .map_err(db_error)?;
        self.counters.next_dead_seq += 1;
        // Sequence numbers have no gaps, so everything at or below this one is beyond the
        // retention; a loop, because the retention may have been lowered since the last start.
        let oldest_kept = seq.saturating_sub(self.dead_letter_retention) + 1;
        loop {
            let first = match self.dead_letters.first().map_err(db_error)? {
                Some((first, _)) => first.value(),
                None => break,
            };
            if first >= oldest_kept {
                break;
            }
            self.dead_letters.remove(first).map_err(db_error)?;
        }
        Ok(seq)
    }

    /// Removes the oldest log entries beyond the retention (by count, then by age), at most
    /// [`LOG_TRIM_PER_BATCH`] per batch. Counted by the table's length, not by sequence numbers,
    /// which have gaps in Kafka mode.
    fn trim_log(&mut self) -> Result<(), StoreError> {
        let Retention {
            log_entries,
            log_age_ms,
            ..
        } = self.retention;
        if log_entries == 0 && log_age_ms == 0 {
            return Ok(());
        }
        let oldest_kept_ms = crate::model::now_ms().saturating_sub(log_age_ms);
        let mut len = self.log.len().map_err(db_error)?;
        for _ in 0..LOG_TRIM_PER_BATCH {
            let beyond_count = log_entries > 0 && len > log_entries;
            if !beyond_count {
                if log_age_ms == 0 {
                    break;
                }
                let Some((seq, value)) = self.log.first().map_err(db_error)? else {
                    break;
                };
                let seq = seq.value();
                // A damaged entry (quarantined) counts as old: only its time is unknown.
                let old = decode::<_, LogEntry>(&seq, value.value())
                    .map_or(true, |entry| entry.applied_at_ms < oldest_kept_ms);
                if !old {
                    break;
                }
            }
            if self.log.pop_first().map_err(db_error)?.is_none() {
                break;
            }
            len -= 1;
        }
        Ok(())
    }

    /// Forgets the oldest client ids beyond the retention.
    fn trim_dedup(&mut self) -> Result<(), StoreError> {
        while self.counters.dedup_len > self.dedup_retention {
            let oldest = self.dedup_order.pop_first().map_err(db_error)?;
            let Some((_, id)) = oldest else { break };
            let id = id.value().to_string();
            self.dedup.remove(id.as_str()).map_err(db_error)?;
            self.counters.dedup_len -= 1;
        }
        Ok(())
    }
}

/// First byte of a checksummed JSON record (data dir format 2; still written for Kafka
/// checkpoints). JSON never starts with it, so records of format 1 (bare JSON) are told apart.
const RECORD_MARKER: u8 = 0xC5;

/// First byte of a checksummed binary record (data dir format 3, [`record`]): every state,
/// route, dedup entry, log entry and dead letter written now.
const BINARY_MARKER: u8 = 0xC6;

/// Bytes before a checksummed record's value: the marker and the CRC-32 (little endian).
const RECORD_HEADER: usize = 5;

pub(crate) use record::KeyRef;

/// The key a record is stored under: its checksum covers the key as stored, so a record moved
/// to another key by damage is caught too; the binary encoding leaves out what the key says.
pub(crate) trait RecordKey {
    /// The key.
    fn key_ref(&self) -> KeyRef<'_>;
}

impl RecordKey for str {
    fn key_ref(&self) -> KeyRef<'_> {
        KeyRef::Name(self)
    }
}

impl RecordKey for u64 {
    fn key_ref(&self) -> KeyRef<'_> {
        KeyRef::Seq(*self)
    }
}

/// A value a partition file stores: binary now, JSON in files of formats 1 and 2.
pub(crate) trait Stored: record::Binary + DeserializeOwned {}

impl<T: record::Binary + DeserializeOwned> Stored for T {}

/// The CRC-32 of a record's key and value. A binary record's covers its marker too, so a marker
/// damaged into the JSON one does not pass the JSON record's check.
fn checksum(key: KeyRef<'_>, marker: Option<u8>, value: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    let seq_bytes;
    let key: &[u8] = match key {
        KeyRef::Name(name) => name.as_bytes(),
        KeyRef::Seq(seq) => {
            seq_bytes = seq.to_be_bytes();
            &seq_bytes
        }
    };
    hasher.update(&(key.len() as u64).to_le_bytes());
    hasher.update(key);
    if let Some(marker) = marker {
        hasher.update(&[marker]);
    }
    hasher.update(value);
    hasher.finalize()
}

/// The stored bytes of `value` under `key`: marker, checksum, binary value.
pub(crate) fn encode<K: RecordKey + ?Sized, T: record::Binary>(key: &K, value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(&mut out, key, value);
    out
}

/// [`encode`] into a buffer the caller reuses (the batch's, so the hot path does not allocate
/// one per record).
pub(crate) fn encode_into<K: RecordKey + ?Sized, T: record::Binary>(
    out: &mut Vec<u8>,
    key: &K,
    value: &T,
) {
    let key = key.key_ref();
    out.clear();
    out.push(BINARY_MARKER);
    out.extend_from_slice(&[0; 4]);
    record::write_value(value, key, out);
    let sum = checksum(key, Some(BINARY_MARKER), &out[RECORD_HEADER..]);
    out[1..RECORD_HEADER].copy_from_slice(&sum.to_le_bytes());
}

/// The stored bytes of `value` under `key` as checksummed JSON: what Kafka checkpoints keep
/// (their types have no binary encoding; one record per batch at most).
pub(crate) fn encode_json<K: RecordKey + ?Sized, T: Serialize>(key: &K, value: &T) -> Vec<u8> {
    let json = serde_json::to_vec(value).expect("store values always serialize");
    let mut out = Vec::with_capacity(RECORD_HEADER + json.len());
    out.push(RECORD_MARKER);
    out.extend_from_slice(&checksum(key.key_ref(), None, &json).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// How a stored value is encoded, after its checksum was verified.
enum Body<'a> {
    /// Format 3.
    Binary(&'a [u8]),
    /// Formats 1 and 2 (and Kafka checkpoints).
    Json(&'a [u8]),
}

/// Verifies a stored value's checksum (formats 2 and 3) and says how its body is encoded.
fn verified<'a>(key: KeyRef<'_>, bytes: &'a [u8]) -> Result<Body<'a>, StoreError> {
    let marker = match bytes.first() {
        Some(&m @ (RECORD_MARKER | BINARY_MARKER)) => m,
        // Format 1: bare JSON, no checksum.
        _ => return Ok(Body::Json(bytes)),
    };
    if bytes.len() < RECORD_HEADER {
        return Err(StoreError::damaged("record is truncated"));
    }
    let stored = u32::from_le_bytes(bytes[1..RECORD_HEADER].try_into().expect("4 bytes"));
    let body = &bytes[RECORD_HEADER..];
    let covered = (marker == BINARY_MARKER).then_some(marker);
    if checksum(key, covered, body) != stored {
        return Err(StoreError::damaged("record checksum mismatch"));
    }
    Ok(match marker {
        BINARY_MARKER => Body::Binary(body),
        _ => Body::Json(body),
    })
}

/// Decodes the record stored under `key`, binary or JSON; a checksum mismatch or undecodable
/// bytes are damage.
pub(crate) fn decode<K: RecordKey + ?Sized, T: Stored>(
    key: &K,
    bytes: &[u8],
) -> Result<T, StoreError> {
    let key = key.key_ref();
    match verified(key, bytes)? {
        Body::Binary(body) => record::read_value(key, body)
            .map_err(|e| StoreError::damaged(format!("record does not decode: {e}"))),
        Body::Json(json) => serde_json::from_slice(json)
            .map_err(|e| StoreError::damaged(format!("record does not decode: {e}"))),
    }
}

/// Decodes a record that is always JSON (a Kafka checkpoint).
pub(crate) fn decode_json<K: RecordKey + ?Sized, T: DeserializeOwned>(
    key: &K,
    bytes: &[u8],
) -> Result<T, StoreError> {
    match verified(key.key_ref(), bytes)? {
        Body::Json(json) => serde_json::from_slice(json)
            .map_err(|e| StoreError::damaged(format!("record does not decode: {e}"))),
        Body::Binary(_) => Err(StoreError::damaged(
            "record does not decode: binary where JSON is expected",
        )),
    }
}

/// Checks a stored record without decoding it into a type: a checksummed record by its
/// checksum alone (its bytes were written by us, so a matching checksum means it decodes), a
/// format 1 record by parsing its JSON. What the verify pass at open runs on every record.
fn check<K: RecordKey + ?Sized>(key: &K, bytes: &[u8]) -> Result<(), StoreError> {
    match bytes.first() {
        Some(&(RECORD_MARKER | BINARY_MARKER)) => verified(key.key_ref(), bytes).map(|_| ()),
        _ => decode_json::<_, serde::de::IgnoredAny>(key, bytes).map(|_| ()),
    }
}

/// Checks the record stored under `key`, if any, without decoding it (see [`check`]).
fn check_stored(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
    key: &str,
) -> Result<(), StoreError> {
    match table.get(key).map_err(db_error)? {
        Some(value) => check(key, value.value()).map_err(|e| located(e, name, key)),
        None => Ok(()),
    }
}

fn get_record<T: Stored>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
    key: &str,
) -> Result<Option<T>, StoreError> {
    match table.get(key).map_err(db_error)? {
        Some(value) => decode(key, value.value())
            .map(Some)
            .map_err(|e| located(e, name, key)),
        None => Ok(None),
    }
}

/// The tables of a partition file, by name, for reports.
const RECORD_TABLES: [&str; 5] = ["states", "routes", "dedup", "log", "dead_letters"];

/// One damaged record (or damaged structure) found by [`scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The table, or `"file"` when redb cannot read the file's structure.
    pub table: String,
    /// The record's key as text (a sequence number for `log` and `dead_letters`), if known.
    pub key: Option<String>,
    /// What is wrong.
    pub problem: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.key {
            Some(key) => write!(f, "table `{}`, key `{}`: {}", self.table, key, self.problem),
            None => write!(f, "{}: {}", self.table, self.problem),
        }
    }
}

/// What to do about a damaged partition file, appended to every report of damage.
pub const DAMAGE_RECOVERY: &str = "restore the file from a backup taken while it was healthy \
     (see the README, Data dir); `turnstile verify --data-dir DIR` lists every damaged record";

/// Checks every record of every table of an open partition file: each value's checksum and
/// decoding, and that redb can walk each table. Stops after `limit` findings. Never panics on
/// bad bytes: a redb panic is caught and reported as damage of the file.
pub fn scan(db: &impl ReadableDatabase, limit: usize) -> Vec<Damage> {
    let mut found = Vec::new();
    let walked = guard(|| scan_tables(db, limit, &mut found));
    match walked {
        Ok(Ok(())) => {}
        Ok(Err(e)) | Err(e) => found.push(Damage {
            table: "file".into(),
            key: None,
            problem: e.message,
        }),
    }
    found
}

fn scan_tables(
    db: &impl ReadableDatabase,
    limit: usize,
    found: &mut Vec<Damage>,
) -> Result<(), StoreError> {
    let txn = db.begin_read().map_err(db_error)?;
    let mut note = |table: &str, key: String, e: StoreError| {
        found.push(Damage {
            table: table.to_string(),
            key: Some(key),
            problem: e.message,
        })
    };
    for (name, definition) in [
        (RECORD_TABLES[0], STATES),
        (RECORD_TABLES[1], ROUTES),
        (RECORD_TABLES[2], DEDUP),
    ] {
        let table = match txn.open_table(definition) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => continue,
            Err(e) => return Err(db_error(e)),
        };
        for row in table.iter().map_err(db_error)? {
            let (key, value) = row.map_err(db_error)?;
            let key = key.value();
            if let Err(e) = check(key, value.value()) {
                note(name, key.to_string(), e);
            }
        }
    }
    for (name, definition) in [(RECORD_TABLES[3], LOG), (RECORD_TABLES[4], DEAD_LETTERS)] {
        let table = match txn.open_table(definition) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => continue,
            Err(e) => return Err(db_error(e)),
        };
        for row in table.iter().map_err(db_error)? {
            let (key, value) = row.map_err(db_error)?;
            let key = key.value();
            if let Err(e) = check(&key, value.value()) {
                note(name, key.to_string(), e);
            }
        }
    }
    if let Ok(order) = txn.open_table(DEDUP_ORDER) {
        for row in order.iter().map_err(db_error)? {
            row.map_err(db_error)?;
        }
    }
    found.truncate(limit);
    Ok(())
}

/// Removes the damaged records `damage` lists (from [`scan`]) from an open partition file, in one
/// transaction: what `turnstile verify --drop-damaged` does once an operator chose to give those
/// records up (see the README, Data dir, for what each table's loss means). Damage of the file's
/// structure is not repaired here; returns how many records were removed.
pub fn drop_records(db: &Database, damage: &[Damage]) -> Result<usize, StoreError> {
    let txn = db.begin_write().map_err(db_error)?;
    let mut removed = 0;
    {
        let mut by_name = [
            (RECORD_TABLES[0], txn.open_table(STATES).map_err(db_error)?),
            (RECORD_TABLES[1], txn.open_table(ROUTES).map_err(db_error)?),
            (RECORD_TABLES[2], txn.open_table(DEDUP).map_err(db_error)?),
        ];
        let mut by_seq = [
            (RECORD_TABLES[3], txn.open_table(LOG).map_err(db_error)?),
            (
                RECORD_TABLES[4],
                txn.open_table(DEAD_LETTERS).map_err(db_error)?,
            ),
        ];
        for found in damage {
            let Some(key) = &found.key else { continue };
            if let Some((_, table)) = by_name.iter_mut().find(|(n, _)| *n == found.table) {
                removed += usize::from(table.remove(key.as_str()).map_err(db_error)?.is_some());
            } else if let Some((_, table)) = by_seq.iter_mut().find(|(n, _)| *n == found.table)
                && let Ok(seq) = key.parse::<u64>()
            {
                removed += usize::from(table.remove(seq).map_err(db_error)?.is_some());
            }
        }
    }
    txn.commit().map_err(db_error)?;
    Ok(removed)
}

std::thread_local! {
    /// Whether this thread is inside [`guard`]: its panics are reported as damage, by file.
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs, once, a panic hook that stays quiet for panics [`guard`] catches (their message
/// goes into the damage report with the file's name; a redb backtrace on stderr only frightens
/// the operator) and leaves every other panic to the previous hook.
fn quiet_guarded_panics() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(|g| g.get()) {
                previous(info);
            }
        }));
    });
}

/// Runs `f`, turning a panic (redb panics on some malformed pages in debug builds and on a few
/// in release builds) into damage, so bad bytes never kill a partition thread.
pub(crate) fn guard<R>(f: impl FnOnce() -> R) -> Result<R, StoreError> {
    quiet_guarded_panics();
    let outer = GUARDED.with(|g| g.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(outer));
    result.map_err(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        StoreError::damaged(format!("redb could not read the file ({what})"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::now_ms;

    fn state(user: &str) -> State {
        State {
            status: "reserved".into(),
            user: user.into(),
            data: "{}".into(),
            version: 1,
            rule_version: "v".into(),
            updated_at_ms: 1,
        }
    }

    /// A fresh data dir under the system temp dir, removed when dropped.
    struct TempDataDir(PathBuf);

    impl TempDataDir {
        fn new(name: &str) -> TempDataDir {
            let dir = std::env::temp_dir().join(format!(
                "turnstile-store-{name}-{}-{}",
                std::process::id(),
                next_record_order()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            TempDataDir(dir)
        }
    }

    impl Drop for TempDataDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A record whose bytes changed under the running partition is reported with the file and
    /// the key and quarantined: that record is refused, every other write goes on, and a restart
    /// quarantines it again instead of refusing the partition.
    #[test]
    fn damaged_record_is_quarantined_not_the_partition() {
        let data = TempDataDir::new("running");
        let generation = prepare_dir(&data.0, 2, HashKind::Java).unwrap();
        let location = Location::Dir(generation.clone());
        let mut store = PartitionStore::open(&location, 0, Durability::Sync, 10).unwrap();
        store
            .write_batch(|batch| {
                batch.put_state("healthy", &state("a"))?;
                batch.put_state("hurt", &state("b"))
            })
            .unwrap();

        // Change one byte of the stored record, as a bad disk would, behind the store's back.
        let mut bytes = encode("hurt", &state("b"));
        let last = bytes.len() - 2;
        bytes[last] ^= 0x01;
        {
            let db = store.db.as_ref().unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(STATES)
                .unwrap()
                .insert("hurt", bytes.as_slice())
                .unwrap();
            txn.commit().unwrap();
        }

        let e = store.state("hurt").unwrap_err();
        assert!(e.is_record_damage());
        let path = partition_path(&generation, 0).display().to_string();
        assert!(
            e.message.contains(&path) && e.message.contains("hurt"),
            "{e}"
        );
        assert_eq!(store.quarantine().len(), 1);
        store
            .write_batch(|batch| batch.put_state("healthy", &state("c")))
            .unwrap();
        assert_eq!(store.state("healthy").unwrap(), Some(state("c")));
        drop(store);

        let mut store = PartitionStore::open(&location, 0, Durability::Sync, 10).unwrap();
        assert_eq!(store.quarantine().len(), 1);
        assert!(store.state("hurt").unwrap_err().is_record_damage());
    }

    fn log_entry(applied_at_ms: u64) -> LogEntry {
        LogEntry {
            seq: 0,
            request: RoutedRequest {
                id: "i".into(),
                idempotent: false,
                kind: "reserve".into(),
                key: "k".into(),
                user: "u".into(),
                payload: "{}".into(),
                received_at_ms: applied_at_ms,
            },
            outcome: Outcome::Reject { reason: "r".into() },
            state_version: 0,
            rule_version: "v".into(),
            applied_at_ms,
        }
    }

    fn log_seqs(store: &mut PartitionStore) -> Vec<u64> {
        store.log(0, 1000).unwrap().iter().map(|e| e.seq).collect()
    }

    /// The log keeps the newest `log_entries` (counted, not computed from sequence numbers,
    /// which have gaps in Kafka mode), and drops entries older than `log_age_ms`.
    #[test]
    fn log_retention_by_count_and_by_age() {
        let mut store = PartitionStore::open(&Location::Memory, 0, Durability::Sync, 10)
            .unwrap()
            .with_retention(Retention {
                log_entries: 3,
                ..Retention::default()
            });
        for _ in 0..5 {
            store
                .write_batch(|batch| batch.append_log(log_entry(now_ms())).map(|_| ()))
                .unwrap();
        }
        assert_eq!(log_seqs(&mut store), vec![3, 4, 5]);
        store
            .write_batch(|batch| {
                batch.set_next_log_seq(100);
                batch.append_log(log_entry(now_ms())).map(|_| ())
            })
            .unwrap();
        assert_eq!(log_seqs(&mut store), vec![4, 5, 100]);

        let mut store = PartitionStore::open(&Location::Memory, 1, Durability::Sync, 10)
            .unwrap()
            .with_retention(Retention {
                log_age_ms: 60_000,
                ..Retention::default()
            });
        store
            .write_batch(|batch| {
                batch.append_log(log_entry(1))?;
                batch.append_log(log_entry(2))?;
                batch.append_log(log_entry(now_ms())).map(|_| ())
            })
            .unwrap();
        assert_eq!(log_seqs(&mut store), vec![3]);
    }

    /// A damaged dead letter is left out of its page and quarantined; the others are served.
    #[test]
    fn damaged_dead_letter_is_skipped_in_pages() {
        let mut store = PartitionStore::open(&Location::Memory, 0, Durability::Sync, 10).unwrap();
        let letter = |seq| DeadLetter {
            seq,
            partition: 0,
            request: log_entry(1).request,
            failure: Failure::refused(&"bad"),
            rule_version: "v".into(),
            failed_at_ms: 1,
            source: None,
            resubmitted: None,
        };
        store
            .write_batch(|batch| {
                for _ in 0..3 {
                    batch.dead_letter(letter(0))?;
                }
                Ok(())
            })
            .unwrap();
        {
            let db = store.db.as_ref().unwrap();
            let txn = db.begin_write().unwrap();
            let mut bytes = encode(&2u64, &letter(2));
            let last = bytes.len() - 2;
            bytes[last] ^= 0x01;
            txn.open_table(DEAD_LETTERS)
                .unwrap()
                .insert(2, bytes.as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let seqs: Vec<u64> = store
            .dead_letters(0, 10)
            .unwrap()
            .iter()
            .map(|l| l.seq)
            .collect();
        assert_eq!(seqs, vec![1, 3]);
        assert_eq!(store.quarantine().len(), 1);
    }

    /// After a failed commit the partition reopens its file before the next batch; a file
    /// emptied meanwhile is an error naming it, never replaced by an empty database.
    #[test]
    fn reopen_after_a_failed_commit_never_recreates_the_file() {
        let data = TempDataDir::new("reopen");
        let generation = prepare_dir(&data.0, 2, HashKind::Java).unwrap();
        let location = Location::Dir(generation.clone());
        let mut store = PartitionStore::open(&location, 1, Durability::Sync, 10).unwrap();
        store
            .write_batch(|batch| batch.put_state("kept", &state("a")))
            .unwrap();
        // What a failed commit leaves: no handle, reopened on next use.
        store.forget_handle();
        let path = partition_path(&generation, 1);
        std::fs::File::create(&path).unwrap();

        let e = store.state("kept").unwrap_err();
        assert!(e.message.contains(&path.display().to_string()), "{e}");
        let e = store
            .write_batch(|batch| batch.put_state("new", &state("b")))
            .unwrap_err();
        assert!(e.message.contains(&path.display().to_string()), "{e}");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            0,
            "file re-created"
        );
    }

    /// A record of format 1 (bare JSON) still reads; a checksummed record whose key changed
    /// does not.
    #[test]
    fn checksums_cover_the_key_and_format_1_records_read() {
        let legacy = serde_json::to_vec(&state("a")).unwrap();
        assert_eq!(decode::<_, State>("k", &legacy).unwrap(), state("a"));
        let record = encode("k", &state("a"));
        assert_eq!(decode::<_, State>("k", &record).unwrap(), state("a"));
        assert!(decode::<_, State>("j", &record).unwrap_err().is_damage());
    }

    /// A sha256 in hex, as rule versions are.
    const VERSION_ID: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn dedup(id: &str) -> StoredDedup {
        StoredDedup {
            entry: DedupEntry {
                fingerprint: "f".repeat(64),
                decision: Decision {
                    id: id.into(),
                    key: "k".into(),
                    partition: 3,
                    seq: 42,
                    verdict: crate::model::Verdict::Transition(State {
                        rule_version: VERSION_ID.into(),
                        ..state("u")
                    }),
                    rule_version: VERSION_ID.into(),
                },
            },
            order: 7,
        }
    }

    /// Every stored type reads back as it was written, from binary (format 3), checksummed JSON
    /// (format 2) and bare JSON (format 1); the binary record is the smaller.
    #[test]
    fn every_record_reads_back_in_all_three_formats() {
        fn all_formats<
            K: RecordKey + ?Sized,
            T: Stored + Serialize + PartialEq + std::fmt::Debug,
        >(
            key: &K,
            value: &T,
        ) {
            let binary = encode(key, value);
            let json = encode_json(key, value);
            let bare = serde_json::to_vec(value).unwrap();
            assert_eq!(binary[0], BINARY_MARKER);
            for bytes in [&binary, &json, &bare] {
                assert_eq!(&decode::<_, T>(key, bytes).unwrap(), value);
                check(key, bytes).unwrap();
            }
            assert!(
                binary.len() < json.len(),
                "{} >= {}",
                binary.len(),
                json.len()
            );
        }
        let mut entry = log_entry(1_700_000_000_000);
        entry.seq = 9;
        entry.rule_version = VERSION_ID.into();
        entry.outcome = Outcome::Transition {
            status: "reserved".into(),
            data: r#"{"n":1}"#.into(),
        };
        all_formats(&9u64, &entry);
        all_formats("k", &state("u"));
        let letter = DeadLetter {
            seq: 4,
            partition: 1,
            request: entry.request.clone(),
            failure: Failure {
                kind: "trap".into(),
                message: "m".into(),
                detail: Some("d".into()),
            },
            rule_version: VERSION_ID.into(),
            failed_at_ms: 5,
            source: Some(crate::partition::RecordSource {
                topic: "t".into(),
                partition: 2,
                offset: 77,
            }),
            resubmitted: Some(Resubmitted {
                at_ms: 6,
                outcome: "transition".into(),
            }),
        };
        let round = |bytes: &[u8]| decode::<_, DeadLetter>(&4u64, bytes).unwrap();
        let json = serde_json::to_value(&letter).unwrap();
        assert_eq!(
            serde_json::to_value(round(&encode(&4u64, &letter))).unwrap(),
            json
        );
        assert_eq!(
            serde_json::to_value(round(&encode_json(&4u64, &letter))).unwrap(),
            json
        );
        let stored = dedup("id-1");
        let json = serde_json::to_value(&stored).unwrap();
        for bytes in [encode("id-1", &stored), encode_json("id-1", &stored)] {
            let back: StoredDedup = decode("id-1", &bytes).unwrap();
            assert_eq!(serde_json::to_value(back).unwrap(), json);
        }
        let route = StoredRoute {
            route: Route {
                key: "k".into(),
                recorded_at_ms: 3,
            },
            order: 8,
        };
        let back: StoredRoute = decode("u", &encode("u", &route)).unwrap();
        assert_eq!((back.route, back.order), (route.route, route.order));
    }

    /// Any one byte of a binary record changed, its marker included, is damage, found by the
    /// open-time check as by a read.
    #[test]
    fn every_changed_byte_of_a_binary_record_is_damage() {
        let bytes = encode("id-1", &dedup("id-1"));
        for at in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut damaged = bytes.clone();
                damaged[at] ^= flip;
                assert!(check("id-1", &damaged).is_err(), "byte {at} ^ {flip:#x}");
                assert!(
                    decode::<_, StoredDedup>("id-1", &damaged).is_err(),
                    "byte {at} ^ {flip:#x}"
                );
            }
        }
        let mut json_marked = bytes.clone();
        json_marked[0] = RECORD_MARKER;
        assert!(check("id-1", &json_marked).is_err());
    }

    /// A key written twice in one batch is stored once, with its last value, and read back by
    /// the batch's later requests; a failed batch leaves nothing behind for the next one.
    #[test]
    fn a_batch_stores_each_key_once_and_a_failed_batch_nothing() {
        let mut store = PartitionStore::open(&Location::Memory, 0, Durability::Sync, 10).unwrap();
        store
            .write_batch(|batch| {
                batch.put_state("k", &state("a"))?;
                assert_eq!(batch.state("k")?, Some(state("a")));
                batch.put_state("k", &state("b"))?;
                assert_eq!(batch.state("k")?, Some(state("b")));
                let route = |key: &str| Route {
                    key: key.into(),
                    recorded_at_ms: 1,
                };
                batch.record_route("u", &route("k"))?;
                batch.record_route("u", &route("k2"))?;
                assert_eq!(batch.route("u")?.map(|r| r.key), Some("k2".into()));
                Ok(())
            })
            .unwrap();
        assert_eq!(store.state("k").unwrap(), Some(state("b")));
        assert_eq!(
            store.reader().route("u").unwrap().map(|r| r.route.key),
            Some("k2".into())
        );
        let failed = store.write_batch(|batch| {
            batch.put_state("lost", &state("c"))?;
            Err::<(), _>(StoreError::unavailable("the batch fails"))
        });
        assert!(failed.is_err());
        store
            .write_batch(|batch| {
                assert_eq!(batch.state("lost")?, None);
                Ok(())
            })
            .unwrap();
        assert_eq!(store.state("lost").unwrap(), None);
    }
}
