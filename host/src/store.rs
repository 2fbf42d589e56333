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
//!
//! Values are JSON, so a file can be inspected with any redb tool and read by later versions.
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
//!
//! # Assumptions about the disk
//!
//! - `fsync` (what redb calls for `Immediate` durability) means the data survives power loss; a
//!   disk or file system that lies about it voids invariant 3.
//! - A failed write or sync is reported as an error, not silently dropped. On such an error the
//!   batch is failed (nothing in it is acknowledged) and the database is reopened before the next
//!   batch, so the partition recovers when the disk does.
//! - Files are not edited by anything but Turnstile while it runs (redb locks them).

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

pub(crate) const STATES: TableDefinition<&str, &[u8]> = TableDefinition::new("states");
pub(crate) const ROUTES: TableDefinition<&str, &[u8]> = TableDefinition::new("routes");
pub(crate) const DEDUP: TableDefinition<&str, &[u8]> = TableDefinition::new("dedup");
pub(crate) const DEDUP_ORDER: TableDefinition<u64, &str> = TableDefinition::new("dedup_order");
pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
pub(crate) const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");

/// File in the data dir that records the layout (invariant 6).
pub const LAYOUT_FILE: &str = "turnstile.json";

/// A store failure. Requests that hit one answer 503: the state is unchanged and a retry with
/// the same id is safe.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

impl StoreError {
    fn at(what: impl std::fmt::Display, e: impl std::fmt::Display) -> StoreError {
        StoreError(format!("{what}: {e}"))
    }
}

fn db_error(e: impl Into<redb::Error>) -> StoreError {
    StoreError(e.into().to_string())
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

/// The current data dir format.
pub const FORMAT: u32 = 1;

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
    #[error("partition file {0} is missing; the data dir is incomplete (restore it from a backup)")]
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
            if layout.format != FORMAT {
                return Err(other(format!(
                    "{} has data dir format {}, this turnstile reads format {FORMAT}",
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
            write_layout(dir, &layout).map_err(other)?;
            Ok(generation)
        }
    }
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
    pub failure: RuleFailure,
    /// Version id of the rule that failed.
    pub rule_version: String,
    /// Host time of the failure, ms since the Unix epoch.
    pub failed_at_ms: u64,
    /// Set once the letter was resubmitted (`POST /v1/dead-letters/{partition}/{seq}/resubmit`),
    /// so an operator sees which letters were dealt with; the last resubmission wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resubmitted: Option<Resubmitted>,
}

/// When a dead letter was resubmitted and what came of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resubmitted {
    /// Host time of the resubmission, ms since the Unix epoch.
    pub at_ms: u64,
    /// `transition`, `reject`, or the error code it failed with again.
    pub outcome: String,
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
}

/// One partition's database, owned by its thread.
pub struct PartitionStore {
    /// The open database; `None` after a failed commit, until it is reopened.
    db: Option<Database>,
    location: Location,
    partition: u32,
    durability: RedbDurability,
    dedup_retention: u64,
    counters: Counters,
}

impl PartitionStore {
    /// Opens (or creates) partition `partition`'s database.
    pub fn open(
        location: &Location,
        partition: u32,
        durability: Durability,
        dedup_retention: u64,
    ) -> Result<PartitionStore, StoreError> {
        let db = open_db(location, partition)?;
        let mut store = PartitionStore {
            db: Some(db),
            location: location.clone(),
            partition,
            durability: match durability {
                Durability::Sync => RedbDurability::Immediate,
                Durability::None => RedbDurability::None,
            },
            dedup_retention: dedup_retention.max(1),
            counters: Counters::default(),
        };
        store.counters = store.read_counters()?;
        Ok(store)
    }

    fn db(&mut self) -> Result<&Database, StoreError> {
        if self.db.is_none() {
            // A previous commit failed; redb may have given up on the handle. Reopening replays
            // its recovery, and the counters come from what is really on disk.
            let db = open_db(&self.location, self.partition)?;
            self.db = Some(db);
            match self.read_counters() {
                Ok(c) => self.counters = c,
                Err(e) => {
                    self.db = None;
                    return Err(e);
                }
            }
        }
        Ok(self.db.as_ref().expect("just opened"))
    }

    fn read_counters(&mut self) -> Result<Counters, StoreError> {
        let db = self.db.as_ref().expect("open");
        // Make sure every table exists, so readers never meet a missing one.
        let txn = db.begin_write().map_err(db_error)?;
        {
            txn.open_table(STATES).map_err(db_error)?;
            txn.open_table(ROUTES).map_err(db_error)?;
            txn.open_table(DEDUP).map_err(db_error)?;
            txn.open_table(DEDUP_ORDER).map_err(db_error)?;
            txn.open_table(LOG).map_err(db_error)?;
            txn.open_table(DEAD_LETTERS).map_err(db_error)?;
        }
        txn.commit().map_err(db_error)?;
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
        Ok(Counters {
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

    /// Runs `f` over one write transaction and commits it (invariant 2). If `f` or the commit
    /// fails nothing of it is stored, and the error says why.
    pub fn write_batch<R>(
        &mut self,
        f: impl FnOnce(&mut Batch<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let durability = self.durability;
        let retention = self.dedup_retention;
        let counters = self.counters;
        let db = self.db()?;
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
                counters,
                dedup_retention: retention,
            };
            let result = f(&mut batch).and_then(|r| batch.trim_dedup().map(|()| r));
            result.map(|r| (r, batch.counters))
        };
        match result {
            Ok((r, counters)) => match txn.commit() {
                Ok(()) => {
                    self.counters = counters;
                    Ok(r)
                }
                Err(e) => {
                    self.db = None;
                    Err(StoreError::at(
                        format_args!("committing partition {}", self.partition),
                        db_error(e),
                    ))
                }
            },
            Err(e) => {
                let _ = txn.abort();
                Err(e)
            }
        }
    }

    /// The current state of `key`, from committed data.
    pub fn state(&mut self, key: &str) -> Result<Option<State>, StoreError> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let table = txn.open_table(STATES).map_err(db_error)?;
        get_json(&table, key)
    }

    /// The route of `user` recorded in this partition, if any.
    pub fn route(&mut self, user: &str) -> Result<Option<Route>, StoreError> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let table = txn.open_table(ROUTES).map_err(db_error)?;
        get_json(&table, user)
    }

    /// Every route recorded in this partition, for warming the route cache at start.
    pub fn routes(&mut self) -> Result<Vec<(String, Route)>, StoreError> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let table = txn.open_table(ROUTES).map_err(db_error)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db_error)? {
            let (user, value) = row.map_err(db_error)?;
            out.push((user.value().to_string(), decode(value.value())?));
        }
        Ok(out)
    }

    /// Up to `limit` dead letters with a sequence number above `after`, oldest first.
    pub fn dead_letters(
        &mut self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let table = txn.open_table(DEAD_LETTERS).map_err(db_error)?;
        let mut out = Vec::new();
        for row in table
            .range(after.saturating_add(1)..)
            .map_err(db_error)?
            .take(limit)
        {
            let (_, value) = row.map_err(db_error)?;
            out.push(decode(value.value())?);
        }
        Ok(out)
    }

    /// Records on dead letter `seq` that it was resubmitted; `false` if there is no such letter.
    pub fn mark_resubmitted(&mut self, seq: u64, mark: Resubmitted) -> Result<bool, StoreError> {
        let txn = self.db()?.begin_write().map_err(db_error)?;
        {
            let mut table = txn.open_table(DEAD_LETTERS).map_err(db_error)?;
            let letter = match table.get(seq).map_err(db_error)? {
                Some(value) => decode::<DeadLetter>(value.value())?,
                None => return Ok(false),
            };
            let letter = DeadLetter {
                resubmitted: Some(mark),
                ..letter
            };
            table
                .insert(seq, encode(&letter).as_slice())
                .map_err(db_error)?;
        }
        txn.commit().map_err(db_error)?;
        Ok(true)
    }

    /// Up to `limit` log entries from sequence number `from`, in order.
    pub fn log(&mut self, from: u64, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let table = txn.open_table(LOG).map_err(db_error)?;
        let mut out = Vec::new();
        for row in table.range(from..).map_err(db_error)?.take(limit) {
            let (_, value) = row.map_err(db_error)?;
            out.push(decode(value.value())?);
        }
        Ok(out)
    }
}

