//! The changelog: how a Kafka-mode partition's state outlives the process that owns it.
//!
//! # Records
//!
//! One changelog partition per requests partition, compacted (the newest record of each Kafka
//! key is kept forever). Each record carries the *epoch* of the owner that wrote it.
//!
//! | Kafka key      | record       | what it holds                                                    |
//! |----------------|--------------|------------------------------------------------------------------|
//! | `state/<key>`  | `applied`    | the key's new state, the route and dedup entry its request left, the request's offset |
//! | `progress`     | `progress`   | the offset of a consumed request that changed nothing            |
//! | `dedup/<id>`   | `dedup`      | a copy of one dedup entry, so compaction of `state/<key>` keeps it |
//! | `route/<user>` | `route`      | a copy of one route, for the same reason                         |
//! | `fence/<id>`   | `fence`      | written by a process that takes the partition over               |
//! | `resumed/<id>` | `resumed`    | format 2: where the owner of fence `<id>` resumed, after its restore |
//!
//! A batch writes its copies first, then one `applied` or `progress` record per consumed
//! request, in order. A copy is honoured only once an `applied`/`progress` record at or after
//! its request's offset has been read, and each `applied` record holds its key's state as of
//! its own request, so a crash in the middle of a batch leaves whole requests. A restore commits
//! the copies it holds with its checkpoint, so one cut short goes on with them.
//!
//! Compaction can remove the `applied` record that made a copy count (a later request wrote
//! the same key) while the copy stays: the next `applied`/`progress` record honours it, unless
//! a fence comes first. A fence used to drop the copies held at it, as belonging to a batch the
//! previous owner never finished; in format 2 they wait for the new owner's `resumed` record,
//! which honours those of requests before its resume point and drops the others. Format 1 keeps
//! the old rule (and that gap: older processes would not understand a `resumed` record).
//!
//! A restore also notes what its owner must write again: records of fenced-out writers it met
//! (their owner may have died before its read-back repaired them) and copies its own fence
//! dropped (a copy of a batch cut short may have replaced a valid one under the same key). The
//! owner writes its own values of those keys before its `resumed` record.
//!
//! # Formats
//!
//! The cluster's layout records the format its changelog is written in, and every process
//! writes that one ([`ChangelogFormat`]); a process reads both, record by record.
//! - **1, JSON** (clusters created before format 2): the `applied` record is self-contained
//!   (state + the user's route + the dedup entry), a `route` copy is written for every changed
//!   request whose user has a route.
//! - **2, binary** (new clusters): the first byte is [`BINARY_MARK`] (a JSON record starts with
//!   `{`), then a kind byte and the fields in the varint encoding of the data dir's values
//!   ([`crate::store::record`]). The `applied` record holds the state only: the route and the
//!   dedup entry are in their copies, which the batch writes before it, and a `route` copy is
//!   written only for a request that moved the route. A reserve with an id writes three
//!   records, an associate two; about a third of the bytes of format 1, and no JSON to encode on
//!   the partition thread (that encoding was a tenth of a Kafka-mode process's CPU).
//!
//! # Epochs and fencing
//!
//! A process that takes a partition writes a fence; the fence's offset is its *epoch*, larger
//! than every earlier owner's. While reading, the newest fence seen so far is the current epoch:
//! a record with an older epoch after it was written by a *zombie* (an owner cut off from the
//! group that kept writing) and is ignored. The owner itself follows its partition of the
//! changelog before it acknowledges a batch. When the broker's acknowledgement puts the batch's
//! records right after the last record the owner accounted for, with no offset between, no other
//! writer's record can be among them, and nothing is fetched. Otherwise the owner reads the
//! partition back up to its batch's last record: if it meets a newer fence it has been fenced,
//! acknowledges nothing more and stops; if it meets a zombie's record it writes its own value
//! of that key again, so compaction keeps the owner's value and never the zombie's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::model::{RoutedRequest, State};
use crate::router::Route;
use crate::store::record::{Binary, KeyRef, Reader, put_i64, put_str};
use crate::store::{Batch, DedupEntry, PartitionStore, StoreError};

use super::{Shared, consumer_config};

/// A record of the changelog topic.
#[allow(
    clippy::large_enum_variant,
    reason = "built and serialized once per request; boxing would only add an allocation"
)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChangelogRecord {
    /// The effect of one applied request (or of a rule failure, which records the route).
    Applied {
        /// Offset of the request in the requests partition.
        source_offset: i64,
        /// Epoch of the owner that wrote it.
        epoch: i64,
        /// The key.
        key: String,
        /// The key's state as of this request, not of the end of its batch (none if it
        /// still has none).
        state: Option<State>,
        /// Format 1 only: the user's route, with its user (format 2 leaves it to the copy).
        route: Option<(String, Route)>,
        /// Format 1 only: the dedup entry it left (format 2 leaves it to the copy).
        dedup: Option<(String, DedupEntry)>,
    },
    /// A consumed record that changed nothing (a deduplicated answer, or a record refused
    /// before the rule saw it): only its offset, so a restore resumes after it.
    Progress {
        /// Offset of the record in the requests partition.
        source_offset: i64,
        /// Epoch of the owner that wrote it.
        epoch: i64,
    },
    /// A copy of a dedup entry under its own Kafka key.
    Dedup {
        /// Offset of the request that left it.
        source_offset: i64,
        /// Epoch of the owner that wrote it.
        epoch: i64,
        /// The request id.
        id: String,
        /// The entry.
        entry: DedupEntry,
    },
    /// A copy of a route under its own Kafka key.
    Route {
        /// Offset of the request that recorded it.
        source_offset: i64,
        /// Epoch of the owner that wrote it.
        epoch: i64,
        /// The user.
        user: String,
        /// The route.
        route: Route,
    },
    /// Written by a process that is about to restore the partition; reading up to it means
    /// having read everything written before. Its offset is the new owner's epoch.
    Fence {
        /// Unique to one restore.
        id: String,
    },
    /// Format 2: written by the owner of fence `fence` once its restore is done, before it
    /// consumes anything: the requests before `resume` were complete. Copies held at a fence
    /// are decided by it (honoured when their request is before `resume`, dropped otherwise),
    /// because the `applied` record that made a copy count may be gone: compaction removes it
    /// once a later request writes the same key. Kept forever, as fences are (unique key).
    Resumed {
        /// The owner's epoch (its fence's offset).
        epoch: i64,
        /// The first request it consumed.
        resume: i64,
        /// Its fence's id.
        fence: String,
    },
}

impl ChangelogRecord {
    /// The Kafka key compaction keeps the newest record of.
    pub fn kafka_key(&self) -> String {
        match self {
            ChangelogRecord::Applied { key, .. } => format!("state/{key}"),
            ChangelogRecord::Progress { .. } => "progress".to_string(),
            ChangelogRecord::Dedup { id, .. } => format!("dedup/{id}"),
            ChangelogRecord::Route { user, .. } => format!("route/{user}"),
            ChangelogRecord::Fence { id } => format!("fence/{id}"),
            ChangelogRecord::Resumed { fence, .. } => format!("resumed/{fence}"),
        }
    }

    fn epoch(&self) -> Option<i64> {
        match self {
            ChangelogRecord::Applied { epoch, .. }
            | ChangelogRecord::Progress { epoch, .. }
            | ChangelogRecord::Dedup { epoch, .. }
            | ChangelogRecord::Route { epoch, .. }
            | ChangelogRecord::Resumed { epoch, .. } => Some(*epoch),
            ChangelogRecord::Fence { .. } => None,
        }
    }

    /// The record's Kafka key and value in `format`.
    pub fn encode(&self, format: ChangelogFormat) -> (String, Vec<u8>) {
        let value = match format {
            ChangelogFormat::Json => serde_json::to_vec(self).expect("changelog records serialize"),
            ChangelogFormat::Binary => {
                let mut out = Vec::with_capacity(64);
                self.write_binary(&mut out);
                out
            }
        };
        (self.kafka_key(), value)
    }

