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
//!
//! A batch writes its copies first, then one `applied` or `progress` record per consumed
//! request, in order. The `applied` record is self-contained (state + route + dedup of one
//! request), so a crash in the middle of a batch leaves whole requests: a copy is honoured only
//! once an `applied`/`progress` record at or after its request's offset has been read.
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

use crate::model::State;
use crate::router::Route;
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
        /// The key's state after the request (none if it still has none).
        state: Option<State>,
        /// The route the request recorded, with its user.
        route: Option<(String, Route)>,
        /// The dedup entry it left.
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
        }
    }

    fn epoch(&self) -> Option<i64> {
        match self {
            ChangelogRecord::Applied { epoch, .. }
            | ChangelogRecord::Progress { epoch, .. }
            | ChangelogRecord::Dedup { epoch, .. }
            | ChangelogRecord::Route { epoch, .. } => Some(*epoch),
            ChangelogRecord::Fence { .. } => None,
        }
    }

    fn encode(&self) -> (String, Vec<u8>) {
        (
            self.kafka_key(),
            serde_json::to_vec(self).expect("changelog records serialize"),
        )
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

/// Name of the checkpoint in the store's `meta` table.
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
        return match serde_json::from_slice::<ChangelogRecord>(
            message.payload().unwrap_or_default(),
        ) {
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
    /// Copies whose request has not been seen complete yet (at most one batch's worth).
    held: Vec<ChangelogRecord>,
    records: u64,
    quarantined: u64,
    zombie: u64,
}

impl Replayer {
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
        let record: ChangelogRecord = match serde_json::from_slice(value) {
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
            // The previous owner's unfinished batch ends here: its held copies belong to
            // requests the new owner will consume again.
            self.held.clear();
            self.at.epoch = offset;
            self.at.epoch_fence = fence_digest(id);
            return Ok(*id == own_fence);
        }
        if record.epoch().is_some_and(|e| e < self.at.epoch) {
            self.zombie += 1;
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
            ChangelogRecord::Fence { .. } => unreachable!("handled above"),
        }
        Ok(false)
    }

    /// The request at `source_offset` is complete: so is every request before it, and the
    /// copies they left can be applied.
    fn advance(&mut self, tx: &mut Batch<'_>, source_offset: i64) -> Result<(), StoreError> {
        self.at.resume = self.at.resume.max(source_offset + 1);
        let resume = self.at.resume;
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
    .encode();
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
    let mut replayer = Replayer {
        at: start,
        held: Vec::new(),
        records: 0,
        quarantined: 0,
        zombie: 0,
    };
    let mut chunk: Vec<(i64, Vec<u8>)> = Vec::new();
    let mut reached = false;
    while !reached {
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message.context("reading the changelog")?;
            let value = message.payload().unwrap_or_default();
            reached = serde_json::from_slice::<ChangelogRecord>(value)
                .is_ok_and(|r| matches!(r, ChangelogRecord::Fence { id } if id == fence_id));
            chunk.push((message.offset(), value.to_vec()));
        }
        // Applied a chunk at a time; the checkpoint commits with each chunk, so a restore cut
        // short resumes where it stopped.
        if chunk.len() >= 1000 || (reached && !chunk.is_empty()) {
            let records = std::mem::take(&mut chunk);
            store.write_batch(|tx| {
                for (offset, value) in &records {
                    replayer.apply(tx, p, *offset, value, &fence_id)?;
                }
                tx.put_checkpoint(CHECKPOINT, &replayer.at)
            })?;
        }
    }
    Ok(Some(Restored {
        checkpoint: replayer.at,
        read_from: start.changelog_next,
        records: replayer.records,
        quarantined: replayer.quarantined,
        zombie: replayer.zombie,
    }))
}

/// The changelog records of one applied batch, copies first (see the module docs).
pub(super) fn batch_records(
    tx: &mut Batch<'_>,
    epoch: i64,
    requests: impl Iterator<Item = (i64, crate::model::RoutedRequest, bool)>,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let mut copies = Vec::new();
    let mut records = Vec::new();
    for (source_offset, request, changed) in requests {
        let record = if changed {
            let dedup = match tx.dedup(&request.id)? {
                Some(entry) if request.idempotent => Some((request.id.clone(), entry)),
                _ => None,
            };
            let route = tx.route(&request.user)?;
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
            ChangelogRecord::Applied {
                source_offset,
                epoch,
                state: tx.state(&request.key)?,
                key: request.key,
                route: route.map(|r| (request.user, r)),
                dedup,
            }
        } else {
            ChangelogRecord::Progress {
                source_offset,
                epoch,
            }
        };
        records.push(record);
    }
    Ok(copies.iter().chain(&records).map(|r| r.encode()).collect())
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

/// The fields of a changelog record its owner's read-back looks at first; the others are
/// skipped, not built.
#[derive(Deserialize)]
struct RecordHead {
    /// The record's `type` (the [`ChangelogRecord`] variant, snake_case).
    #[serde(rename = "type")]
    kind: String,
    /// The writer's epoch (a fence has none).
    #[serde(default)]
    epoch: Option<i64>,
}

/// Keys a fenced-out writer wrote after this owner's fence, to be written again by the owner.
#[derive(Debug, Default)]
pub(super) struct ZombieWrites {
    /// Keys of `applied` records.
    pub keys: Vec<String>,
    /// Ids of `dedup` copies.
    pub ids: Vec<String>,
    /// Users of `route` copies.
    pub users: Vec<String>,
}

impl ZombieWrites {
    pub(super) fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.ids.is_empty() && self.users.is_empty()
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
            let Ok(head) = serde_json::from_slice::<RecordHead>(payload) else {
                continue;
            };
            if head.kind != "fence" && head.epoch.is_none_or(|epoch| epoch >= self.epoch) {
                continue;
            }
            let Ok(record) = serde_json::from_slice::<ChangelogRecord>(payload) else {
                continue;
            };
            match record {
                ChangelogRecord::Fence { .. } if message.offset() > self.epoch => {
                    return Ok(Err(Fenced {
                        partition: p,
                        fence: message.offset(),
                    }));
                }
                ChangelogRecord::Applied { epoch, key, .. } if epoch < self.epoch => {
                    zombie.keys.push(key)
                }
                ChangelogRecord::Dedup { epoch, id, .. } if epoch < self.epoch => {
                    zombie.ids.push(id)
                }
                ChangelogRecord::Route { epoch, user, .. } if epoch < self.epoch => {
                    zombie.users.push(user)
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
    Ok(out.iter().map(ChangelogRecord::encode).collect())
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

    /// The read-back's first look names every record as the full parse would.
    #[test]
    fn a_record_head_names_the_type_and_epoch() {
        let head = |record: &ChangelogRecord| {
            serde_json::from_slice::<RecordHead>(&record.encode().1).expect("a head")
        };
        let fence = head(&ChangelogRecord::Fence { id: "f".into() });
        assert_eq!((fence.kind.as_str(), fence.epoch), ("fence", None));
        let progress = head(&ChangelogRecord::Progress {
            source_offset: 9,
            epoch: 4,
        });
        assert_eq!(
            (progress.kind.as_str(), progress.epoch),
            ("progress", Some(4))
        );
        let route = head(&ChangelogRecord::Route {
            source_offset: 1,
            epoch: 2,
            user: "u".into(),
            route: Route {
                key: "k".into(),
                recorded_at_ms: 0,
            },
        });
        assert_eq!((route.kind.as_str(), route.epoch), ("route", Some(2)));
    }
}