fn open_db(location: &Location, partition: u32) -> Result<Database, StoreError> {
    match location {
        Location::Memory => redb::Builder::new()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| {
                StoreError::at(format_args!("partition {partition} (memory)"), db_error(e))
            }),
        Location::Dir(dir) => {
            let path = partition_path(dir, partition);
            Database::create(&path).map_err(|e| StoreError::at(path.display(), db_error(e)))
        }
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
    counters: Counters,
    dedup_retention: u64,
}

impl Batch<'_> {
    /// The state of `key` as this batch has it so far (earlier requests in the batch included).
    pub fn state(&self, key: &str) -> Result<Option<State>, StoreError> {
        get_json(&self.states, key)
    }

    /// The dedup entry of a client request id, if one was applied before.
    pub fn dedup(&self, id: &str) -> Result<Option<DedupEntry>, StoreError> {
        get_json(&self.dedup, id)
    }

    /// Records `user → route` durably.
    pub fn record_route(&mut self, user: &str, route: &Route) -> Result<(), StoreError> {
        self.routes
            .insert(user, encode(route).as_slice())
            .map_err(db_error)?;
        Ok(())
    }

    /// Stores a new state for `key`.
    pub fn put_state(&mut self, key: &str, state: &State) -> Result<(), StoreError> {
        self.states
            .insert(key, encode(state).as_slice())
            .map_err(db_error)?;
        Ok(())
    }

    /// Appends an applied request to the log and returns its sequence number.
    pub fn append_log(&mut self, mut entry: LogEntry) -> Result<u64, StoreError> {
        let seq = self.counters.next_log_seq;
        entry.seq = seq;
        self.log
            .insert(seq, encode(&entry).as_slice())
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

    /// Remembers the answer to a client request id.
    pub fn put_dedup(&mut self, id: &str, entry: &DedupEntry) -> Result<(), StoreError> {
        let previous = self
            .dedup
            .insert(id, encode(entry).as_slice())
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
            .insert(seq, encode(&letter).as_slice())
            .map_err(db_error)?;
        self.counters.next_dead_seq += 1;
        Ok(seq)
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

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("store values always serialize")
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError(format!("corrupt record: {e}")))
}

fn get_json<T: DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>, StoreError> {
    match table.get(key).map_err(db_error)? {
        Some(value) => decode(value.value()).map(Some),
        None => Ok(None),
    }
}