    fn write_binary(&self, out: &mut Vec<u8>) {
        out.push(BINARY_MARK);
        let (kind, offsets) = match self {
            ChangelogRecord::Applied {
                source_offset,
                epoch,
                ..
            } => (KIND_APPLIED, Some((source_offset, epoch))),
            ChangelogRecord::Progress {
                source_offset,
                epoch,
            } => (KIND_PROGRESS, Some((source_offset, epoch))),
            ChangelogRecord::Dedup {
                source_offset,
                epoch,
                ..
            } => (KIND_DEDUP, Some((source_offset, epoch))),
            ChangelogRecord::Route {
                source_offset,
                epoch,
                ..
            } => (KIND_ROUTE, Some((source_offset, epoch))),
            ChangelogRecord::Resumed { epoch, resume, .. } => (KIND_RESUMED, Some((resume, epoch))),
            ChangelogRecord::Fence { .. } => (KIND_FENCE, None),
        };
        out.push(kind);
        if let Some((source_offset, epoch)) = offsets {
            // The epoch right after the kind: the read-back's first look stops there.
            put_i64(out, *epoch);
            put_i64(out, *source_offset);
        }
        let option = |out: &mut Vec<u8>, present: bool| out.push(u8::from(present));
        match self {
            ChangelogRecord::Applied {
                key,
                state,
                route,
                dedup,
                ..
            } => {
                put_str(out, key);
                option(out, state.is_some());
                if let Some(state) = state {
                    state.write(KeyRef::Name(key), out);
                }
                option(out, route.is_some());
                if let Some((user, route)) = route {
                    put_str(out, user);
                    route.write(KeyRef::Name(user), out);
                }
                option(out, dedup.is_some());
                if let Some((id, entry)) = dedup {
                    put_str(out, id);
                    entry.write(KeyRef::Name(id), out);
                }
            }
            ChangelogRecord::Progress { .. } => {}
            ChangelogRecord::Dedup { id, entry, .. } => {
                put_str(out, id);
                entry.write(KeyRef::Name(id), out);
            }
            ChangelogRecord::Route { user, route, .. } => {
                put_str(out, user);
                route.write(KeyRef::Name(user), out);
            }
            ChangelogRecord::Fence { id } | ChangelogRecord::Resumed { fence: id, .. } => {
                put_str(out, id)
            }
        }
    }

    /// Decodes a record of either format.
    pub fn decode(value: &[u8]) -> Result<ChangelogRecord, String> {
        if value.first() != Some(&BINARY_MARK) {
            return serde_json::from_slice(value).map_err(|e| e.to_string());
        }
        let mut r = Reader::new(&value[1..]);
        let kind = r.u8()?;
        if kind == KIND_FENCE {
            let id = r.string()?;
            r.finish()?;
            return Ok(ChangelogRecord::Fence { id });
        }
        let epoch = r.i64()?;
        let source_offset = r.i64()?;
        let record = match kind {
            KIND_APPLIED => {
                let key = r.string()?;
                let state = r.option(|r| State::read(KeyRef::Name(&key), r))?;
                let route = r.option(|r| {
                    let user = r.string()?;
                    let route = Route::read(KeyRef::Name(&user), r)?;
                    Ok((user, route))
                })?;
                let dedup = r.option(|r| {
                    let id = r.string()?;
                    let entry = DedupEntry::read(KeyRef::Name(&id), r)?;
                    Ok((id, entry))
                })?;
                ChangelogRecord::Applied {
                    source_offset,
                    epoch,
                    key,
                    state,
                    route,
                    dedup,
                }
            }
            KIND_PROGRESS => ChangelogRecord::Progress {
                source_offset,
                epoch,
            },
            KIND_DEDUP => {
                let id = r.string()?;
                let entry = DedupEntry::read(KeyRef::Name(&id), &mut r)?;
                ChangelogRecord::Dedup {
                    source_offset,
                    epoch,
                    id,
                    entry,
                }
            }
            KIND_ROUTE => {
                let user = r.string()?;
                let route = Route::read(KeyRef::Name(&user), &mut r)?;
                ChangelogRecord::Route {
                    source_offset,
                    epoch,
                    user,
                    route,
                }
            }
            KIND_RESUMED => ChangelogRecord::Resumed {
                epoch,
                resume: source_offset,
                fence: r.string()?,
            },
            other => return Err(format!("unknown changelog record kind {other}")),
        };
        r.finish()?;
        Ok(record)
    }
}

/// The first byte of a format 2 (binary) changelog record.
pub const BINARY_MARK: u8 = 0x02;
const KIND_APPLIED: u8 = 0;
const KIND_PROGRESS: u8 = 1;
const KIND_DEDUP: u8 = 2;
const KIND_ROUTE: u8 = 3;
const KIND_FENCE: u8 = 4;
const KIND_RESUMED: u8 = 5;

/// How a cluster's changelog records are encoded (see the module docs). The cluster's layout
/// records it as a number; every process of the cluster writes the recorded one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangelogFormat {
    /// Format 1: JSON, self-contained `applied` records.
    Json,
    /// Format 2: binary, `applied` records with the state only.
    Binary,
}

impl ChangelogFormat {
    /// The format a new cluster records.
    pub const NEWEST: ChangelogFormat = ChangelogFormat::Binary;

    /// The format a layout's number names, if this build writes it.
    pub fn from_number(number: u32) -> Option<ChangelogFormat> {
        match number {
            1 => Some(ChangelogFormat::Json),
            2 => Some(ChangelogFormat::Binary),
            _ => None,
        }
    }

    /// The number a layout records.
    pub const fn number(self) -> u32 {
        match self {
            ChangelogFormat::Json => 1,
            ChangelogFormat::Binary => 2,
        }
    }
}

/// The changelog position a partition's store reflects, committed in the same transaction as
/// the state it describes (as Kafka Streams keeps a checkpoint beside its local store).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Offset of the first changelog record the store has not read.
    pub changelog_next: i64,
    /// The current epoch at that position (the newest fence before it; -1 before any).
    pub epoch: i64,
    /// Offset of the first request not yet applied.
    pub resume: i64,
    /// A digest of the id of the fence at offset `epoch` ([`fence_digest`]; 0 before any, and
    /// in checkpoints written before it was kept). Fences have unique keys, so compaction never
    /// removes one: a changelog that no longer holds this fence at that offset is not the
    /// changelog this store read (it was deleted and created again), whatever its length.
    #[serde(default)]
    pub epoch_fence: u64,
}

/// The digest of a fence id kept in a [`Checkpoint`].
pub fn fence_digest(id: &str) -> u64 {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(id.as_bytes());
    u64::from_le_bytes(hash[..8].try_into().expect("a sha256 has 8 bytes"))
}

/// Name of the checkpoint among the store's checkpoints.
pub const CHECKPOINT: &str = "kafka_changelog";

impl Checkpoint {
    /// The position of an empty store.
    pub const START: Checkpoint = Checkpoint {
        changelog_next: 0,
        epoch: -1,
        resume: 0,
        epoch_fence: 0,
    };
}

/// A reader of changelog partition `p` from `offset`, outside any group, registered with the
/// broker watch (paused the moment the broker is lost).
fn restore_reader(
    shared: &Shared,
    p: u32,
    offset: i64,
) -> anyhow::Result<std::sync::Arc<BaseConsumer>> {
    let kafka = &shared.kafka;
    let consumer: BaseConsumer = consumer_config(kafka)
        .set("group.id", format!("{}-restore", kafka.group))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&kafka.changelog_topic, p as i32, Offset::Offset(offset))?;
    consumer.assign(&tpl)?;
    let consumer = std::sync::Arc::new(consumer);
    shared.fetchers.register(&consumer);
    Ok(consumer)
}

/// Refuses a local store whose epoch's fence is not in the changelog at the offset it records.
async fn check_epoch_fence(
    shared: &Shared,
    p: u32,
    start: &Checkpoint,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let kafka = &shared.kafka;
    let refuse = |found: &str| {
        anyhow::anyhow!(
            "changelog partition {p} holds {found} at offset {}, where this process's local store read its owner's fence: the changelog was deleted or replaced since, and the local copy is not this changelog's state; the partition stays stopped (move the data dir's kafka/{} aside to start over from what the broker has)",
            start.epoch,
            kafka.changelog_topic
        )
    };
    let consumer = restore_reader(shared, p, start.epoch)?;
    let (low, high) = consumer
        .fetch_watermarks(&kafka.changelog_topic, p as i32, Duration::from_secs(10))
        .with_context(|| format!("reading the changelog's offsets of partition {p}"))?;
    if start.epoch < low || start.epoch >= high {
        return Err(refuse("no record"));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if stop.load(Ordering::Relaxed) || shared.broker_lost.load(Ordering::Relaxed) {
            anyhow::bail!("partition {p} stopped while checking its changelog");
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "reading changelog partition {p} at offset {}: no record within 30 s",
            start.epoch
        );
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.context("reading the changelog")?;
        if message.offset() != start.epoch {
            // Compaction never removes a fence, so the first record read is the fence or
            // something else at that offset.
            return Err(refuse("another record"));
        }
        return match ChangelogRecord::decode(message.payload().unwrap_or_default()) {
            Ok(ChangelogRecord::Fence { id }) if fence_digest(&id) == start.epoch_fence => Ok(()),
            Ok(ChangelogRecord::Fence { .. }) => Err(refuse("another owner's fence")),
            _ => Err(refuse("a record that is not a fence")),
        };
    }
}

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    /// Where the partition's store now is; `epoch` is this owner's.
    pub checkpoint: Checkpoint,
    /// Where the restore started reading (0 for a store that had nothing).
    pub read_from: i64,
    /// Changelog records applied.
    pub records: u64,
    /// Records that could not be decoded, skipped and logged.
    pub quarantined: u64,
    /// Records of an owner that had been fenced, ignored.
    pub zombie: u64,
}

/// Applies changelog records in order to a partition's store: the zombie filter, the copies
/// held back until their request is known to be complete, the resume offset.
struct Replayer {
    /// The newest fence seen (the current epoch), and the resume offset so far.
    at: Checkpoint,
    /// Copies whose request has not been seen complete yet: one batch's worth, or (format 2)
    /// those held at a fence until the new owner's `resumed` record decides them.
    held: Vec<ChangelogRecord>,
    /// What this owner writes again after its restore: fenced-out writers' records, and
    /// copies its own fence dropped (a later copy may have replaced a valid one under the same
    /// key), noted before the current fence. A `resumed` record clears them: its writer's
    /// restore read up to its fence and repaired what it noted.
    repairs: ZombieWrites,
    /// The same, noted since the current fence: a `resumed` record does not clear these (its
    /// writer only repairs them at its first batch's read-back, which an owner that dies idle
    /// never makes). They join `repairs` at the next fence.
    repairs_since_fence: ZombieWrites,
    records: u64,
    quarantined: u64,
    zombie: u64,
}

/// What a restore has read but not yet decided, kept with its checkpoint in the store so a
/// restore cut short goes on with it (see [`Replayer`]).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Undecided {
    /// [`Replayer::held`].
    held: Vec<ChangelogRecord>,
    /// [`Replayer::repairs`].
    repairs: ZombieWrites,
    /// [`Replayer::repairs_since_fence`].
    #[serde(default)]
    repairs_since_fence: ZombieWrites,
}

/// Name of the [`Undecided`] record among the store's checkpoints.
const UNDECIDED: &str = "kafka_changelog_undecided";

impl Replayer {
    /// A replayer that goes on from what `store` committed.
    fn resume(store: &mut PartitionStore) -> Result<Replayer, StoreError> {
        let at = store.checkpoint(CHECKPOINT)?.unwrap_or(Checkpoint::START);
        let undecided: Undecided = store.checkpoint(UNDECIDED)?.unwrap_or_default();
        Ok(Replayer {
            at,
            held: undecided.held,
            repairs: undecided.repairs,
            repairs_since_fence: undecided.repairs_since_fence,
            records: 0,
            quarantined: 0,
            zombie: 0,
        })
    }

    /// Applies one record. Returns whether it is the fence `own_fence`.
    fn apply(
        &mut self,
        tx: &mut Batch<'_>,
        p: u32,
        offset: i64,
        value: &[u8],
        own_fence: &str,
    ) -> Result<bool, StoreError> {
        self.at.changelog_next = offset + 1;
        let record = match ChangelogRecord::decode(value) {
            Ok(record) => record,
            Err(e) => {
                self.quarantined += 1;
                tracing::error!(
                    partition = p,
                    offset,
                    "quarantined an unreadable changelog record (skipped): {e}"
                );
                return Ok(false);
            }
        };
        if let ChangelogRecord::Fence { id } = &record {
            // A format 1 fence ends the previous owner's unfinished batch: its held copies
            // belong to requests the new owner will consume again. (A copy whose `applied`
            // record compaction removed is lost with them: the gap format 2 closes.) In format
            // 2 the new owner's `resumed` record decides them.
            if value.first() != Some(&BINARY_MARK) {
                self.held.clear();
            }
            let since = std::mem::take(&mut self.repairs_since_fence);
            self.repairs.merge(since);
            self.at.epoch = offset;
            self.at.epoch_fence = fence_digest(id);
            return Ok(*id == own_fence);
        }
        if record.epoch().is_some_and(|e| e < self.at.epoch) {
            self.zombie += 1;
            self.repairs_since_fence.note(&record);
            return Ok(false);
        }
        self.records += 1;
        match record {
            ChangelogRecord::Applied {
                source_offset,
                key,
                state,
                route,
                dedup,
                ..
            } => {
                if let Some(state) = state {
                    tx.put_state(&key, &state)?;
                }
                if let Some((user, route)) = route {
                    tx.record_route(&user, &route)?;
                }
                if let Some((id, entry)) = dedup {
                    tx.put_dedup(&id, &entry)?;
                }
                self.advance(tx, source_offset)?;
            }
            ChangelogRecord::Progress { source_offset, .. } => self.advance(tx, source_offset)?,
            copy @ (ChangelogRecord::Dedup { .. } | ChangelogRecord::Route { .. }) => {
                self.held.push(copy)
            }
            // Older epochs were filtered above, and a newer one than the fence just read
            // cannot be: this is the current owner's.
            ChangelogRecord::Resumed { resume, .. } => {
                // Its writer repaired what it dropped and what it saw fenced-out writers write
                // before its fence.
                self.repairs = ZombieWrites::default();
                self.decide_held(tx, resume, false)?;
            }
            ChangelogRecord::Fence { .. } => unreachable!("handled above"),
        }
        Ok(false)
    }

    /// Applies `records` in one transaction, with the checkpoint and what is still undecided
    /// (see [`restore`]); `last` when they end with this owner's own fence.
    fn apply_chunk(
        &mut self,
        store: &mut PartitionStore,
        p: u32,
        records: &[(i64, Vec<u8>)],
        own_fence: &str,
        last: bool,
    ) -> Result<(), StoreError> {
        store.write_batch(|tx| {
            for (offset, value) in records {
                self.apply(tx, p, *offset, value, own_fence)?;
            }
            if last {
                // This owner resumes at `resume`: its own `resumed` record will say so.
                self.decide_held(tx, self.at.resume, true)?;
            }
            tx.put_checkpoint(CHECKPOINT, &self.at)?;
            tx.put_checkpoint(
                UNDECIDED,
                &Undecided {
                    held: self.held.clone(),
                    repairs: self.repairs.clone(),
                    repairs_since_fence: self.repairs_since_fence.clone(),
                },
            )?;
            Ok(())
        })
    }

    /// The request at `source_offset` is complete: so is every request before it, and the
    /// copies they left can be applied.
    fn advance(&mut self, tx: &mut Batch<'_>, source_offset: i64) -> Result<(), StoreError> {
        // Saturating: a hostile record's offset must not overflow.
        self.at.resume = self.at.resume.max(source_offset.saturating_add(1));
        self.honour_held(tx, self.at.resume)
    }

    /// An owner resumed at `resume`: the held copies of requests before it are complete,
    /// and the others belong to a batch cut short, whose requests are consumed again. With
    /// `repair`, the dropped copies' keys are noted for this owner to write its own values.
    fn decide_held(
        &mut self,
        tx: &mut Batch<'_>,
        resume: i64,
        repair: bool,
    ) -> Result<(), StoreError> {
        self.honour_held(tx, resume)?;
        for dropped in self.held.drain(..) {
            if repair {
                self.repairs.note(&dropped);
            }
        }
        Ok(())
    }

    /// Applies the held copies of requests before `resume`, keeps the others.
    fn honour_held(&mut self, tx: &mut Batch<'_>, resume: i64) -> Result<(), StoreError> {
        let mut kept = Vec::new();
        for copy in self.held.drain(..) {
            match copy {
                ChangelogRecord::Dedup {
                    source_offset,
                    id,
                    entry,
                    ..
                } if source_offset < resume => tx.put_dedup(&id, &entry)?,
                ChangelogRecord::Route {
                    source_offset,
                    user,
                    route,
                    ..
                } if source_offset < resume => {
                    tx.record_route(&user, &route)?;
                }
                other => kept.push(other),
            }
        }
        self.held = kept;
        Ok(())
    }
}

/// Brings partition `p`'s store up to date from the changelog: writes a fence, reads from the
/// store's checkpoint (only the delta when the store already had the partition, everything
/// for a new owner) up to the fence, and commits the state with the new checkpoint. The
/// fence's offset becomes this owner's epoch. There is no deadline (a long changelog takes what
/// it takes); `stop` ends it early with `None`.
pub(super) async fn restore(
    shared: &Shared,
    p: u32,
    store: &mut PartitionStore,
    stop: &AtomicBool,
) -> anyhow::Result<Option<Restored>> {
    let kafka = &shared.kafka;
    let start: Checkpoint = store.checkpoint(CHECKPOINT)?.unwrap_or(Checkpoint::START);
    // Before anything is written: a local store whose epoch's fence is not in the changelog
    // read a changelog that is gone. Checked first, so that a refusal, retried, writes no
    // fences (each one would move the changelog's end towards the stored position, which is
    // how an offsets-only check gave way: attacker finding).
    if start.epoch >= 0 && start.epoch_fence != 0 {
        check_epoch_fence(shared, p, &start, stop).await?;
    }
    let fence_id = format!("{}-{:016x}", shared.node_id, rand::random::<u64>());
    let (key, value) = ChangelogRecord::Fence {
        id: fence_id.clone(),
    }
    .encode(shared.changelog_format);
    let fence = shared.producer.send(
        FutureRecord::to(&kafka.changelog_topic)
            .partition(p as i32)
            .key(&key)
            .payload(&value),
        Duration::from_secs(30),
    );
    let fence_offset = tokio::select! {
        sent = fence => {
            sent.map_err(|(e, _)| anyhow::anyhow!("writing the restore fence of partition {p}: {e}"))?.offset
        }
        () = super::stopped(stop) => return Ok(None),
        () = super::stopped(&shared.broker_lost) => return Ok(None),
    };
    // The local store has read the changelog up to `changelog_next`; a fence written before
    // that position means the changelog went backwards: the broker lost the records this
    // store reflects. Serving from the local copy would diverge from every other process, so
    // the partition refuses to start (the error is logged on each retry).
    if fence_offset < start.changelog_next {
        anyhow::bail!(
            "changelog partition {p} ends at offset {fence_offset}, but this process's local store already read it up to offset {}: the broker lost the changelog's records; the partition stays stopped (move the data dir's kafka/{} aside to start over from what the broker has)",
            start.changelog_next,
            kafka.changelog_topic
        );
    }

    anyhow::ensure!(
        !shared.broker_lost.load(Ordering::Relaxed),
        "partition {p} stopped before reading its changelog: the broker is lost"
    );
    let consumer = restore_reader(shared, p, start.changelog_next)?;
    let mut replayer = Replayer::resume(store)?;
    let mut chunk: Vec<(i64, Vec<u8>)> = Vec::new();
    let mut reached = false;
    while !reached {
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message.context("reading the changelog")?;
            let value = message.payload().unwrap_or_default();
            reached = ChangelogRecord::decode(value)
                .is_ok_and(|r| matches!(r, ChangelogRecord::Fence { id } if id == fence_id));
            chunk.push((message.offset(), value.to_vec()));
        }
        // Applied a chunk at a time; the checkpoint commits with each chunk, with what is
        // still undecided (held copies, repairs to write), so a restore cut short resumes where
        // it stopped.
        if chunk.len() >= 1000 || (reached && !chunk.is_empty()) {
            let records = std::mem::take(&mut chunk);
            replayer.apply_chunk(store, p, &records, &fence_id, reached)?;
        }
    }
    if !write_resumed(shared, p, store, &mut replayer, &fence_id, stop).await? {
        return Ok(None);
    }
    Ok(Some(Restored {
        checkpoint: replayer.at,
        read_from: start.changelog_next,
        records: replayer.records,
        quarantined: replayer.quarantined,
        zombie: replayer.zombie,
    }))
}

/// One consumed request of a batch, as its changelog records need it.
pub(super) struct Consumed<'a> {
    /// Its offset in the requests partition.
    pub source_offset: i64,
    /// The request.
    pub request: &'a RoutedRequest,
    /// Whether the rule's decision was applied (else a `progress` record stands for it: a
    /// dedup answer, a refusal or a rule failure changes nothing).
    pub applied: bool,
    /// The key's state this request made, if it made one (a transition).
    pub new_state: Option<&'a State>,
    /// Whether it moved its user's route.
    pub moved_route: bool,
}

/// After its restore, writes this owner's own values of what the restore noted for repair
/// (fenced-out writers' records, dropped copies), then (format 2) its `resumed` record, one by
/// one in order; and accounts for them in the checkpoint when they directly follow the fence
/// (otherwise the first batch's read-back passes them). `false` when the partition stopped
/// first.
async fn write_resumed(
    shared: &Shared,
    p: u32,
    store: &mut PartitionStore,
    replayer: &mut Replayer,
    fence_id: &str,
    stop: &AtomicBool,
) -> anyhow::Result<bool> {
    let format = shared.changelog_format;
    let at = replayer.at;
    let mut repairs = std::mem::take(&mut replayer.repairs);
    repairs.merge(std::mem::take(&mut replayer.repairs_since_fence));
    repairs.dedup();
    let mut records =
        store.write_batch(|tx| repair_records(tx, at.epoch, format, at.resume, &repairs))?;
    if !repairs.is_empty() {
        tracing::warn!(
            partition = p,
            records = records.len(),
            "writing this owner's values again over records of fenced-out writers or of a batch cut short"
        );
    }
    if format == ChangelogFormat::Json && !repairs.is_empty() {
        // No `resumed` record in format 1: a `progress` record after the repair copies makes
        // them count without a batch (at resume - 1, it moves nobody's resume).
        records.push(
            ChangelogRecord::Progress {
                source_offset: at.resume - 1,
                epoch: at.epoch,
            }
            .encode(format),
        );
    }
    if format == ChangelogFormat::Binary {
        records.push(
            ChangelogRecord::Resumed {
                epoch: at.epoch,
                resume: at.resume,
                fence: fence_id.to_string(),
            }
            .encode(format),
        );
    }
    let mut next = Some(at.changelog_next);
    for (key, value) in &records {
        let sent = shared.producer.send(
            FutureRecord::to(&shared.kafka.changelog_topic)
                .partition(p as i32)
                .key(key)
                .payload(value),
            Duration::from_secs(30),
        );
        let offset = tokio::select! {
            sent = sent => {
                sent.map_err(|(e, _)| anyhow::anyhow!("writing the changelog of partition {p} after its restore: {e}"))?.offset
            }
            () = super::stopped(stop) => return Ok(false),
            () = super::stopped(&shared.broker_lost) => return Ok(false),
        };
        next = next.filter(|&n| n == offset).map(|n| n + 1);
    }
    if let Some(next) = next {
        replayer.at.changelog_next = next;
    }
    let at = replayer.at;
    store.write_batch(|tx| {
        tx.put_checkpoint(CHECKPOINT, &at)?;
        tx.put_checkpoint(UNDECIDED, &Undecided::default())
    })?;
    Ok(true)
}

/// The changelog records of one applied batch in `format`, copies first (see the module docs).
pub(super) fn batch_records<'a>(
    tx: &mut Batch<'_>,
    epoch: i64,
    format: ChangelogFormat,
    requests: impl Iterator<Item = Consumed<'a>>,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let mut copies = Vec::new();
    let mut records = Vec::new();
    // Each `applied` record holds its key's state as of its own request, not as of the end of
    // the batch: a crash can leave a prefix of the batch's records, and a restore must then
    // resume at a request whose effect is not in the state yet. Key → the index in `records` of
    // the key's latest `applied` record so far; format 1's routes likewise, user → route.
    let mut latest: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut latest_route: std::collections::HashMap<&str, Route> = std::collections::HashMap::new();
    for Consumed {
        source_offset,
        request,
        applied,
        new_state,
        moved_route,
    } in requests
    {
        if !applied {
            records.push(ChangelogRecord::Progress {
                source_offset,
                epoch,
            });
            continue;
        }
        // An applied request's id is not applied again in its batch (a repeat is a dedup
        // answer), so the entry under it is this request's own.
        let dedup = match tx.dedup(&request.id)? {
            Some(entry) if request.idempotent => Some((request.id.clone(), entry)),
            _ => None,
        };
        // The route as of this request: the one it recorded, if it moved it.
        let moved = moved_route.then(|| Route {
            key: request.key.clone(),
            recorded_at_ms: request.received_at_ms,
        });
        // Format 1 copies the user's route with every change; format 2 only when it moved
        // (the newest copy of a route is the one compaction keeps either way).
        let route = match (format, moved) {
            (_, Some(moved)) => Some(moved),
            (ChangelogFormat::Binary, None) => None,
            (ChangelogFormat::Json, None) => match latest_route.get(request.user.as_str()) {
                Some(route) => Some(route.clone()),
                None => tx.committed_route(&request.user)?,
            },
        };
        if let Some(route) = &route {
            latest_route.insert(&request.user, route.clone());
        }
        // Every `applied` record holds the key's state, a reject's too: compaction keeps only
        // the newest record of `state/<key>`.
        let state = match (new_state, latest.get(request.key.as_str())) {
            (Some(state), _) => Some(state.clone()),
            (None, Some(&at)) => match &records[at] {
                ChangelogRecord::Applied { state, .. } => state.clone(),
                _ => unreachable!("`latest` indexes applied records"),
            },
            (None, None) => tx.committed_state(&request.key)?,
        };
        latest.insert(&request.key, records.len());
        if let Some((id, entry)) = &dedup {
            copies.push(ChangelogRecord::Dedup {
                source_offset,
                epoch,
                id: id.clone(),
                entry: entry.clone(),
            });
        }
        if let Some(route) = &route {
            copies.push(ChangelogRecord::Route {
                source_offset,
                epoch,
                user: request.user.clone(),
                route: route.clone(),
            });
        }
        let self_contained = format == ChangelogFormat::Json;
        records.push(ChangelogRecord::Applied {
            source_offset,
            epoch,
            state,
            key: request.key.clone(),
            route: route
                .filter(|_| self_contained)
                .map(|r| (request.user.clone(), r)),
            dedup: dedup.filter(|_| self_contained),
        });
    }
    Ok(copies
        .iter()
        .chain(&records)
        .map(|r| r.encode(format))
        .collect())
}

/// Why an owner must stop writing a partition.
#[derive(Debug, thiserror::Error)]
#[error(
    "partition {partition} was taken over by a newer owner (fence at changelog offset {fence}); this process stops writing it"
)]
pub struct Fenced {
    /// The partition.
    pub partition: u32,
    /// Offset of the newer fence.
    pub fence: i64,
}

/// How the owner follows its own changelog partition: before a batch is acknowledged, it checks
/// that no other writer's record (a newer owner's fence, a zombie's write) is among the batch's
/// records or before them, reading the partition back when it cannot tell from the offsets.
pub(super) struct Tail {
    /// The session's shared consumers: a read-back takes this changelog partition's queue out
    /// of the read-back consumer for as long as it reads, and gives it back after.
    consumers: std::sync::Arc<super::consumers::SessionConsumers>,
    /// The changelog topic.
    topic: String,
    /// This owner's epoch (its fence's offset).
    epoch: i64,
    /// The digest of this owner's fence, kept in every checkpoint it writes.
    epoch_fence: u64,
    /// Offset of the next record not yet accounted for: read back, or acknowledged as this
    /// owner's own.
    next: i64,
    /// Read-backs made: writes whose records did not directly follow `next`.
    read_backs: u64,
}

/// What a changelog record's owner's read-back looks at first; the rest is skipped, not built.
#[derive(Debug, PartialEq, Eq)]
struct RecordHead {
    /// Whether it is a fence.
    fence: bool,
    /// The writer's epoch (a fence has none).
    epoch: Option<i64>,
}

impl RecordHead {
    /// The head of a record of either format; `None` when it cannot be read.
    fn of(value: &[u8]) -> Option<RecordHead> {
        /// The JSON fields of the head.
        #[derive(Deserialize)]
        struct JsonHead {
            #[serde(rename = "type")]
            kind: String,
            #[serde(default)]
            epoch: Option<i64>,
        }
        if value.first() != Some(&BINARY_MARK) {
            let head = serde_json::from_slice::<JsonHead>(value).ok()?;
            return Some(RecordHead {
                fence: head.kind == "fence",
                epoch: head.epoch,
            });
        }
        let mut r = Reader::new(value.get(1..)?);
        Some(match r.u8().ok()? {
            KIND_FENCE => RecordHead {
                fence: true,
                epoch: None,
            },
            _ => RecordHead {
                fence: false,
                epoch: Some(r.i64().ok()?),
            },
        })
    }
}

/// Keys a fenced-out writer wrote after this owner's fence (or copies a restore dropped),
/// to be written again by the owner so compaction keeps the owner's values.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct ZombieWrites {
    /// Keys of `applied` records.
    pub keys: Vec<String>,
    /// Ids of `dedup` copies.
    pub ids: Vec<String>,
    /// Users of `route` copies.
    pub users: Vec<String>,
    /// Whether it wrote a `progress` record (which would replace the owner's newest one).
    #[serde(default)]
    pub progress: bool,
}

impl ZombieWrites {
    pub(super) fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.ids.is_empty() && self.users.is_empty() && !self.progress
    }

    /// How many records repairing them writes.
    pub(super) fn len(&self) -> usize {
        self.keys.len() + self.ids.len() + self.users.len() + usize::from(self.progress)
    }

    /// Notes a record a fenced-out writer wrote.
    fn note(&mut self, record: &ChangelogRecord) {
        match record {
            ChangelogRecord::Applied { key, .. } => self.keys.push(key.clone()),
            ChangelogRecord::Dedup { id, .. } => self.ids.push(id.clone()),
            ChangelogRecord::Route { user, .. } => self.users.push(user.clone()),
            ChangelogRecord::Progress { .. } => self.progress = true,
            ChangelogRecord::Fence { .. } | ChangelogRecord::Resumed { .. } => {}
        }
    }

    /// Adds `other`'s keys to these.
    fn merge(&mut self, other: ZombieWrites) {
        self.keys.extend(other.keys);
        self.ids.extend(other.ids);
        self.users.extend(other.users);
        self.progress |= other.progress;
    }

    /// Each key once.
    fn dedup(&mut self) {
        for list in [&mut self.keys, &mut self.ids, &mut self.users] {
            list.sort_unstable();
            list.dedup();
        }
    }
}

impl Tail {
    /// Follows partition `p` of the changelog from this owner's checkpoint. Nothing is fetched
    /// until a batch's records do not directly follow the last one accounted for.
    pub(super) fn new(shared: &Shared, p: u32, at: Checkpoint) -> anyhow::Result<Tail> {
        anyhow::ensure!(
            !shared.broker_lost.load(Ordering::Relaxed),
            "partition {p} stopped before following its changelog: the broker is lost"
        );
        Ok(Tail {
            consumers: shared.session_consumers()?,
            topic: shared.kafka.changelog_topic.clone(),
            epoch: at.epoch,
            epoch_fence: at.epoch_fence,
            next: at.changelog_next,
            read_backs: 0,
        })
    }

    /// This owner's epoch.
    pub(super) fn epoch(&self) -> i64 {
        self.epoch
    }

    /// The digest of this owner's fence (see [`Checkpoint::epoch_fence`]).
    pub(super) fn epoch_fence(&self) -> u64 {
        self.epoch_fence
    }

    /// Offset of the next changelog record not accounted for.
    pub(super) fn next(&self) -> i64 {
        self.next
    }

    /// How many read-backs [`Tail::follow`] made (a batch's repair write counts again if it too
    /// was interleaved with another writer's records).
    pub(super) fn read_backs(&self) -> u64 {
        self.read_backs
    }

    /// Accounts for this owner's own records, just acknowledged by the broker at `offsets` (in
    /// the order produced). Only this partition's owner writes to it, so when they directly
    /// follow the last record accounted for, with no offset between, no other writer (a newer
    /// owner's fence, a zombie's record) can be among them and nothing is fetched. Otherwise
    /// the partition is read back from the first offset not accounted for to the last of them:
    /// fails if a newer fence is there; returns the keys a fenced-out writer wrote, which the
    /// owner must write again.
    pub(super) fn follow(
        &mut self,
        p: u32,
        offsets: &[i64],
        stop: &AtomicBool,
    ) -> Result<Result<ZombieWrites, Fenced>, StoreError> {
        match acknowledged(self.next, offsets) {
            Acknowledged::Nothing => Ok(Ok(ZombieWrites::default())),
            Acknowledged::OwnRun { next } => {
                self.next = next;
                Ok(Ok(ZombieWrites::default()))
            }
            // The log is not the one this owner followed (truncated, replaced): nothing can be
            // checked against it, so nothing is acknowledged and the partition restores.
            Acknowledged::Behind { offset } => Err(StoreError::unavailable(format!(
                "changelog partition {p} acknowledged a record at offset {offset}, before offset {} which was already accounted for",
                self.next
            ))),
            Acknowledged::Gap { last } => {
                self.read_backs += 1;
                self.read_to(p, last, stop)
            }
        }
    }

    /// Reads up to and including `last` (see [`Tail::follow`]).
    fn read_to(
        &mut self,
        p: u32,
        last: i64,
        stop: &AtomicBool,
    ) -> Result<Result<ZombieWrites, Fenced>, StoreError> {
        if stop.load(Ordering::Relaxed) {
            return Err(StoreError::unavailable(format!(
                "partition {p} stopped before reading its changelog back: the broker is lost"
            )));
        }
        // Assigned for this read only: a partition left assigned would be fetched all the time
        // (its records are this owner's own), and every fetch costs the broker a request.
        let reader = self
            .consumers
            .read(
                super::consumers::Source::Changelog,
                &self.topic,
                p,
                self.next,
            )
            .map_err(|e| {
                StoreError::unavailable(format!("reading back changelog partition {p}: {e:#}"))
            })?;
        let mut zombie = ZombieWrites::default();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.next <= last {
            if stop.load(Ordering::Relaxed) {
                return Err(StoreError::unavailable(format!(
                    "partition {p} stopped reading its changelog back: the broker is lost"
                )));
            }
            if std::time::Instant::now() > deadline {
                return Err(StoreError::unavailable(format!(
                    "reading back changelog partition {p} to offset {last}: nothing after offset {} within 30 s",
                    self.next
                )));
            }
            if reader.missed_a_record() {
                return Err(StoreError::unavailable(format!(
                    "a record of changelog partition {p} went to the shared consumer's main queue; restoring to read it"
                )));
            }
            let Some(message) = reader.queue().poll(Duration::from_millis(100)) else {
                continue;
            };
            let message = message.map_err(|e| {
                StoreError::unavailable(format!("reading back changelog partition {p}: {e}"))
            })?;
            if message.offset() < self.next {
                // An outdated fetch of an earlier reader of this partition.
                continue;
            }
            self.next = message.offset() + 1;
            let payload = message.payload().unwrap_or_default();
            // Most records read back are this owner's own, of its epoch: only a fence, or a
            // record of an older epoch (a zombie's), is worth parsing in full (a full parse of
            // every record was a tenth of the process's CPU in the consume benchmark).
            let Some(head) = RecordHead::of(payload) else {
                continue;
            };
            if !head.fence && head.epoch.is_none_or(|epoch| epoch >= self.epoch) {
                continue;
            }
            let Ok(record) = ChangelogRecord::decode(payload) else {
                continue;
            };
            match &record {
                ChangelogRecord::Fence { .. } if message.offset() > self.epoch => {
                    return Ok(Err(Fenced {
                        partition: p,
                        fence: message.offset(),
                    }));
                }
                other if other.epoch().is_some_and(|epoch| epoch < self.epoch) => {
                    zombie.note(other)
                }
                _ => {}
            }
        }
        Ok(Ok(zombie))
    }
}

/// What the offsets of an owner's acknowledged records say about its changelog partition.
#[derive(Debug, PartialEq, Eq)]
enum Acknowledged {
    /// No record was written.
    Nothing,
    /// They directly follow the last record accounted for: nobody else wrote in between.
    /// `next` is the offset after the last of them.
    OwnRun { next: i64 },
    /// Another writer's records may be before or among them: read back up to `last`.
    Gap { last: i64 },
    /// One is at `offset`, already accounted for: not the log the owner followed.
    Behind { offset: i64 },
}

/// Classifies `offsets` (in the order produced) against `next`, the first offset not accounted
/// for.
fn acknowledged(next: i64, offsets: &[i64]) -> Acknowledged {
    let Some(&last) = offsets.last() else {
        return Acknowledged::Nothing;
    };
    if let Some(&offset) = offsets.iter().find(|&&at| at < next) {
        return Acknowledged::Behind { offset };
    }
    if offsets
        .iter()
        .zip(next..)
        .all(|(&at, expected)| at == expected)
    {
        Acknowledged::OwnRun { next: last + 1 }
    } else {
        // The highest, not the last produced: a read-back must pass every record of the write.
        let highest = offsets.iter().copied().max().unwrap_or(last);
        Acknowledged::Gap { last: highest }
    }
}

/// The owner's own values of what a zombie wrote, to be written again so compaction keeps them.
pub(super) fn repair_records(
    tx: &mut Batch<'_>,
    epoch: i64,
    format: ChangelogFormat,
    resume: i64,
    zombie: &ZombieWrites,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    // An offset every owner has passed: the repairs must not move anyone's resume point.
    let source_offset = resume - 1;
    let mut out = Vec::new();
    for id in &zombie.ids {
        if let Some(entry) = tx.dedup(id)? {
            out.push(ChangelogRecord::Dedup {
                source_offset,
                epoch,
                id: id.clone(),
                entry,
            });
        }
    }
    for user in &zombie.users {
        if let Some(route) = tx.route(user)? {
            out.push(ChangelogRecord::Route {
                source_offset,
                epoch,
                user: user.clone(),
                route,
            });
        }
    }
    for key in &zombie.keys {
        out.push(ChangelogRecord::Applied {
            source_offset,
            epoch,
            key: key.clone(),
            state: tx.state(key)?,
            route: None,
            dedup: None,
        });
    }
    if zombie.progress {
        out.push(ChangelogRecord::Progress {
            source_offset,
            epoch,
        });
    }
    Ok(out.iter().map(|r| r.encode(format)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a run that starts at `next` with no offset missing skips the read-back; a record of
    /// someone else before, among or instead of the owner's makes a gap; an offset already
    /// passed (a truncated or replaced log, or -1001 for "no offset") is refused.
    #[test]
    fn acknowledged_offsets_skip_the_read_back_only_for_an_unbroken_own_run() {
        assert_eq!(acknowledged(10, &[]), Acknowledged::Nothing);
        assert_eq!(acknowledged(10, &[10]), Acknowledged::OwnRun { next: 11 });
        assert_eq!(
            acknowledged(10, &[10, 11, 12]),
            Acknowledged::OwnRun { next: 13 }
        );
        // A foreign record at 10, before the owner's.
        assert_eq!(acknowledged(10, &[11, 12]), Acknowledged::Gap { last: 12 });
        // A foreign record at 11, among them.
        assert_eq!(acknowledged(10, &[10, 12]), Acknowledged::Gap { last: 12 });
        assert_eq!(
            acknowledged(10, &[12, 11]),
            Acknowledged::Gap { last: 12 },
            "out of order is not a run, and the read-back passes every record"
        );
        assert_eq!(
            acknowledged(10, &[9, 10]),
            Acknowledged::Behind { offset: 9 }
        );
        assert_eq!(
            acknowledged(10, &[10, -1001]),
            Acknowledged::Behind { offset: -1001 }
        );
    }

    fn state(status: &str, version: u64) -> State {
        State {
            status: status.into(),
            user: "u-1".into(),
            data: r#"{"seats":[1,2],"note":"é \"quoted\""}"#.into(),
            version,
            rule_version: "ab".repeat(32),
            updated_at_ms: 1_764_000_000_000,
        }
    }

    fn dedup_entry(id: &str) -> DedupEntry {
        DedupEntry {
            fingerprint: "cd".repeat(32),
            decision: crate::model::Decision {
                id: id.into(),
                key: "k-1".into(),
                partition: 7,
                seq: 42,
                verdict: crate::model::Verdict::Transition(state("reserved", 1)),
                rule_version: "ab".repeat(32),
            },
        }
    }

    /// One record of every kind, with every optional part present and absent.
    fn every_kind() -> Vec<ChangelogRecord> {
        let route = Route {
            key: "k-1".into(),
            recorded_at_ms: 1_764_000_000_123,
        };
        vec![
            ChangelogRecord::Applied {
                source_offset: 12,
                epoch: 3,
                key: "k-1".into(),
                state: Some(state("reserved", 1)),
                route: Some(("u-1".into(), route.clone())),
                dedup: Some(("id-1".into(), dedup_entry("id-1"))),
            },
            ChangelogRecord::Applied {
                source_offset: 0,
                epoch: -1,
                key: "k-2".into(),
                state: None,
                route: None,
                dedup: None,
            },
            ChangelogRecord::Progress {
                source_offset: i64::MAX,
                epoch: 0,
            },
            ChangelogRecord::Dedup {
                source_offset: 13,
                epoch: 3,
                id: "id-1".into(),
                entry: dedup_entry("id-1"),
            },
            ChangelogRecord::Dedup {
                source_offset: 13,
                epoch: 3,
                id: "id-2".into(),
                // A decision whose id is not the entry's: kept, not taken from the key.
                entry: dedup_entry("another"),
            },
            ChangelogRecord::Route {
                source_offset: 14,
                epoch: 3,
                user: "u-1".into(),
                route,
            },
            ChangelogRecord::Fence {
                id: "turnstile-1-00ff".into(),
            },
            ChangelogRecord::Resumed {
                epoch: 40,
                resume: 12,
                fence: "turnstile-1-00ff".into(),
            },
        ]
    }

    fn json(record: &ChangelogRecord) -> serde_json::Value {
        serde_json::to_value(record).unwrap()
    }

    /// Both formats decode to the record encoded, kind by kind, and carry the same Kafka key.
    #[test]
    fn every_record_decodes_to_itself_in_both_formats() {
        for record in every_kind() {
            for format in [ChangelogFormat::Json, ChangelogFormat::Binary] {
                let (key, value) = record.encode(format);
                assert_eq!(key, record.kafka_key());
                assert_eq!(value[0] == BINARY_MARK, format == ChangelogFormat::Binary);
                let decoded = ChangelogRecord::decode(&value).unwrap();
                assert_eq!(json(&decoded), json(&record), "{format:?}");
            }
            let binary = record.encode(ChangelogFormat::Binary).1.len();
            let text = record.encode(ChangelogFormat::Json).1.len();
            assert!(
                binary < text,
                "{binary} binary bytes, {text} JSON: {record:?}"
            );
        }
    }

    /// A damaged binary record is an error to quarantine, never a panic or another record: cut
    /// at every length, an unknown kind, trailing bytes.
    #[test]
    fn a_damaged_binary_record_is_refused() {
        for record in every_kind() {
            let (_, value) = record.encode(ChangelogFormat::Binary);
            for cut in 1..value.len() {
                assert!(
                    ChangelogRecord::decode(&value[..cut]).is_err(),
                    "{record:?} cut to {cut} bytes"
                );
            }
            let mut longer = value.clone();
            longer.push(0);
            assert!(ChangelogRecord::decode(&longer).is_err());
        }
        assert!(ChangelogRecord::decode(&[BINARY_MARK, 9, 0, 0]).is_err());
        assert!(ChangelogRecord::decode(&[BINARY_MARK]).is_err());
    }

    /// The read-back's first look names every record as the full parse would, in both formats.
    #[test]
    fn a_record_head_names_fences_and_epochs() {
        for record in every_kind() {
            let expected = match &record {
                ChangelogRecord::Fence { .. } => RecordHead {
                    fence: true,
                    epoch: None,
                },
                other => RecordHead {
                    fence: false,
                    epoch: other.epoch(),
                },
            };
            for format in [ChangelogFormat::Json, ChangelogFormat::Binary] {
                let head = RecordHead::of(&record.encode(format).1);
                assert_eq!(head.as_ref(), Some(&expected), "{format:?} {record:?}");
            }
        }
        assert_eq!(RecordHead::of(b"not a record"), None);
        assert_eq!(RecordHead::of(&[BINARY_MARK]), None);
    }

    /// A reserve, an associate and a rejected request of one user and key, applied in a store,
    /// written as a batch's records in each format and replayed into an empty store, give the
    /// same state, route and dedup entries; format 2 writes the route once (only the reserve
    /// moves it) and its `applied` records carry no copies. Each `applied` record holds the
    /// key's state as of its own request (the reject's, the state before it), so a batch cut
    /// anywhere (a crash before all its records were written) leaves whole requests only.
    #[test]
    fn a_batch_replays_to_the_same_store_in_both_formats() {
        use crate::config::Durability;
        use crate::store::Location;
        let request = |id: &str, kind: &str| RoutedRequest {
            id: id.into(),
            idempotent: true,
            kind: kind.into(),
            key: "k-1".into(),
            user: "u-1".into(),
            payload: "null".into(),
            received_at_ms: 5,
        };
        let requests = [
            request("id-1", "reserve"),
            request("id-2", "associate"),
            request("id-3", "reserve"),
        ];
        let states = [Some(state("reserve", 1)), Some(state("associate", 2)), None];
        let mut source = PartitionStore::open(&Location::Memory, 0, Durability::None, 10).unwrap();
        let mut records = |format: ChangelogFormat| {
            source
                .write_batch(|tx| {
                    for (request, new_state) in requests.iter().zip(&states) {
                        if let Some(new_state) = new_state {
                            tx.put_state(&request.key, new_state)?;
                        }
                        if request.id == "id-1" {
                            tx.record_route(
                                &request.user,
                                &Route {
                                    key: request.key.clone(),
                                    recorded_at_ms: 5,
                                },
                            )?;
                        }
                        tx.put_dedup(&request.id, &dedup_entry(&request.id))?;
                    }
                    let consumed = (10..).zip(requests.iter().zip(&states)).map(
                        |(offset, (request, new_state))| Consumed {
                            source_offset: offset,
                            request,
                            applied: true,
                            new_state: new_state.as_ref(),
                            moved_route: offset == 10,
                        },
                    );
                    batch_records(tx, 3, format, consumed)
                })
                .unwrap()
        };
        let json_records = records(ChangelogFormat::Json);
        let binary_records = records(ChangelogFormat::Binary);
        let keys = |records: &[(String, Vec<u8>)]| -> Vec<String> {
            records.iter().map(|(key, _)| key.clone()).collect()
        };
        assert_eq!(
            keys(&json_records),
            [
                "dedup/id-1",
                "route/u-1",
                "dedup/id-2",
                "route/u-1",
                "dedup/id-3",
                "route/u-1",
                "state/k-1",
                "state/k-1",
                "state/k-1"
            ]
        );
        assert_eq!(
            keys(&binary_records),
            [
                "dedup/id-1",
                "route/u-1",
                "dedup/id-2",
                "dedup/id-3",
                "state/k-1",
                "state/k-1",
                "state/k-1"
            ]
        );
        let total =
            |records: &[(String, Vec<u8>)]| records.iter().map(|r| r.1.len()).sum::<usize>();
        assert!(total(&binary_records) * 2 < total(&json_records));

        let replay = |records: &[(String, Vec<u8>)]| {
            let mut store =
                PartitionStore::open(&Location::Memory, 0, Durability::None, 10).unwrap();
            let mut replayer = empty_replayer(Checkpoint::START);
            store
                .write_batch(|tx| {
                    for (offset, (_, value)) in (100..).zip(records) {
                        replayer.apply(tx, 0, offset, value, "none")?;
                    }
                    let found = (
                        tx.state("k-1")?.map(|s| s.version),
                        tx.route("u-1")?.map(|r| r.key),
                        ["id-1", "id-2", "id-3"]
                            .into_iter()
                            .filter(|id| tx.dedup(id).is_ok_and(|e| e.is_some()))
                            .count(),
                        replayer.at.resume,
                    );
                    Ok(found)
                })
                .unwrap()
        };
        let k1 = Some("k-1".to_string());
        for (format, records) in [("json", &json_records), ("binary", &binary_records)] {
            let copies = records.len() - 3;
            assert_eq!(replay(records), (Some(2), k1.clone(), 3, 13), "{format}");
            // Cut after the copies, then after each applied record.
            assert_eq!(replay(&records[..copies]), (None, None, 0, 0), "{format}");
            assert_eq!(
                replay(&records[..copies + 1]),
                (Some(1), k1.clone(), 1, 11),
                "{format}: the reserve whole, nothing of the others"
            );
            assert_eq!(
                replay(&records[..copies + 2]),
                (Some(2), k1.clone(), 2, 12),
                "{format}: the associate whole, nothing of the reject"
            );
        }
    }

    fn empty_replayer(at: Checkpoint) -> Replayer {
        Replayer {
            at,
            held: Vec::new(),
            repairs: ZombieWrites::default(),
            repairs_since_fence: ZombieWrites::default(),
            records: 0,
            quarantined: 0,
            zombie: 0,
        }
    }

    fn memory_store() -> PartitionStore {
        PartitionStore::open(
            &crate::store::Location::Memory,
            0,
            crate::config::Durability::None,
            10,
        )
        .unwrap()
    }

    /// What a store holds for the tests' user `u-1` and key `k-1`: the state's version, the
    /// route's key, which of `id-1`, `id-2`, `id-x` have dedup entries, and the checkpoint's
    /// resume and changelog position (`None` when none was committed).
    type Found = (
        Option<u64>,
        Option<String>,
        Vec<&'static str>,
        Option<(i64, i64)>,
    );

    fn found(store: &mut PartitionStore) -> Found {
        let at = store
            .checkpoint::<Checkpoint>(CHECKPOINT)
            .unwrap()
            .map(|c| (c.resume, c.changelog_next));
        store
            .write_batch(|tx| {
                Ok((
                    tx.state("k-1")?.map(|s| s.version),
                    tx.route("u-1")?.map(|r| r.key),
                    ["id-1", "id-2", "id-x"]
                        .into_iter()
                        .filter(|id| tx.dedup(id).is_ok_and(|e| e.is_some()))
                        .collect(),
                    at,
                ))
            })
            .unwrap()
    }

    /// Replays `records` (at their offsets, encoded in `format`) in one chunk into an empty
    /// store.
    fn replayed(format: ChangelogFormat, records: &[(i64, ChangelogRecord)]) -> Found {
        let encoded: Vec<(i64, Vec<u8>)> = records
            .iter()
            .map(|(offset, r)| (*offset, r.encode(format).1))
            .collect();
        let mut store = memory_store();
        empty_replayer(Checkpoint::START)
            .apply_chunk(&mut store, 0, &encoded, "none", false)
            .unwrap();
        found(&mut store)
    }

    fn dedup_copy(source_offset: i64, epoch: i64, id: &str) -> ChangelogRecord {
        ChangelogRecord::Dedup {
            source_offset,
            epoch,
            id: id.into(),
            entry: dedup_entry(id),
        }
    }

    fn route_copy(source_offset: i64, epoch: i64, key: &str) -> ChangelogRecord {
        ChangelogRecord::Route {
            source_offset,
            epoch,
            user: "u-1".into(),
            route: Route {
                key: key.into(),
                recorded_at_ms: 5,
            },
        }
    }

    fn applied(source_offset: i64, epoch: i64, version: u64) -> ChangelogRecord {
        ChangelogRecord::Applied {
            source_offset,
            epoch,
            key: "k-1".into(),
            state: Some(state("s", version)),
            route: None,
            dedup: None,
        }
    }

    fn fence(id: &str) -> ChangelogRecord {
        ChangelogRecord::Fence { id: id.into() }
    }

    /// Compaction removes an `applied` record once a later request writes its key; the copies
    /// that record made count must survive a fence written after it. In format 2 the new
    /// owner's `resumed` record decides them: a copy of a request before its resume point is
    /// honoured, one of a batch cut short (its request consumed again) is dropped. Format 1
    /// has no such record and drops every copy held at a fence: the gap it keeps.
    #[test]
    fn copies_held_at_a_fence_are_decided_by_the_new_owners_resume_point() {
        let resumed = |resume| ChangelogRecord::Resumed {
            epoch: 4,
            resume,
            fence: "b".into(),
        };
        // @3, the reserve's `applied` record, was compacted away by @7's.
        let compacted = [
            (0, fence("a")),
            (1, dedup_copy(10, 0, "id-1")),
            (2, route_copy(10, 0, "k-1")),
            (4, fence("b")),
            (5, resumed(11)),
            (6, dedup_copy(11, 4, "id-2")),
            (7, applied(11, 4, 2)),
        ];
        assert_eq!(
            replayed(ChangelogFormat::Binary, &compacted),
            (
                Some(2),
                Some("k-1".into()),
                vec!["id-1", "id-2"],
                Some((12, 8))
            )
        );
        assert_eq!(
            replayed(ChangelogFormat::Json, &compacted).1,
            None,
            "format 1 drops the copies held at the fence"
        );
        // A batch cut short after its copies: the new owner consumes request 10 again.
        let cut = [
            (0, fence("a")),
            (1, dedup_copy(10, 0, "id-1")),
            (2, route_copy(10, 0, "k-1")),
            (4, fence("b")),
            (5, resumed(10)),
        ];
        assert_eq!(
            replayed(ChangelogFormat::Binary, &cut),
            (None, None, vec![], Some((0, 6)))
        );
    }

    /// A restore applies the changelog a chunk at a time, committing its checkpoint with each;
    /// a chunk that ends between a batch's copies and its `applied` records commits the held
    /// copies with it, so a restore cut there and started again from the checkpoint still
    /// honours them.
    #[test]
    fn a_restore_cut_between_copies_and_their_applied_record_keeps_the_copies() {
        let records: Vec<(i64, Vec<u8>)> = [
            (0, fence("a")),
            (1, dedup_copy(10, 0, "id-1")),
            (2, route_copy(10, 0, "k-1")),
            (3, applied(10, 0, 1)),
            (4, fence("own")),
        ]
        .iter()
        .map(|(offset, r)| (*offset, r.encode(ChangelogFormat::Binary).1))
        .collect();
        let mut store = memory_store();
        empty_replayer(Checkpoint::START)
            .apply_chunk(&mut store, 0, &records[..2], "own", false)
            .unwrap();
        assert_eq!(found(&mut store).3, Some((0, 2)));
        // The restore stops here; the next one goes on from what the store committed.
        let mut replayer = Replayer::resume(&mut store).unwrap();
        assert_eq!(replayer.held.len(), 1, "the held copy was committed");
        replayer
            .apply_chunk(&mut store, 0, &records[2..], "own", true)
            .unwrap();
        assert_eq!(
            found(&mut store),
            (Some(1), Some("k-1".into()), vec!["id-1"], Some((11, 5)))
        );
    }

    /// Records of a fenced-out writer met during a restore, and copies the restorer's own
    /// fence dropped, are noted for the new owner to write its own values again (a later
    /// copy under the same key would otherwise hide the owner's value once compacted). A
    /// `resumed` record clears what was noted before its writer's fence, which that writer
    /// repaired, but not what came after its fence.
    #[test]
    fn a_restore_notes_what_its_owner_must_write_again() {
        let records: Vec<(i64, Vec<u8>)> = [
            (0, fence("z")),
            (1, fence("a")),
            // Before b's fence: b's restore noted it and b repaired it.
            (2, dedup_copy(7, 0, "id-repaired")),
            (3, dedup_copy(9, 1, "id-1")),
            (4, fence("b")),
            // After b's fence, before its `resumed` record: b never repaired it.
            (5, dedup_copy(11, 1, "id-z")),
            (
                6,
                ChangelogRecord::Resumed {
                    epoch: 4,
                    resume: 10,
                    fence: "b".into(),
                },
            ),
            (7, applied(10, 1, 1)),
            (
                8,
                ChangelogRecord::Progress {
                    source_offset: 11,
                    epoch: 1,
                },
            ),
            // Of b's batch cut short: dropped at the restorer's own fence.
            (9, route_copy(12, 4, "k-2")),
            (10, fence("own")),
        ]
        .iter()
        .map(|(offset, r)| (*offset, r.encode(ChangelogFormat::Binary).1))
        .collect();
        let mut store = memory_store();
        let mut replayer = empty_replayer(Checkpoint::START);
        replayer
            .apply_chunk(&mut store, 0, &records, "own", true)
            .unwrap();
        let mut repairs = replayer.repairs.clone();
        repairs.merge(replayer.repairs_since_fence.clone());
        repairs.dedup();
        assert_eq!(
            (repairs.keys, repairs.ids, repairs.users, repairs.progress),
            (
                vec!["k-1".to_string()],
                vec!["id-z".to_string()],
                vec!["u-1".to_string()],
                true
            ),
        );
        assert_eq!(replayer.zombie, 4);
        assert_eq!(
            found(&mut store).2,
            vec!["id-1"],
            "honoured by b's resumed record"
        );
    }

    /// A rule failure changes nothing, so it leaves a `progress` record, and the dedup copy of
    /// a later request with the same id is that request's own; in format 1 each request's
    /// `applied` record and route copy hold the route as of that request, not the batch's
    /// last. Cut before the last request's `applied` record, neither survives.
    #[test]
    fn a_cut_batch_leaves_no_later_requests_dedup_entry_or_route() {
        let request = |id: &str, key: &str| RoutedRequest {
            id: id.into(),
            idempotent: true,
            kind: "reserve".into(),
            key: key.into(),
            user: "u-1".into(),
            payload: "null".into(),
            received_at_ms: 5,
        };
        let requests = [
            request("id-x", "k-1"),
            request("id-x", "k-1"),
            request("id-2", "k-2"),
        ];
        let v1 = state("s", 1);
        let mut source = memory_store();
        let mut records = |format: ChangelogFormat| {
            source
                .write_batch(|tx| {
                    tx.put_state("k-1", &v1)?;
                    tx.put_state("k-2", &v1)?;
                    for request in &requests[1..] {
                        tx.record_route(
                            "u-1",
                            &Route {
                                key: request.key.clone(),
                                recorded_at_ms: 5,
                            },
                        )?;
                        tx.put_dedup(&request.id, &dedup_entry(&request.id))?;
                    }
                    let consumed = (10..).zip(&requests).map(|(offset, request)| Consumed {
                        source_offset: offset,
                        request,
                        applied: offset > 10,
                        new_state: (offset > 10).then_some(&v1),
                        moved_route: offset > 10,
                    });
                    batch_records(tx, 3, format, consumed)
                })
                .unwrap()
        };
        for format in [ChangelogFormat::Json, ChangelogFormat::Binary] {
            let records = records(format);
            let keys: Vec<&str> = records.iter().map(|(k, _)| k.as_str()).collect();
            assert!(keys.contains(&"progress"), "{format:?}: {keys:?}");
            // The batch's copies, then its first `done` records of three.
            let copies = records.len() - 3;
            let replay_cut = |done: usize| {
                let cut: Vec<(i64, Vec<u8>)> = (100..)
                    .zip(&records[..copies + done])
                    .map(|(offset, (_, value))| (offset, value.clone()))
                    .collect();
                let mut store = memory_store();
                let mut replayer = empty_replayer(Checkpoint::START);
                replayer
                    .apply_chunk(&mut store, 0, &cut, "none", false)
                    .unwrap();
                let (version, route, ids, _) = found(&mut store);
                (version, route, ids, replayer.at.resume)
            };
            assert_eq!(
                replay_cut(1),
                (None, None, vec![], 11),
                "{format:?}: the failed request only"
            );
            assert_eq!(
                replay_cut(2),
                (Some(1), Some("k-1".into()), vec!["id-x"], 12),
                "{format:?}: not the route or dedup entry of request 12"
            );
        }
    }
}
