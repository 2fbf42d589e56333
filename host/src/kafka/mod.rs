//! Kafka mode: several `turnstile run` processes share the partitions of a Kafka-protocol log,
//! the patent's own setting (N = servers × containers partitions, each consumed by one thread).
//!
//! # Topics
//!
//! | topic       | partitions | key         | value                                              |
//! |-------------|-----------:|-------------|----------------------------------------------------|
//! | requests    | N          | routing key | a routed request (any producer may write it)        |
//! | changelog   | N, compacted | see `changelog.rs` | per request its effect and offset; copies; fences |
//! | outcomes    | any        | request id  | the decision (or the error) for one request        |
//! | routes      | N, compacted | user      | the user's route, position markers; owner records on 0 |
//!
//! # How a request flows
//!
//! Any process's HTTP front end accepts a request, records the user's route (in its own cache and
//! on the routes topic, before routing: claim 5) or resolves it (claim 3, after a position marker
//! proves the routes read so far are complete; a routes partition is read only once a lookup
//! needs it, see [`RoutesReading`]), gives it an id, and produces it to the requests
//! partition that Turnstile's partitioner picks, so a producer that is not Turnstile can feed the
//! topic with the same partitioner. It then waits for the outcome on the outcomes topic: on the
//! one partition of it this process reads, which the request names in its `reply_partition`
//! header (see [`REPLY_PARTITION_HEADER`]), so an outcome is read by the process waiting for it
//! only.
//!
//! Every process joins one consumer group on the requests topic. The group consumer only serves
//! membership: the partitions it is given are paused on it, and each one gets its own dedicated
//! thread (1:1, the only writer) running the partition engine (`partition::Engine`)
//! with this module's transport: its own consumer positioned where the partition's state says it
//! stopped, the changelog as the commit step, the outcomes topic for answers. On revocation the
//! thread finishes its batch and stops.
//!
//! # Delivery guarantee
//!
//! *State transitions are exactly once; answers are at least once.* A batch is applied to the
//! partition's store inside one transaction; its changelog records (each request's effect with
//! its offset) are produced and checked (read back when another writer's records are between
//! them, see `changelog.rs`), and only if no newer owner fenced this one does the
//! transaction commit (with the changelog position) and the outcomes go out. A process that gains
//! a partition restores it from the changelog up to a fence of its own (see `changelog.rs`), so a
//! request is applied once whatever crashes, rebalances or zombies happen; a crash between the
//! changelog and the outcome loses only the answer, and a retry with the same id gets it from the
//! dedup entry.
//!
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::config::{Config, KafkaConfig};
use crate::install::{PartitionThreads, RuleControl};
use crate::model::{Decision, Request, RoutedRequest, State, Verdict, now_ms};
use crate::partition::{
    Applied, ApplyError, Command, Decider, Engine, Inbox, Incoming, PartitionStats, RecordSource,
    Transport,
};
use crate::router::{Partitioner, Route, RouteCache};
use crate::runtime::{RequestIds, SubmitError, validate};
use crate::sandbox::{FailureKind, RuleFailure, RuleLimits, Sandbox};
use crate::store::{DeadLetter, Location, PartitionStore, StoreError};

mod changelog;
mod consumers;
pub mod inspect;
pub mod layout;
pub mod watch;

use changelog::{CHECKPOINT, Tail};
pub use changelog::{ChangelogRecord, Checkpoint};

/// A record of the requests topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestRecord {
    /// The request as routed.
    pub request: RoutedRequest,
    /// Its dedup fingerprint, as the front end computed it (optional, and ignored by the
    /// consumer, which computes its own).
    #[serde(default)]
    pub fingerprint: String,
}

/// The record header that names the partition of the outcomes topic a request's outcome goes
/// to (decimal text). A Turnstile front end names the one partition its outcomes reader reads,
/// so a process reads only the outcomes of its own requests, not every process's. Without it,
/// or when it names no partition of the topic, the outcome goes to the outcomes partition with
/// the number of the requests partition the record was read from (modulo the outcomes topic's
/// partition count). A header, not a field of the record: it is transport, not part of the
/// request, and a process from before it still reads the record (it refuses unknown fields);
/// but such a process answers by key, where the waiting front end does not read, so a cluster
/// is upgraded past this header with every older process stopped (README, "Running a cluster").
pub const REPLY_PARTITION_HEADER: &str = "reply_partition";

/// The outcomes partition a record's [`REPLY_PARTITION_HEADER`] names, if it names one.
fn reply_partition_of(message: &rdkafka::message::BorrowedMessage<'_>) -> Option<u32> {
    use rdkafka::message::Headers;
    message
        .headers()?
        .iter()
        .filter(|h| h.key == REPLY_PARTITION_HEADER)
        .last()?
        .value
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Version of the outcome record's format, in every outcome (README, "Outcome records").
pub const OUTCOME_SCHEMA: u32 = 1;

/// A record of the outcomes topic (keyed by request id).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutcomeRecord {
    /// [`OUTCOME_SCHEMA`] of the process that wrote it.
    pub schema: u32,
    /// The request id.
    pub id: String,
    /// The dedup fingerprint of the request record this answers (a digest of its kind, key,
    /// user and payload), so that two requests sent under one id, one applied and one an
    /// `id_conflict`, each get their own outcome; absent for a record too damaged to read.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fingerprint: String,
    /// The decision, or the error code and message.
    pub result: Result<Decision, RemoteError>,
}

/// An error carried on the outcomes topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteError {
    /// The API error code.
    pub code: String,
    /// The message.
    pub message: String,
    /// For `rule_quarantined`: how long until the key is let through again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl From<&ApplyError> for RemoteError {
    fn from(e: &ApplyError) -> Self {
        RemoteError {
            code: e.code().to_string(),
            message: e.to_string(),
            retry_after_ms: match e {
                ApplyError::Quarantined { retry_after_ms, .. } => Some(*retry_after_ms),
                _ => None,
            },
        }
    }
}

impl RemoteError {
    fn into_submit_error(self, id: &str) -> SubmitError {
        if let Some(kind) = FailureKind::from_code(&self.code) {
            return SubmitError::Rule(RuleFailure::new(kind, self.message));
        }
        match self.code.as_str() {
            "id_conflict" => SubmitError::IdConflict(id.to_string()),
            "invalid_request" => SubmitError::Invalid(self.message),
            "record_damaged" => SubmitError::RecordDamaged(self.message),
            "store_damaged" => SubmitError::Damaged(self.message),
            "rule_quarantined" => SubmitError::Quarantined {
                message: self.message,
                retry_after_ms: self.retry_after_ms.unwrap_or(1000),
            },
            _ => SubmitError::Store(self.message),
        }
    }
}

/// What `GET /v1/partitions` shows of a partition this process owns.
#[derive(Debug, Clone, Serialize)]
pub struct OwnedPartitionInfo {
    /// Partition index.
    pub id: u32,
    /// Name of its thread.
    pub thread: String,
    /// Whether its state is restored and it is consuming.
    pub restored: bool,
    /// How long the restore took, in milliseconds.
    pub restore_ms: u64,
    /// Changelog records the restore read.
    pub restored_records: u64,
    /// Requests applied since this process got the partition.
    pub processed: u64,
    /// Offset of the next request to consume.
    pub next_offset: i64,
    /// Requests in the partition not consumed yet (from the broker's high watermark, which
    /// some brokers report late; -1 when unknown).
    pub lag: i64,
    /// Consumed records refused (malformed, or on the wrong partition) and dead-lettered.
    pub refused: u64,
    /// Changelog records restores could not decode, skipped and logged.
    pub quarantined: u64,
    /// Changelog records of fenced-out owners (zombies) ignored or overwritten.
    pub zombie: u64,
    /// Changelog offset the last restore started at: 0 for a full restore, more when the data
    /// dir already held the partition and only the delta was read.
    pub restored_from: i64,
    /// Times since the last restore that the owner read its changelog partition back, because
    /// the records it wrote did not directly follow its previous ones (another writer's records
    /// between: a newer owner's fence, a zombie's writes); 0 while it is the only writer.
    pub changelog_read_backs: u64,
    /// Rule failures by error code.
    pub rule_failures: std::collections::BTreeMap<&'static str, u64>,
    /// The failure budget: keys quarantined now, breakers opened, requests refused.
    pub breaker: crate::breaker::BreakerView,
    /// Version id of the rule it runs.
    pub rule_version: String,
    /// Why the partition last failed to restore or serve (it retries with backoff); `None`
    /// once it serves again.
    pub failure: Option<String>,
}

/// Counters a Kafka partition thread publishes.
#[derive(Debug, Default)]
struct OwnedStats {
    /// Whether the restore finished and the partition is consuming.
    restored: AtomicBool,
    /// How long the last restore took.
    restore_ms: AtomicU64,
    /// Changelog records the last restore applied.
    restored_records: AtomicU64,
    /// Changelog records restores could not decode and skipped.
    quarantined: AtomicU64,
    /// Changelog records of fenced-out owners (zombies) ignored or overwritten.
    zombie: AtomicU64,
    /// Changelog offset the last restore started reading at (0: the whole changelog).
    restored_from: AtomicI64,
    /// Offset of the next request to consume.
    next_offset: AtomicI64,
    /// The requests partition's high watermark when last read (-1 when unknown).
    high_watermark: AtomicI64,
    /// Read-backs of the changelog partition since the last restore (see
    /// [`OwnedPartitionInfo::changelog_read_backs`]).
    read_backs: AtomicU64,
    /// The engine's counters, the same as local mode's.
    partition: Arc<PartitionStats>,
    /// Why the partition last failed (see [`OwnedPartitionInfo::failure`]).
    failure: Mutex<Option<String>>,
}

/// A partition this process owns: its thread and how to stop it.
struct Owned {
    /// Tells the thread to finish its batch and stop.
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
    stats: Arc<OwnedStats>,
    /// Reads, dead letters and swaps for the thread, the same messages local mode queues.
    control: crossbeam_channel::Sender<Command>,
}

/// Why a key's state could not be read in Kafka mode.
#[derive(Debug, thiserror::Error)]
pub enum KeyReadError {
    /// Another process owns the key's partition and serves it.
    #[error("partition {partition} is owned by another process")]
    NotOwned {
        /// The partition.
        partition: u32,
        /// Its owner, as announced.
        owner: Option<OwnerRecord>,
    },
    /// The partition is between owners: revoked and not yet restored by the next (or restoring
    /// here). Retry shortly.
    #[error("partition {partition} is moving between processes")]
    Moving {
        /// The partition.
        partition: u32,
        /// The process restoring it, when known.
        owner: Option<OwnerRecord>,
    },
    /// The partition's store failed.
    #[error("{0}")]
    Store(crate::store::StoreError),
    /// The partition's control queue is full.
    #[error("partition {0} is at capacity; retry shortly")]
    Busy(u32),
    /// The broker is away or lost the cluster's data (see [`watch`]).
    #[error("{0}")]
    Cluster(SubmitError),
}

/// What the group's rebalance callbacks and the partition threads share.
struct Shared {
    config: Config,
    kafka: KafkaConfig,
    /// The id of the cluster this process joined (its layout record's): with a data dir, each
    /// partition's local copy lives under it, so a copy of a cluster the broker lost is never
    /// taken for this one's (see [`local_store_dir`]).
    cluster_id: String,
    /// The format the cluster's layout records: every record this process writes to the
    /// changelog is in it (it reads both formats).
    changelog_format: changelog::ChangelogFormat,
    sandbox: Arc<Sandbox>,
    /// The rule version each partition runs in this process; a thread that takes a partition
    /// starts with its entry, and an install changes it for owned and future partitions alike.
    rules: RuleControl,
    /// Checks that consumed records are on the partition their key belongs to.
    partitioner: Partitioner,
    producer: Producers,
    /// Outcomes' acknowledgements, awaited off the partition threads (see [`OutcomeAcks`]).
    outcome_acks: OutcomeAcks,
    /// How many partitions the outcomes topic has (its reader's metadata): a record's
    /// reply partition beyond them is ignored, and its outcome goes to the partition numbered
    /// like its requests partition.
    outcome_partitions: AtomicU32,
    /// Picks a user's partition of the routes topic (see [`KafkaNode::routes_partitioner`]); the
    /// partition threads publish the routes of the requests they applied there.
    routes_partitioner: Partitioner,
    node_id: String,
    /// Where this process serves HTTP, announced with the partitions it owns.
    advertised_url: std::sync::OnceLock<String>,
    owned: Mutex<BTreeMap<u32, Owned>>,
    /// Times a partition thread of this process found itself fenced by a newer owner.
    fenced: AtomicU64,
    /// Set while the broker counts as lost (see [`watch`]): partition threads abandon their
    /// waits on the broker at once, so no consumer is left when it returns. A revocation does
    /// not set it: a revoked partition finishes its batch (and reads it back, which is how a
    /// thawed zombie learns it was fenced).
    broker_lost: AtomicBool,
    /// Every consumer that fetches, paused at once when the broker is lost (see [`watch`]).
    fetchers: watch::Fetchers,
    /// The current session's shared consumers (see [`consumers`]), created by the first
    /// partition that needs them and dropped when the session ends.
    session_consumers: Mutex<Option<Arc<consumers::SessionConsumers>>>,
    /// Whether the group member of the current session has had its first assignment (which
    /// may be empty): until then the group is forming, nobody may own a partition, and a
    /// request sent would only wait, so `/readyz` says not ready.
    group_joined: AtomicBool,
}

impl Shared {
    /// The session's shared consumers, created on first use; refused while the broker is lost
    /// (a consumer created then would fetch from a broker that came back empty).
    fn session_consumers(&self) -> anyhow::Result<Arc<consumers::SessionConsumers>> {
        let mut slot = self
            .session_consumers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        anyhow::ensure!(
            !self.broker_lost.load(Ordering::Relaxed),
            "the broker is lost: no consumer is started until it answers"
        );
        if let Some(existing) = &*slot {
            return Ok(existing.clone());
        }
        let created = consumers::SessionConsumers::start(&self.kafka)?;
        for source in [consumers::Source::Requests, consumers::Source::Changelog] {
            self.fetchers.register(created.consumer(source));
        }
        *slot = Some(created.clone());
        Ok(created)
    }
}

impl PartitionThreads for Shared {
    fn control(&self, p: u32) -> Option<crossbeam_channel::Sender<Command>> {
        let owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        owned.get(&p).map(|o| o.control.clone())
    }
}

/// Kafka key prefix of the routes topic's position markers (never a user's route).
const SYNC_PREFIX: &str = "\u{0}sync/";

/// Kafka key prefix of the routes topic's owner records: `<prefix><partition>` holds the newest
/// [`OwnerRecord`] of that partition (the topic is compacted, so it is kept). Every process reads
/// them with the routes, so it can tell a client which process owns a partition, or that the
/// partition is between owners.
const OWNER_PREFIX: &str = "\u{0}owner/";

/// The partition of the routes topic every owner record goes to, and the only one a process
/// reads from its start: the others are read once a lookup needs them (see [`RoutesReading`]).
/// Owner records on other partitions (written by versions that spread them by key) are not
/// taken: read later, out of order with this one, they could undo a newer announcement.
const OWNER_RECORDS_PARTITION: i32 = 0;

/// Who owns a partition, as its owner announced it on the routes topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// The owner's node id.
    pub node: String,
    /// Where the owner serves HTTP (`kafka.advertised_url`, or its bound address); empty until
    /// the process has bound its listener.
    pub address: String,
    /// What the owner is doing with the partition.
    pub state: OwnerState,
    /// When it said so, in milliseconds since the Unix epoch (the owner's clock).
    pub at_ms: u64,
}

/// A partition's phase with its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnerState {
    /// The group gave it to the owner, which is restoring it: not serving yet.
    Restoring,
    /// The owner serves it.
    Serving,
    /// The owner gave it up; nobody has announced it since.
    Released,
}

impl Shared {
    /// Announces this process's phase with partition `p` on the routes topic. Not awaited: an
    /// announcement is a hint for clients (where to ask), never needed for correctness.
    fn announce(&self, p: u32, state: OwnerState) {
        let record = OwnerRecord {
            node: self.node_id.clone(),
            address: self.advertised_url.get().cloned().unwrap_or_default(),
            state,
            at_ms: now_ms(),
        };
        let key = format!("{OWNER_PREFIX}{p}");
        let value = serde_json::to_vec(&record).expect("owner records serialize");
        let sent = self.producer.get().send_result(
            FutureRecord::to(&self.kafka.routes_topic)
                .partition(OWNER_RECORDS_PARTITION)
                .key(&key)
                .payload(&value),
        );
        if let Err((e, _)) = sent {
            tracing::debug!(partition = p, "announcing the partition's owner: {e}");
        }
    }
}

/// Takes an owner record read from the routes topic into `owners`. A node can only give up its
/// own claim: a release from a former owner that comes after another node's announcement (a
/// thawed owner, or a slow one in a cooperative rebalance) says nothing about the partition's
/// new owner, who never announces again, so it is ignored.
fn note_owner(owners: &mut HashMap<u32, OwnerRecord>, partition: u32, record: OwnerRecord) {
    let stale_release = record.state == OwnerState::Released
        && owners
            .get(&partition)
            .is_some_and(|now| now.node != record.node);
    if !stale_release {
        owners.insert(partition, record);
    }
}

/// How far a reader has read each partition of a topic, and a way to wait for a position.
#[derive(Default)]
struct ReadPositions {
    /// Next offset to read, by partition.
    next: Mutex<HashMap<i32, i64>>,
    /// Wakes the waiters when a position moves.
    moved: tokio::sync::Notify,
}

impl ReadPositions {
    fn advance(&self, partition: i32, next: i64) {
        self.next
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(partition, next);
        self.moved.notify_waiters();
    }

    /// Returns once `partition` has been read up to (not including) `next`.
    async fn reached(&self, partition: i32, next: i64) {
        loop {
            // Registered before the position is read, so a move in between is not missed.
            let moved = self.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            let at = self
                .next
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&partition)
                .copied()
                .unwrap_or(0);
            if at >= next {
                return;
            }
            moved.await;
        }
    }
}

/// The routes topic as this process reads it. From the start only [`OWNER_RECORDS_PARTITION`]
/// is read; another partition is added, from its beginning, the first time a lookup needs it
/// (a user-only request, or a read of a user's route), and is read from then on.
///
/// Why not every partition from the start: each process then fetched every route every other
/// process recorded, and the broker served each route once per process. With two processes
/// that was about a quarter of the broker's CPU per request in the consume benchmark, where no
/// route is ever looked up: requests fed to the requests topic carry their key (BENCHMARKS.md,
/// issue 15). A lookup never depended on routes read ahead of it: it writes a position marker
/// and waits until its partition is read past it.
struct RoutesReading {
    /// The session's routes reader (read by the `kafka-routes` thread).
    consumer: Arc<BaseConsumer>,
    /// The routes topic.
    topic: String,
    /// The partitions assigned to `consumer`: never removed within a session.
    reading: Mutex<std::collections::HashSet<i32>>,
}

impl RoutesReading {
    /// A reader of the routes topic, registered with the broker watch, reading the owner
    /// records partition and `partitions` (those an earlier session read: their first lookups
    /// need not wait for a catch-up again); returns it with the topic's partition count.
    fn start(
        kafka: &KafkaConfig,
        fetchers: &watch::Fetchers,
        partitions: &[i32],
    ) -> anyhow::Result<(RoutesReading, u32)> {
        let consumer = Arc::new(reader_consumer(kafka, &kafka.routes_topic)?);
        let count = partition_count(&consumer, &kafka.routes_topic)?;
        // Registered before anything is assigned, so a halt from now on pauses what it reads.
        fetchers.register(&consumer);
        let reading = RoutesReading {
            consumer,
            topic: kafka.routes_topic.clone(),
            reading: Mutex::default(),
        };
        for &p in std::iter::once(&OWNER_RECORDS_PARTITION).chain(partitions) {
            if (0..count as i32).contains(&p) {
                reading.read(p, fetchers)?;
            }
        }
        Ok((reading, count))
    }

    /// The partitions being read, sorted.
    fn partitions(&self) -> Vec<i32> {
        let mut partitions: Vec<i32> = self
            .reading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        partitions.sort_unstable();
        partitions
    }

    /// Makes sure partition `p` of the routes topic is being read (from its beginning, the
    /// first time). Refused while the broker is lost: a partition added then would fetch from
    /// a broker that may come back empty (see [`watch`]).
    fn read(&self, p: i32, fetchers: &watch::Fetchers) -> Result<(), SubmitError> {
        if self
            .reading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&p)
        {
            return Ok(());
        }
        fetchers
            .unless_halted(|| self.assign(p))
            .ok_or_else(|| {
                SubmitError::ClusterUnavailable(
                    "the Kafka broker is unreachable; the route cannot be looked up until it answers"
                        .into(),
                )
            })?
            .map_err(|e| SubmitError::Store(format!("looking up the route: {e:#}")))
    }

    fn assign(&self, p: i32) -> anyhow::Result<()> {
        let mut reading = self.reading.lock().unwrap_or_else(|e| e.into_inner());
        if reading.contains(&p) {
            return Ok(());
        }
        let mut partition = TopicPartitionList::new();
        partition.add_partition_offset(&self.topic, p, Offset::Beginning)?;
        self.consumer
            .incremental_assign(&partition)
            .with_context(|| format!("reading partition {p} of {}", self.topic))?;
        reading.insert(p);
        Ok(())
    }
}

/// HTTP requests waiting for their outcome, by request id. Each waiter is removed by its own
/// guard when its request ends in any way (answer, timeout, or the client going away), so
/// nothing leaks and one waiter's timeout does not drop another's wait for the same id.
#[derive(Default)]
struct Waiters {
    /// Waiters by request id, each with a token unique to it.
    by_id: Mutex<HashMap<String, WaiterList>>,
    /// The next token.
    next: AtomicU64,
}

/// One HTTP request waiting for its outcome.
struct Waiter {
    /// Tells this waiter from others of the same id (each removes only itself).
    token: u64,
    /// The fingerprint of the request it sent (empty for a host-made id, which no other
    /// request shares): only an outcome of that request, or one without a fingerprint, is
    /// its answer.
    fingerprint: String,
    /// The requests partition the request went to: which partition's owner it waits on.
    partition: u32,
    /// When it started waiting.
    since: Instant,
    /// Where its outcome goes.
    reply: oneshot::Sender<OutcomeRecord>,
}

/// The waiters of one request id.
type WaiterList = Vec<Waiter>;

/// What `/v1/partitions` shows of the requests this process waits on, per partition.
#[derive(Debug, Clone, Serialize)]
pub struct WaitingOn {
    /// The partition whose owner (any process of the cluster) has not answered yet.
    pub partition: u32,
    /// Requests waiting.
    pub requests: usize,
    /// How long the oldest has waited, in milliseconds.
    pub oldest_ms: u64,
}

/// Removes its waiter when dropped.
struct Waiting<'a> {
    waiters: &'a Waiters,
    id: String,
    token: u64,
}

impl Waiters {
    fn wait(
        &self,
        id: &str,
        fingerprint: &str,
        partition: u32,
    ) -> (Waiting<'_>, oneshot::Receiver<OutcomeRecord>) {
        let (reply, answer) = oneshot::channel();
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().entry(id.to_string()).or_default().push(Waiter {
            token,
            fingerprint: fingerprint.to_string(),
            partition,
            since: Instant::now(),
            reply,
        });
        let waiting = Waiting {
            waiters: self,
            id: id.to_string(),
            token,
        };
        (waiting, answer)
    }

    /// Hands an outcome to every waiter of its id whose request it answers: a waiter whose
    /// request has another fingerprint (another request sent under the same id) keeps waiting
    /// for its own.
    fn deliver(&self, outcome: &OutcomeRecord) {
        let answered = {
            let mut by_id = self.lock();
            let Some(list) = by_id.get_mut(&outcome.id) else {
                return;
            };
            let (answered, waiting): (Vec<Waiter>, Vec<Waiter>) =
                std::mem::take(list).into_iter().partition(|waiter| {
                    waiter.fingerprint.is_empty()
                        || outcome.fingerprint.is_empty()
                        || waiter.fingerprint == outcome.fingerprint
                });
            if waiting.is_empty() {
                by_id.remove(&outcome.id);
            } else {
                *list = waiting;
            }
            answered
        };
        for waiter in answered {
            let _ = waiter.reply.send(outcome.clone());
        }
    }

    /// The partitions requests wait on, with how many and the oldest wait.
    fn by_partition(&self) -> Vec<WaitingOn> {
        let mut out: BTreeMap<u32, WaitingOn> = BTreeMap::new();
        for waiter in self.lock().values().flatten() {
            let waited = waiter.since.elapsed().as_millis() as u64;
            let entry = out.entry(waiter.partition).or_insert(WaitingOn {
                partition: waiter.partition,
                requests: 0,
                oldest_ms: 0,
            });
            entry.requests += 1;
            entry.oldest_ms = entry.oldest_ms.max(waited);
        }
        out.into_values().collect()
    }

    /// Waiters in total (for tests of leaks, through `/metrics`).
    fn len(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, WaiterList>> {
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut by_id = self.waiters.lock();
        if let Some(list) = by_id.get_mut(&self.id) {
            list.retain(|waiter| waiter.token != self.token);
            if list.is_empty() {
                by_id.remove(&self.id);
            }
        }
    }
}

/// One process of a Turnstile cluster in Kafka mode.
pub struct KafkaNode {
    shared: Arc<Shared>,
    partitioner: Partitioner,
    routes: Arc<RouteCache>,
    /// HTTP requests waiting for their outcome.
    pending: Arc<Waiters>,
    /// The partition of the outcomes topic this process's requests name in their
    /// [`REPLY_PARTITION_HEADER`] and its outcomes reader reads (picked at random at start): with one partition per
    /// process, each outcome is read by the process waiting for it, not by every process.
    reply_partition: AtomicU32,
    /// Picks a user's partition of the routes topic: all of one user's routes, and the
    /// position markers of requests that look the user up, go to one partition, in order.
    routes_partitioner: Partitioner,
    /// How far the routes reader has read each partition of the routes topic.
    routes_read: Arc<ReadPositions>,
    /// The partitions of the routes topic this session reads, and its reader; none between
    /// sessions (the reader is dropped with the session's other consumers).
    routes_reading: Mutex<Option<Arc<RoutesReading>>>,
    /// The routes partitions the last session read: the next one reads them from its start.
    routes_partitions_before: Mutex<Vec<i32>>,
    /// Set once, at shutdown: ends the broker watch and every client thread.
    stop: Arc<AtomicBool>,
    /// Ends the current session's client threads (readers, group member): set at shutdown and
    /// when the broker is lost (see [`watch`]); a rejoin starts a new session with a new flag.
    session: Mutex<Arc<AtomicBool>>,
    /// The client threads of the current session.
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The newest owner record of each partition, read from the routes topic.
    owners: Arc<Mutex<HashMap<u32, OwnerRecord>>>,
    /// The broker watch's thread.
    watch_thread: Mutex<Option<JoinHandle<()>>>,
    /// Whether the broker answers and still holds this cluster (see [`watch`]).
    health: Arc<watch::ClusterHealth>,
    /// The cluster id of the layout this process joined: a broker that comes back with another
    /// one (or none) lost the cluster's data.
    cluster_id: String,
    /// Makes ids for requests that come without one.
    ids: RequestIds,
    /// Request counts and latency, for `/metrics`.
    metrics: crate::metrics::RequestMetrics,
}

/// The base configuration of every Kafka client: the brokers and `[kafka.client]`'s properties.
pub(crate) fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (name, value) in &kafka.client {
        c.set(name, value);
    }
    c.set("bootstrap.servers", &kafka.brokers)
        .set("socket.keepalive.enable", "true")
        // Topics are created by Turnstile (with N partitions, compacted where it must be),
        // never by a broker that sees a client ask for a topic it lost: a broker that came
        // back empty would re-create them with its defaults, and the next start would find
        // a 4-partition, uncompacted changelog.
        .set("allow.auto.create.topics", "false");
    c
}

/// How long a consumer waits, at least, before its second attempt to reach a broker that
/// closed its connection (librdkafka's first attempt is immediate; later ones back off from
/// this, with -25 %..+50 % jitter). See [`consumer_config`].
const CONSUMER_RECONNECT_BACKOFF_MS: u32 = 3_000;

/// The base configuration of every consumer: [`client_config`], and a reconnect backoff that
/// outlasts the broker watch's suspension. librdkafka 2.12.1 segfaults when a fetch answer from
/// a broker that came back empty carries KIP-951 leader hints for a topic it no longer knows
/// (see [`watch`]); a killed broker closes every connection, each consumer's immediate
/// reconnect is refused, and the next one comes at least 2.25 s later, by which time the watch
/// has dropped every consumer (0.2-0.4 s measured). No client setting avoids the fetch version
/// that carries the hints (only `api.version.request=false`, which falls back to 0.9-era
/// requests without idempotence or record batches).
pub(crate) fn consumer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = client_config(kafka);
    c.set(
        "reconnect.backoff.ms",
        CONSUMER_RECONNECT_BACKOFF_MS.to_string(),
    );
    c
}

impl KafkaNode {
    /// Checks the topics (creating missing ones with N partitions), starts the routes and
    /// outcomes readers and joins the consumer group.
    pub fn start(config: &Config) -> anyhow::Result<Arc<KafkaNode>> {
        config.validate()?;
        let kafka = config
            .kafka
            .clone()
            .context("Kafka mode needs a [kafka] section")?;
        let n = config.partitions.count();
        let partitioner = Partitioner::new(config.partitions.hash, n);
        let sandbox = Sandbox::new(RuleLimits::from(&config.rule))?;
        let bytes = match &config.rule.path {
            Some(path) => {
                std::fs::read(path).with_context(|| format!("reading rule {}", path.display()))?
            }
            None => crate::sandbox::REFERENCE_RULE.to_vec(),
        };
        let rule = sandbox.compile_shared(&bytes).context("loading the rule")?;
        // A broker that restarts empty while this process starts, after the topics were
        // checked, leaves a topic without partitions or a layout topic that cannot be read:
        // nothing was served yet, so the start is tried again from the topics on, a few times,
        // before giving up. A broker that cannot be reached, or a layout that differs from this
        // process's, is refused at once.
        let mut attempt = 1;
        // Every consumer that fetches is registered here, so the broker watch can pause it.
        let fetchers = watch::Fetchers::default();
        let (
            agreed,
            routes_reading,
            routes_partitions,
            (outcomes_consumer, reply_partition, outcome_partitions),
        ) = loop {
            ensure_topics(&kafka, n)?;
            let joined = layout::agree(
                &kafka,
                &consumer_config(&kafka),
                &layout::Layout::of(config, &kafka),
            )
            .and_then(|agreed| {
                let (routes, partitions) = RoutesReading::start(&kafka, &fetchers, &[])?;
                let outcomes = outcomes_reader(&kafka, None)?;
                Ok((agreed, routes, partitions, outcomes))
            });
            match joined {
                Ok(joined) => break joined,
                Err(e) if attempt < START_ATTEMPTS && !e.is::<layout::LayoutMismatch>() => {
                    tracing::warn!(
                        attempt,
                        "{e:#}; the broker may have restarted while this process started, trying again in {} s",
                        START_RETRY.as_secs()
                    );
                    std::thread::sleep(START_RETRY);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        };
        // Hot reload as in local mode: the versions this process's partitions run, persisted
        // under the data dir when there is one.
        let (registry, _) = crate::reload::RuleRegistry::open(
            sandbox.clone(),
            config.store.data_dir.as_deref(),
            rule,
            &bytes,
            n,
        )?;

        let node_id = format!(
            "turnstile-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let mut producer_config = client_config(&kafka);
        producer_config
            .set("client.id", &node_id)
            .set("acks", "all")
            // The idempotent producer: a send retried after a lost acknowledgement is written
            // once, and each partition's records stay in order with several in flight.
            .set("enable.idempotence", "true")
            .set("linger.ms", "1")
            .set("message.timeout.ms", "30000");
        let producer = Producers::new(producer_config)?;

        let routes_partitioner = Partitioner::new(config.partitions.hash, routes_partitions);
        let shared = Arc::new(Shared {
            config: config.clone(),
            kafka: kafka.clone(),
            cluster_id: agreed.cluster.clone(),
            changelog_format: changelog::ChangelogFormat::from_number(agreed.changelog_format)
                .context("the layout's changelog format was checked when it was agreed")?,
            sandbox,
            rules: RuleControl::new(registry, n),
            partitioner,
            producer,
            outcome_acks: OutcomeAcks::start()?,
            outcome_partitions: AtomicU32::new(outcome_partitions),
            routes_partitioner,
            node_id: node_id.clone(),
            advertised_url: std::sync::OnceLock::new(),
            owned: Mutex::new(BTreeMap::new()),
            fenced: AtomicU64::new(0),
            broker_lost: AtomicBool::new(false),
            fetchers,
            session_consumers: Mutex::new(None),
            group_joined: AtomicBool::new(false),
        });
        if let Some(dir) = &config.store.data_dir {
            note_former_clusters(dir, &kafka, &agreed.cluster);
        }
        let node = Arc::new(KafkaNode {
            routes_partitioner,
            routes_read: Arc::default(),
            routes_reading: Mutex::new(Some(Arc::new(routes_reading))),
            routes_partitions_before: Mutex::default(),
            shared: shared.clone(),
            partitioner,
            routes: Arc::new(RouteCache::new(
                config.routes.capacity,
                config.routes.ttl_seconds * 1000,
            )),
            pending: Arc::default(),
            reply_partition: AtomicU32::new(reply_partition),
            stop: Arc::new(AtomicBool::new(false)),
            session: Mutex::new(Arc::new(AtomicBool::new(false))),
            threads: Mutex::new(Vec::new()),
            owners: Arc::default(),
            watch_thread: Mutex::new(None),
            health: Arc::default(),
            cluster_id: agreed.cluster,
            ids: RequestIds::new(node_id.clone()),
            metrics: crate::metrics::RequestMetrics::default(),
        });
        let session = node.session();
        let threads = vec![
            node.spawn_routes_reader(session.clone())?,
            node.spawn_outcomes_reader(outcomes_consumer, session.clone())?,
            spawn_group_member(shared, session)?,
        ];
        *node.threads.lock().unwrap_or_else(|e| e.into_inner()) = threads;
        *node.watch_thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(node.spawn_watch()?);
        tracing::info!(node = %node_id, partitions = n, brokers = %kafka.brokers, group = %kafka.group, "joined the Kafka cluster");
        Ok(node)
    }

    /// The partitions of the routes topic this process reads (see [`RoutesReading`]), sorted.
    pub fn routes_partitions_read(&self) -> Vec<i32> {
        self.routes_reading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|reading| reading.partitions())
            .unwrap_or_default()
    }

    /// The partitioner.
    pub fn partitioner(&self) -> Partitioner {
        self.partitioner
    }

    /// This process's id in the cluster.
    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    /// The partition of the outcomes topic this process reads, named by its requests'
    /// [`REPLY_PARTITION_HEADER`].
    pub fn reply_partition(&self) -> u32 {
        self.reply_partition.load(Ordering::Relaxed)
    }

    /// Sets where this process serves HTTP (`kafka.advertised_url` wins over `bound`), and
    /// announces the partitions it already owns with it.
    pub fn advertise(&self, bound: std::net::SocketAddr) {
        let url = match &self.shared.kafka.advertised_url {
            Some(url) => url.clone(),
            None => format!("http://{bound}"),
        };
        if self.shared.advertised_url.set(url).is_err() {
            return;
        }
        let phases: Vec<(u32, bool)> = {
            let owned = self.shared.owned.lock().unwrap_or_else(|e| e.into_inner());
            owned
                .iter()
                .map(|(p, o)| (*p, o.stats.restored.load(Ordering::Relaxed)))
                .collect()
        };
        for (p, restored) in phases {
            let state = if restored {
                OwnerState::Serving
            } else {
                OwnerState::Restoring
            };
            self.shared.announce(p, state);
        }
    }

    /// Why partition `p`, which this process does not serve, cannot be read here: owned by
    /// another process (with its address, when announced), or between owners.
    fn elsewhere(&self, p: u32) -> KeyReadError {
        let restoring_here = self
            .shared
            .owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&p);
        if restoring_here {
            return KeyReadError::Moving {
                partition: p,
                owner: Some(OwnerRecord {
                    node: self.shared.node_id.clone(),
                    address: self
                        .shared
                        .advertised_url
                        .get()
                        .cloned()
                        .unwrap_or_default(),
                    state: OwnerState::Restoring,
                    at_ms: now_ms(),
                }),
            };
        }
        let owner = self
            .owners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&p)
            .cloned();
        // An announcement with this process's own address but another node id is a
        // predecessor's (a process restarted on the same address): naming it would send the
        // client back here.
        let own_url = self.shared.advertised_url.get();
        let stale_self =
            |o: &OwnerRecord| o.node != self.shared.node_id && Some(&o.address) == own_url;
        match owner {
            Some(owner) if stale_self(&owner) => KeyReadError::Moving {
                partition: p,
                owner: None,
            },
            Some(owner)
                if owner.state == OwnerState::Serving && owner.node != self.shared.node_id =>
            {
                KeyReadError::NotOwned {
                    partition: p,
                    owner: Some(owner),
                }
            }
            owner => KeyReadError::Moving {
                partition: p,
                owner: owner.filter(|o| o.state == OwnerState::Restoring),
            },
        }
    }

    /// Routes and produces a request, and waits for its outcome.
    pub async fn submit(&self, request: Request) -> Result<Decision, SubmitError> {
        let started = Instant::now();
        let kind = request.kind.clone();
        let id = request.id.clone();
        let result = tokio::select! {
            biased;
            result = self.route_and_wait(request) => result,
            // The broker went away while the request was in flight: answer now rather than
            // when the producer gives up. What was queued may still reach the broker if it
            // comes back, so the request may still be applied.
            () = self.cluster_left() => Err(SubmitError::Timeout(match id {
                Some(id) => format!(
                    "the Kafka broker became unreachable while request `{id}` was in flight; it may still be applied: retry with \"id\": \"{id}\" to learn its outcome"
                ),
                None => "the Kafka broker became unreachable while the request was in flight; it may still be applied (it had no id: send one to make retries safe)".to_string(),
            })),
        };
        self.metrics.record(
            &kind,
            crate::metrics::OutcomeClass::of(&result),
            started.elapsed().as_micros() as u64,
        );
        result
    }

    async fn route_and_wait(&self, request: Request) -> Result<Decision, SubmitError> {
        validate(&request)?;
        self.check_cluster()?;
        let kafka = &self.shared.kafka;
        let received_at_ms = now_ms();
        let key = match request.key.clone() {
            Some(key) => {
                let route = Route {
                    key: key.clone(),
                    recorded_at_ms: received_at_ms,
                };
                // Claim 5: the route is recorded, here and for every process, before routing.
                self.routes.record(&request.user, route.clone());
                let value = serde_json::to_vec(&route).expect("routes serialize");
                self.shared
                    .producer
                    .send(
                        FutureRecord::to(&kafka.routes_topic)
                            .partition(self.routes_partitioner.partition(&request.user) as i32)
                            .key(&request.user)
                            .payload(&value),
                        Duration::from_secs(30),
                    )
                    .await
                    .map_err(|(e, _)| SubmitError::Store(format!("recording the route: {e}")))?;
                key
            }
            None => self.wait_for_route(&request.user).await?,
        };
        let partition = self.partitioner.partition(&key);
        let (mut request, fingerprint) = self.ids.route(request, key.clone(), received_at_ms);
        // Every request is deduplicated by its id, the host-made ones too: a record the producer
        // retried (or that two processes both consumed across a move) is applied once.
        request.idempotent = true;
        let id = request.id.clone();
        let (waiter, answer) = self.pending.wait(&id, &fingerprint, partition);
        let record = RequestRecord {
            request,
            fingerprint,
        };
        let value = serde_json::to_vec(&record).expect("requests serialize");
        let reply_partition = self.reply_partition.load(Ordering::Relaxed).to_string();
        let sent = self
            .shared
            .producer
            .send(
                FutureRecord::to(&kafka.requests_topic)
                    .partition(partition as i32)
                    .key(&key)
                    .payload(&value)
                    .headers(rdkafka::message::OwnedHeaders::new().insert(
                        rdkafka::message::Header {
                            key: REPLY_PARTITION_HEADER,
                            value: Some(&reply_partition),
                        },
                    )),
                Duration::from_millis(kafka.reply_timeout_ms),
            )
            .await;
        if let Err((e, _)) = sent {
            // A produce that timed out may still have reached the broker: its outcome is
            // unknown, not "nothing applied".
            return Err(match e {
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::MessageTimedOut,
                ) => SubmitError::Timeout(format!(
                    "producing request `{id}` timed out; it may still be applied: retry with \"id\": \"{id}\" to learn its outcome"
                )),
                e => SubmitError::Store(format!("producing the request (not applied): {e}")),
            });
        }
        let outcome = tokio::time::timeout(Duration::from_millis(kafka.reply_timeout_ms), answer);
        let result = match outcome.await {
            Ok(Ok(outcome)) => outcome.result.map_err(|e| e.into_submit_error(&id)),
            Ok(Err(_)) => Err(SubmitError::ShuttingDown),
            Err(_) => Err(SubmitError::Timeout(format!(
                "no outcome for request `{id}` within {} ms; it may still be applied: retry with \"id\": \"{id}\" to learn its outcome",
                kafka.reply_timeout_ms
            ))),
        };
        drop(waiter);
        result
    }

    /// The user's route, as of the moment this request arrived. A route another process
    /// recorded a moment ago may not have reached this process's cache yet, and a stale route is
    /// as wrong as a missing one. So the lookup writes a position marker to the user's partition
    /// of the routes topic and waits until the routes reader has read past it: every route
    /// recorded (acknowledged) before this request arrived is then in the cache, newest last.
    /// The wait is bounded by `kafka.route_wait_ms`.
    async fn wait_for_route(&self, user: &str) -> Result<String, SubmitError> {
        match self.route(user).await? {
            Some(route) => Ok(route.key),
            None => Err(SubmitError::UnknownRoute(user.to_string())),
        }
    }

    /// The user's route as of now, or none (see [`KafkaNode::wait_for_route`], which this is
    /// without the error for a user with no route).
    pub async fn route(&self, user: &str) -> Result<Option<Route>, SubmitError> {
        let kafka = &self.shared.kafka;
        let wait = Duration::from_millis(kafka.route_wait_ms);
        let partition = self.routes_partitioner.partition(user) as i32;
        // Nothing is produced or fetched while the broker is away (see [`watch`]).
        self.check_cluster()?;
        let reading = self
            .routes_reading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                SubmitError::ClusterUnavailable(
                    "this process is between sessions with the Kafka broker; retry shortly".into(),
                )
            })?;
        reading.read(partition, &self.shared.fetchers)?;
        let marker = format!("{SYNC_PREFIX}{}", self.shared.node_id);
        // The whole lookup is bounded, the marker's produce included: a frozen broker would
        // otherwise hold it for the producer's delivery timeout (`message.timeout.ms`, 30 s).
        let looked_up = tokio::time::timeout(wait, async {
            let sent = self
                .shared
                .producer
                .send(
                    FutureRecord::to(&kafka.routes_topic)
                        .partition(partition)
                        .key(&marker)
                        .payload(b"{}".as_slice()),
                    wait,
                )
                .await
                .map_err(|(e, _)| SubmitError::Store(format!("looking up the route: {e}")))?;
            self.routes_read.reached(partition, sent.offset + 1).await;
            Ok::<(), SubmitError>(())
        })
        .await;
        match looked_up {
            Ok(result) => result?,
            Err(_) => {
                return Err(SubmitError::Store(format!(
                    "the route could not be looked up within {} ms (kafka.route_wait_ms): the routes topic was not written or read up to the lookup; retry",
                    kafka.route_wait_ms
                )));
            }
        }
        Ok(self.routes.lookup(user, now_ms()))
    }

    /// Records on dead letter `seq` of partition `p` that it was resubmitted, if this process
    /// owns the partition; `false` if there is no such letter.
    pub async fn mark_resubmitted(
        &self,
        p: u32,
        seq: u64,
        mark: crate::store::Resubmitted,
    ) -> Result<bool, KeyReadError> {
        self.ask(p, |reply| Command::MarkResubmitted { seq, mark, reply })
            .await
    }

    /// The rule version each partition runs in this process (or will run when it takes it).
    pub fn running_versions(&self) -> Vec<String> {
        self.shared.rules.registry().running().to_vec()
    }

    /// The history of installs and rollbacks in this process, oldest first.
    pub fn rule_history(&self) -> Vec<crate::reload::HistoryEntry> {
        self.shared.rules.registry().history().to_vec()
    }

    /// Installs a rule version on `partitions` (all when `None`) of this process, by the same
    /// path as local mode: owned partitions swap between two requests, the others start with it
    /// when the group gives them to this process.
    pub async fn install_rule(
        &self,
        bytes: Vec<u8>,
        partitions: Option<&str>,
        label: Option<String>,
    ) -> Result<crate::reload::InstallReport, crate::reload::InstallError> {
        self.shared
            .rules
            .install(self.shared.as_ref(), bytes, partitions, label)
            .await
    }

    /// Undoes the newest install of this process.
    pub async fn rollback_rule(
        &self,
    ) -> Result<crate::reload::InstallReport, crate::reload::InstallError> {
        self.shared.rules.rollback(self.shared.as_ref()).await
    }

    /// Sends a read to the thread of partition `p`, if this process owns it and it is restored.
    async fn ask<T>(
        &self,
        p: u32,
        command: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Command,
    ) -> Result<T, KeyReadError> {
        self.check_cluster().map_err(KeyReadError::Cluster)?;
        let control = {
            let owned = self.shared.owned.lock().unwrap_or_else(|e| e.into_inner());
            match owned.get(&p) {
                Some(o) if o.stats.restored.load(Ordering::Relaxed) => Some(o.control.clone()),
                _ => None,
            }
        };
        // Outside the lock: `elsewhere` takes it again.
        let Some(control) = control else {
            return Err(self.elsewhere(p));
        };
        let (reply, answer) = oneshot::channel();
        match control.try_send(command(reply)) {
            Ok(()) => {}
            Err(crossbeam_channel::TrySendError::Full(_)) => return Err(KeyReadError::Busy(p)),
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                return Err(self.elsewhere(p));
            }
        }
        match answer.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(KeyReadError::Store(e)),
            // The partition was revoked between the lookup and the read.
            Err(_) => Err(self.elsewhere(p)),
        }
    }

    /// A key's state, if this process owns its partition.
    pub async fn key_state(&self, key: &str) -> Result<(u32, Option<State>), KeyReadError> {
        let partition = self.partitioner.partition(key);
        let key = key.to_string();
        let state = self
            .ask(partition, |reply| Command::ReadState { key, reply })
            .await?;
        Ok((partition, state))
    }

    /// Dead letters of partition `p` after sequence number `after`, if this process owns it:
    /// requests its rule failed on, and consumed records refused before the rule saw them.
    pub async fn dead_letters(
        &self,
        p: u32,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, KeyReadError> {
        self.ask(p, |reply| Command::DeadLetters {
            after,
            limit,
            reply,
        })
        .await
    }

    /// The partitions whose outcomes this process's HTTP requests wait for: a partition whose
    /// owner is stopped or slow shows here with its oldest wait.
    pub fn waiting_on(&self) -> Vec<WaitingOn> {
        self.pending.by_partition()
    }

    /// The partitions this process owns.
    pub fn owned_partitions(&self) -> Vec<OwnedPartitionInfo> {
        let running = self.running_versions();
        let owned = self.shared.owned.lock().unwrap_or_else(|e| e.into_inner());
        owned
            .iter()
            .map(|(id, o)| {
                let next = o.stats.next_offset.load(Ordering::Relaxed);
                let high = o.stats.high_watermark.load(Ordering::Relaxed);
                OwnedPartitionInfo {
                    id: *id,
                    thread: format!("kafka-p{id}"),
                    restored: o.stats.restored.load(Ordering::Relaxed),
                    restore_ms: o.stats.restore_ms.load(Ordering::Relaxed),
                    restored_records: o.stats.restored_records.load(Ordering::Relaxed),
                    processed: o.stats.partition.applied.load(Ordering::Relaxed),
                    next_offset: next,
                    lag: if high >= 0 { (high - next).max(0) } else { -1 },
                    refused: o.stats.partition.refused.load(Ordering::Relaxed),
                    quarantined: o.stats.quarantined.load(Ordering::Relaxed),
                    zombie: o.stats.zombie.load(Ordering::Relaxed),
                    restored_from: o.stats.restored_from.load(Ordering::Relaxed),
                    changelog_read_backs: o.stats.read_backs.load(Ordering::Relaxed),
                    rule_failures: FailureKind::ALL
                        .iter()
                        .zip(&o.stats.partition.rule_failures)
                        .map(|(k, n)| (k.code(), n.load(Ordering::Relaxed)))
                        .collect(),
                    breaker: o.stats.partition.breaker.view(),
                    rule_version: running[*id as usize].clone(),
                    failure: o
                        .stats
                        .failure
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone(),
                }
            })
            .collect()
    }

    /// This process's metrics, in the Prometheus text exposition format: requests, the
    /// partitions it owns (with their lag as queue depth), restore times and offsets.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        self.metrics.render(&mut out);
        let versions = self.running_versions();
        let owned = self.shared.owned.lock().unwrap_or_else(|e| e.into_inner());
        let samples: Vec<crate::metrics::PartitionSample<'_>> = owned
            .iter()
            .map(|(id, o)| {
                let next = o.stats.next_offset.load(Ordering::Relaxed);
                let high = o.stats.high_watermark.load(Ordering::Relaxed);
                crate::metrics::PartitionSample {
                    id: *id,
                    queue_depth: if high >= 0 {
                        (high - next).max(0) as u64
                    } else {
                        0
                    },
                    stats: &o.stats.partition,
                    rule_version: &versions[*id as usize],
                }
            })
            .collect();
        crate::metrics::render_partitions(&mut out, &samples);
        let _ = writeln!(
            out,
            "# HELP turnstile_kafka_owned_partitions Partitions of the requests topic this process owns.\n# TYPE turnstile_kafka_owned_partitions gauge\nturnstile_kafka_owned_partitions {}",
            owned.len()
        );
        out.push_str("# HELP turnstile_kafka_restore_seconds How long restoring each owned partition took.\n# TYPE turnstile_kafka_restore_seconds gauge\n");
        for (id, o) in owned.iter() {
            let _ = writeln!(
                out,
                "turnstile_kafka_restore_seconds{{partition=\"{id}\"}} {}",
                o.stats.restore_ms.load(Ordering::Relaxed) as f64 / 1000.0
            );
        }
        out.push_str("# HELP turnstile_kafka_next_offset Offset of the next request each owned partition consumes.\n# TYPE turnstile_kafka_next_offset gauge\n");
        for (id, o) in owned.iter() {
            let _ = writeln!(
                out,
                "turnstile_kafka_next_offset{{partition=\"{id}\"}} {}",
                o.stats.next_offset.load(Ordering::Relaxed)
            );
        }
        drop(owned);
        let _ = writeln!(
            out,
            "# HELP turnstile_kafka_waiting_requests HTTP requests of this process waiting for their outcome.\n# TYPE turnstile_kafka_waiting_requests gauge\nturnstile_kafka_waiting_requests {}",
            self.pending.len()
        );
        let _ = writeln!(
            out,
            "# HELP turnstile_kafka_fenced_total Times a partition of this process was taken over by a newer owner while it still wrote (its batch was not acknowledged).\n# TYPE turnstile_kafka_fenced_total counter\nturnstile_kafka_fenced_total {}",
            self.shared.fenced.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP turnstile_kafka_cluster_state Where this process stands with the broker: 0 connected, 1 unreachable (partitions suspended), 2 data lost (stopped until restarted).\n# TYPE turnstile_kafka_cluster_state gauge\nturnstile_kafka_cluster_state {}",
            match self.health.state() {
                watch::ClusterState::Connected => 0,
                watch::ClusterState::Unreachable => 1,
                watch::ClusterState::DataLost => 2,
            }
        );
        crate::metrics::render_route_cache(&mut out, self.routes.len());
        out
    }

    /// Leaves the group (each owned partition finishes its batch and stops) and stops the readers.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(watch) = self
            .watch_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = watch.join();
        }
        self.end_session();
        // The partitions' last announcements (released) are queued, not awaited: send them
        // before the producer goes, so other processes learn the partitions are free.
        let _ = self
            .shared
            .producer
            .get()
            .flush(rdkafka::util::Timeout::After(Duration::from_secs(2)));
    }

    /// The current session's stop flag.
    fn session(&self) -> Arc<AtomicBool> {
        self.session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops the readers and the group member and every partition thread: afterwards this
    /// process holds no Kafka consumer (the producer stays; nothing is produced meanwhile).
    fn end_session(&self) {
        self.session().store(true, Ordering::Relaxed);
        self.shared.group_joined.store(false, Ordering::Relaxed);
        // Every partition thread is told first, so that all consumers wind down together
        // rather than one after another.
        for o in self
            .shared
            .owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            o.stop.store(true, Ordering::Relaxed);
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
        stop_partitions(&self.shared, None);
        // The routes reader goes with the session (its thread has ended); the next session
        // reads the same partitions again.
        let routes_reading = self
            .routes_reading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(reading) = routes_reading {
            *self
                .routes_partitions_before
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = reading.partitions();
        }
        // Every partition thread has let go of its queues: the shared consumers close here.
        let consumers = self
            .shared
            .session_consumers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(consumers);
    }

    /// Ends the session because the broker is lost, and says how long closing every consumer
    /// took (the window in which a broker that returns empty could still crash the process).
    fn suspend(&self) {
        let started = Instant::now();
        self.end_session();
        tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            "suspended: this process holds no Kafka consumer until the broker answers"
        );
    }

    /// Starts a new session after the broker came back with the cluster's data: the readers
    /// and the group member (which restores the partitions the group gives this process).
    fn begin_session(self: &Arc<Self>) -> anyhow::Result<()> {
        self.shared.group_joined.store(false, Ordering::Relaxed);
        let session = Arc::new(AtomicBool::new(false));
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = session.clone();
        self.shared.fetchers.reopen();
        let kafka = &self.shared.kafka;
        // A new reader: the partitions the last session read are read again from their
        // beginning, so routes recorded while this process was away reach the cache in the
        // topic's order. Kept only once the whole session has started (a reader of a session
        // that failed to start is dropped here, not left fetching).
        let before = self
            .routes_partitions_before
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (routes_reading, _) = RoutesReading::start(kafka, &self.shared.fetchers, &before)?;
        // The same outcomes partition as before when the topic still has it: requests sent
        // before the suspension name it.
        let (outcomes_consumer, reply_partition, outcome_partitions) =
            outcomes_reader(kafka, Some(self.reply_partition.load(Ordering::Relaxed)))?;
        self.reply_partition
            .store(reply_partition, Ordering::Relaxed);
        self.shared
            .outcome_partitions
            .store(outcome_partitions, Ordering::Relaxed);
        *self
            .routes_reading
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(routes_reading));
        let threads = vec![
            self.spawn_routes_reader(session.clone())?,
            self.spawn_outcomes_reader(outcomes_consumer, session.clone())?,
            spawn_group_member(self.shared.clone(), session)?,
        ];
        *self.threads.lock().unwrap_or_else(|e| e.into_inner()) = threads;
        Ok(())
    }

    /// Returns once the broker watch finds the broker gone (or the cluster's data lost).
    async fn cluster_left(&self) {
        while self.health.state() == watch::ClusterState::Connected {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Refuses work while the broker is away or lost the cluster's data.
    pub fn check_cluster(&self) -> Result<(), SubmitError> {
        match self.health.state() {
            watch::ClusterState::Connected => Ok(()),
            watch::ClusterState::Unreachable => Err(SubmitError::ClusterUnavailable(format!(
                "the Kafka broker is unreachable ({}); this process has suspended its partitions until it answers",
                self.health.reason()
            ))),
            watch::ClusterState::DataLost => Err(SubmitError::ClusterDataLost(format!(
                "the Kafka broker lost this cluster's data ({}); this process stopped serving: acknowledged state may be gone, see the README's \"When the broker loses its data\"",
                self.health.reason()
            ))),
        }
    }

    /// Why this process is not ready, if it is not: the broker is away or lost the cluster's
    /// data, or the group member has not had its first assignment since it (re)joined.
    pub fn not_ready(&self) -> Option<String> {
        if let Err(e) = self.check_cluster() {
            return Some(e.to_string());
        }
        if !self.shared.group_joined.load(Ordering::Relaxed) {
            return Some(format!(
                "joining the consumer group {}: no partition assignment received yet",
                self.shared.kafka.group
            ));
        }
        None
    }

    /// Whether the group member of the current session has had its first assignment.
    pub fn group_joined(&self) -> bool {
        self.shared.group_joined.load(Ordering::Relaxed)
    }

    /// The cluster's state as the broker watch sees it.
    pub fn cluster_state(&self) -> (watch::ClusterState, String) {
        (self.health.state(), self.health.reason())
    }

    /// The broker watch (see [`watch`]): checks the broker every `kafka.broker_check_ms`,
    /// suspends this process's share of the cluster when the broker is lost, and rejoins when it
    /// comes back with the cluster's data, or stays stopped when it came back without.
    fn spawn_watch(self: &Arc<Self>) -> anyhow::Result<JoinHandle<()>> {
        let node = self.clone();
        let client: BaseConsumer<watch::WatchContext> = client_config(&self.shared.kafka)
            .set("group.id", format!("{}-watch", self.shared.kafka.group))
            .create_with_context(watch::WatchContext::default())
            .context("creating the broker watch's client")?;
        Ok(std::thread::Builder::new()
            .name("kafka-watch".into())
            .spawn(move || node.watch(client))?)
    }

    fn watch(self: &Arc<Self>, client: BaseConsumer<watch::WatchContext>) {
        let all_down = client.context().all_down.clone();
        let kafka = &self.shared.kafka;
        let interval = Duration::from_millis(kafka.broker_check_ms);
        // A broker that is down refuses connections at once; only a silent one (frozen, or
        // unreachable on the network) makes a check wait this long. Generous, so that a loaded
        // machine is not mistaken for a lost broker (a suspension moves every partition).
        let timeout = (interval * 4).max(Duration::from_secs(2));
        let n = self.partitioner.partitions();
        let mut failures = watch::Failures::default();
        let mut next = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            // Serves the client's callbacks (the "all brokers down" event).
            let _ = client.poll(Duration::ZERO);
            let down = all_down.swap(false, Ordering::AcqRel);
            if down && self.health.state() == watch::ClusterState::Connected {
                // librdkafka also raises the event when its last open connection closes while
                // the others wait out their reconnect backoff, which happened about a second
                // after a rejoin: suspending again then cost up to 90 s before the group formed
                // (attacker finding). A broker that died refuses connections, so one short
                // check tells the two apart; a broker that came back empty at once is found
                // here too.
                match watch::check_topics(&client, kafka, n, ALL_DOWN_CONFIRM) {
                    watch::Check::Intact => {
                        tracing::info!(
                            "every connection to the Kafka brokers closed, but the broker answers at once; not suspending"
                        );
                        continue;
                    }
                    watch::Check::Lost(why) => {
                        self.data_lost(why);
                        continue;
                    }
                    watch::Check::Unreachable(_) => {}
                }
                self.lose_broker();
                tracing::error!(
                    "every connection to the Kafka brokers is down; suspending this process's partitions until they answer"
                );
                self.health.set(
                    watch::ClusterState::Unreachable,
                    "every connection to the brokers is down".into(),
                );
                self.suspend();
                next = Instant::now() + interval;
                continue;
            }
            if Instant::now() < next {
                // Returns at once on the "all brokers down" event.
                let _ = client.poll(Duration::from_millis(20));
                continue;
            }
            next = Instant::now() + interval;
            let check = watch::check_topics(&client, kafka, n, timeout);
            match self.health.state() {
                watch::ClusterState::DataLost => return,
                watch::ClusterState::Connected => match check {
                    watch::Check::Intact => {
                        failures.lost_after(false);
                    }
                    // A broker that does not answer (frozen, or cut off by the network) but
                    // keeps its connections is waited for, not suspended from: it comes back
                    // with its data, and a rejoin would move every partition for nothing. Only
                    // a broker that died (every connection closed, above) suspends.
                    watch::Check::Unreachable(why) => {
                        if failures.lost_after(true) {
                            tracing::warn!(
                                "the Kafka broker does not answer ({why}); requests wait for it (up to kafka.reply_timeout_ms)"
                            );
                        }
                    }
                    watch::Check::Lost(why) => self.data_lost(why),
                },
                watch::ClusterState::Unreachable => match check {
                    watch::Check::Unreachable(why) => {
                        self.health.set(watch::ClusterState::Unreachable, why);
                    }
                    watch::Check::Lost(why) => self.data_lost(why),
                    watch::Check::Intact => match layout::cluster_id(kafka, &consumer_config(kafka))
                    {
                        Ok(Some(id)) if id == self.cluster_id => {
                            tracing::info!("the Kafka broker is back with this cluster's data; rejoining");
                            self.shared.broker_lost.store(false, Ordering::Relaxed);
                            match self.begin_session() {
                                Ok(()) => {
                                    failures.lost_after(false);
                                    self.health.set(watch::ClusterState::Connected, String::new());
                                }
                                Err(e) => {
                                    tracing::warn!("rejoining the cluster: {e:#}; trying again");
                                    self.lose_broker();
                                    self.end_session();
                                }
                            }
                        }
                        Ok(Some(id)) => self.data_lost(format!(
                            "the layout topic {} names cluster {id}, not {} which this process joined",
                            layout::topic(kafka),
                            self.cluster_id
                        )),
                        Ok(None) => self.data_lost(format!(
                            "the layout topic {} is empty or gone",
                            layout::topic(kafka)
                        )),
                        Err(e) => {
                            self.health
                                .set(watch::ClusterState::Unreachable, format!("{e:#}"));
                        }
                    },
                },
            }
        }
    }

    /// Stops serving for good: the broker answered without this cluster's data.
    fn data_lost(&self, why: String) {
        self.lose_broker();
        tracing::error!(
            "the Kafka broker lost this cluster's data: {why}; this process stops serving (every partition stays stopped and requests are refused with cluster_data_lost) until an operator restarts it"
        );
        self.health.set(watch::ClusterState::DataLost, why);
        self.suspend();
    }

    /// Marks the broker lost and pauses every consumer at once (closing them comes after).
    fn lose_broker(&self) {
        self.shared.broker_lost.store(true, Ordering::Relaxed);
        let paused = self.shared.fetchers.halt();
        tracing::debug!(paused, "paused every consumer");
    }

    /// Reads the partitions of the routes topic the session's [`RoutesReading`] has assigned into
    /// the route cache, in offset order (a partition's order is the order its users' routes were
    /// recorded in, whichever process recorded them), takes the owner records, and publishes how
    /// far it has read each partition for [`KafkaNode::wait_for_route`].
    fn spawn_routes_reader(
        self: &Arc<Self>,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<JoinHandle<()>> {
        let consumer = self
            .routes_reading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .context("the session's routes reader is made before its thread")?
            .consumer
            .clone();
        let (routes, read, owners) = (
            self.routes.clone(),
            self.routes_read.clone(),
            self.owners.clone(),
        );
        Ok(std::thread::Builder::new()
            .name("kafka-routes".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match consumer.poll(Duration::from_millis(100)) {
                        Some(Ok(message)) => {
                            let user = message.key().map(std::str::from_utf8);
                            match (user, message.payload()) {
                                // A position marker (see `wait_for_route`): nothing to cache.
                                (Some(Ok(user)), _) if user.starts_with(SYNC_PREFIX) => {}
                                (Some(Ok(key)), _)
                                    if key.starts_with(OWNER_PREFIX)
                                        && message.partition() != OWNER_RECORDS_PARTITION => {}
                                (Some(Ok(key)), Some(value)) if key.starts_with(OWNER_PREFIX) => {
                                    let partition = key[OWNER_PREFIX.len()..].parse::<u32>();
                                    let record = serde_json::from_slice::<OwnerRecord>(value);
                                    if let (Ok(partition), Ok(record)) = (partition, record) {
                                        note_owner(
                                            &mut owners.lock().unwrap_or_else(|e| e.into_inner()),
                                            partition,
                                            record,
                                        );
                                    }
                                }
                                (Some(Ok(user)), Some(value)) => {
                                    match serde_json::from_slice::<Route>(value) {
                                        Ok(route) => routes.record(user, route),
                                        Err(e) => tracing::warn!(
                                            offset = message.offset(),
                                            "skipping an unreadable record of the routes topic: {e}"
                                        ),
                                    }
                                }
                                _ => tracing::warn!(
                                    offset = message.offset(),
                                    "skipping a routes record without a user"
                                ),
                            }
                            read.advance(message.partition(), message.offset() + 1);
                        }
                        Some(Err(e)) => tracing::warn!("reading routes: {e}"),
                        None => {}
                    }
                }
            })?)
    }

    fn spawn_outcomes_reader(
        self: &Arc<Self>,
        consumer: BaseConsumer,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<JoinHandle<()>> {
        let consumer = Arc::new(consumer);
        self.shared.fetchers.register(&consumer);
        let pending = self.pending.clone();
        Ok(std::thread::Builder::new()
            .name("kafka-outcomes".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match consumer.poll(Duration::from_millis(100)) {
                        Some(Ok(message)) => {
                            let Some(value) = message.payload() else {
                                continue;
                            };
                            let Ok(outcome) = serde_json::from_slice::<OutcomeRecord>(value) else {
                                continue;
                            };
                            pending.deliver(&outcome);
                        }
                        Some(Err(e)) => tracing::warn!("reading outcomes: {e}"),
                        None => {}
                    }
                }
            })?)
    }
}

/// How long the broker watch asks the broker before it takes an "all brokers down" event for a
/// broker that died: a dead broker refuses connections at once, so the check fails well within
/// it, and consumers' reconnect backoff ([`CONSUMER_RECONNECT_BACKOFF_MS`], at least 2.25 s)
/// keeps them away from a broker that returns meanwhile.
const ALL_DOWN_CONFIRM: Duration = Duration::from_secs(1);

/// How many times [`KafkaNode::start`] tries to join when a topic it just checked has
/// vanished (a broker restarted empty meanwhile).
const START_ATTEMPTS: u32 = 4;

/// The pause between those attempts: long enough for a restarting broker to answer again.
const START_RETRY: Duration = Duration::from_secs(3);

/// A topic the broker names without a partition: it was deleted, or the broker restarted empty
/// after the topic was checked.
#[derive(Debug, thiserror::Error)]
#[error("topic {topic} has no partitions")]
struct TopicHasNoPartitions {
    topic: String,
}

/// The outcomes topic's reader: one partition (`preferred` when the topic has it, else one at
/// random), from the end: only outcomes of requests this process sends from now on matter, and
/// a restart must not read the topic's whole history. Returns the reader, its partition and the
/// topic's partition count.
fn outcomes_reader(
    kafka: &KafkaConfig,
    preferred: Option<u32>,
) -> anyhow::Result<(BaseConsumer, u32, u32)> {
    let topic = &kafka.outcomes_topic;
    let consumer = reader_consumer(kafka, topic)?;
    let count = partition_count(&consumer, topic)?;
    let partition = preferred
        .filter(|p| *p < count)
        .unwrap_or_else(|| rand::random::<u32>() % count);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition as i32, Offset::End)?;
    consumer.assign(&tpl)?;
    Ok((consumer, partition, count))
}

/// A consumer outside any group, not yet assigned, for reading `topic`.
fn reader_consumer(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<BaseConsumer> {
    consumer_config(kafka)
        .set("group.id", format!("{}-reader", kafka.group))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "20")
        .create()
        .with_context(|| format!("creating a reader of {topic}"))
}

/// How many partitions the broker names for `topic` (none is an error).
fn partition_count(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<u32> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("reading the metadata of {topic}"))?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    if partitions == 0 {
        return Err(TopicHasNoPartitions {
            topic: topic.to_string(),
        }
        .into());
    }
    Ok(partitions as u32)
}

/// Creates the topics that do not exist (requests and changelog with N partitions), and refuses
/// to start if the requests or changelog topic has another partition count.
pub(crate) fn ensure_topics(kafka: &KafkaConfig, n: u32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(kafka)
        .create()
        .context("creating the Kafka admin client")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let topics = [
        &kafka.requests_topic,
        &kafka.changelog_topic,
        &kafka.outcomes_topic,
        &kafka.routes_topic,
    ];
    // A bounded first contact, so unreachable brokers are an error at start, not a hang.
    admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .with_context(|| format!("cannot reach the Kafka brokers at {}", kafka.brokers))?;
    let brokers = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .map(|m| m.brokers().len() as i32)
        .unwrap_or(1)
        .max(1);
    let replicas = kafka.replication_factor.unwrap_or(3.min(brokers));
    let retention = kafka.retention_ms.to_string();
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            let topic = NewTopic::new(t, n as i32, TopicReplication::Fixed(replicas));
            // State must outlive any retention window: the changelog and the routes keep the
            // newest record of each key forever; requests and outcomes are a bounded history.
            if **t == kafka.changelog_topic || **t == kafka.routes_topic {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
                    .set("cleanup.policy", "delete")
                    .set("retention.ms", &retention)
            }
        })
        .collect();
    let options = AdminOptions::new()
        .request_timeout(Some(Duration::from_secs(10)))
        .operation_timeout(Some(Duration::from_secs(10)));
    let created = runtime
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(20), admin.create_topics(&new, &options)).await
        })
        .map_err(|_| {
            anyhow::anyhow!(
                "creating topics on {}: no answer within 20 s",
                kafka.brokers
            )
        })?
        .context("creating topics")?;
    for result in created {
        match result {
            Ok(topic) => tracing::info!(%topic, replicas, "created topic"),
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => tracing::warn!(%topic, "could not create topic: {code}"),
        }
    }
    // A changelog that deletes by age would lose every state older than the retention the next
    // time a partition moves: refuse it rather than find out then.
    let described = runtime
        .block_on(admin.describe_configs(
            &[rdkafka::admin::ResourceSpecifier::Topic(
                &kafka.changelog_topic,
            )],
            &options,
        ))
        .context("reading the changelog topic's configuration")?;
    let policy = described
        .into_iter()
        .next()
        .and_then(|r| r.ok())
        .and_then(|r| r.get("cleanup.policy").and_then(|e| e.value.clone()));
    match policy {
        Some(policy) if policy.split(',').any(|p| p.trim() == "compact") => {}
        Some(policy) => bail!(
            "topic {} has cleanup.policy={policy}; the changelog must be compacted (cleanup.policy=compact) or states older than its retention are lost when a partition moves",
            kafka.changelog_topic
        ),
        None => bail!(
            "could not read cleanup.policy of topic {}; the changelog must be compacted",
            kafka.changelog_topic
        ),
    }
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .context("reading the cluster metadata")?;
    for topic in [&kafka.requests_topic, &kafka.changelog_topic] {
        let found = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic.as_str())
            .map(|t| t.partitions().len() as u32);
        match found {
            Some(count) if count == n => {}
            Some(count) => bail!(
                "topic {topic} has {count} partitions but partitions.servers × partitions.containers is {n}; they must match"
            ),
            None => bail!("topic {topic} does not exist and could not be created"),
        }
    }
    Ok(())
}

/// The group member's callbacks: a partition given to this process gets a thread; a partition
/// taken away has its thread finish and stop.
struct GroupContext {
    shared: Arc<Shared>,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let partitions: Vec<u32> = tpl
                .elements()
                .iter()
                .map(|e| e.partition() as u32)
                .collect();
            let started = Instant::now();
            stop_partitions(&self.shared, Some(&partitions));
            tracing::info!(
                ?partitions,
                took_ms = started.elapsed().as_millis() as u64,
                "partitions revoked"
            );
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // The group consumer only holds membership: its partitions are read by their own
            // threads' consumers, positioned where each partition's state stopped.
            if let Err(e) = consumer.pause(tpl) {
                tracing::warn!("pausing the group consumer: {e}");
            }
            let partitions: Vec<u32> = tpl
                .elements()
                .iter()
                .map(|e| e.partition() as u32)
                .collect();
            tracing::info!(?partitions, "partitions assigned");
            for p in partitions {
                start_partition(&self.shared, p);
            }
            self.shared.group_joined.store(true, Ordering::Relaxed);
        }
    }
}

fn spawn_group_member(
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    let kafka = shared.kafka.clone();
    let consumer: BaseConsumer<GroupContext> = consumer_config(&kafka)
        .set("group.id", &kafka.group)
        .set("client.id", &shared.node_id)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", kafka.session_timeout_ms.to_string())
        .set(
            "heartbeat.interval.ms",
            (kafka.session_timeout_ms / 3).max(100).to_string(),
        )
        .set("auto.offset.reset", "earliest")
        // Incremental cooperative rebalancing (KIP-429): a join, leave or death moves only the
        // partitions that change owner; the others keep their threads and keep serving. With
        // the eager protocol every member gave up every partition on each change.
        .set("partition.assignment.strategy", "cooperative-sticky")
        .create_with_context(GroupContext {
            shared: shared.clone(),
        })
        .context("creating the group consumer")?;
    let consumer = Arc::new(consumer);
    shared.fetchers.register(&consumer);
    consumer
        .subscribe(&[&kafka.requests_topic])
        .context("joining the consumer group")?;
    Ok(std::thread::Builder::new()
        .name("kafka-group".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // Serves heartbeats and rebalance callbacks; its paused partitions yield nothing
                // worth reading, and anything fetched before the pause is ignored here.
                let _ = consumer.poll(Duration::from_millis(100));
            }
            let shared = consumer.context().shared.clone();
            if shared.broker_lost.load(Ordering::Relaxed) {
                // No broker to say goodbye to, and every moment this consumer lives it may meet
                // the broker coming back (see `watch`): drop it now; the partition threads are
                // stopped by the session's end.
                return;
            }
            consumer.unsubscribe();
            // Serve the revocation callback.
            for _ in 0..20 {
                let _ = consumer.poll(Duration::from_millis(50));
            }
        })?)
}

fn start_partition(shared: &Arc<Shared>, p: u32) {
    let mut owned = shared.owned.lock().unwrap_or_else(|e| e.into_inner());
    if owned.contains_key(&p) {
        return;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(OwnedStats::default());
    let (control, control_queue) =
        crossbeam_channel::bounded(shared.config.partitions.queue_capacity);
    let thread = {
        let (shared, stop, stats) = (shared.clone(), stop.clone(), stats.clone());
        std::thread::Builder::new()
            .name(format!("kafka-p{p}"))
            .spawn(move || run_partition(&shared, p, &stop, &stats, &control_queue))
            .expect("spawning a partition thread")
    };
    owned.insert(
        p,
        Owned {
            stop,
            thread,
            stats,
            control,
        },
    );
}

/// Stops the threads of `partitions` (all when `None`) after their current batch.
fn stop_partitions(shared: &Shared, partitions: Option<&[u32]>) {
    let stopping: Vec<Owned> = {
        let mut owned = shared.owned.lock().unwrap_or_else(|e| e.into_inner());
        let ids: Vec<u32> = owned
            .keys()
            .copied()
            .filter(|p| partitions.is_none_or(|list| list.contains(p)))
            .collect();
        ids.into_iter().filter_map(|p| owned.remove(&p)).collect()
    };
    for o in &stopping {
        o.stop.store(true, Ordering::Relaxed);
    }
    for o in stopping {
        let _ = o.thread.join();
    }
}

/// One owned partition: restore, then run the partition engine over the requests partition
/// until told to stop. Trouble with the broker or the changelog is retried with backoff; it
/// never stops the process (the other partitions keep serving).
fn run_partition(
    shared: &Shared,
    p: u32,
    stop: &AtomicBool,
    stats: &Arc<OwnedStats>,
    control: &crossbeam_channel::Receiver<Command>,
) {
    let mut backoff = Backoff::default();
    shared.announce(p, OwnerState::Restoring);
    while !stop.load(Ordering::Relaxed) {
        match restore_and_serve(shared, p, stop, stats, control) {
            Ok(()) => break,
            Err(e) => {
                stats.restored.store(false, Ordering::Relaxed);
                *stats.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{e:#}"));
                refuse_queued(control);
                tracing::error!(
                    partition = p,
                    retry_in_ms = backoff.next().as_millis() as u64,
                    "partition failed, retrying: {e:#}"
                );
                backoff.sleep(stop);
            }
        }
    }
    shared.announce(p, OwnerState::Released);
    tracing::info!(partition = p, "partition stopped");
}

/// Opens an owned partition's local store. In Kafka mode the local file is a copy of what the
/// changelog holds, so a missing file is created (a full restore follows) and a damaged one is
/// set aside (renamed `*.damaged`, kept for inspection) and rebuilt from the changelog.
fn open_local_store(
    shared: &Shared,
    location: &Location,
    p: u32,
) -> anyhow::Result<PartitionStore> {
    let store = &shared.config.store;
    let open = || {
        PartitionStore::open(location, p, store.durability, store.dedup_retention).map(|s| {
            s.with_dead_letter_retention(store.dead_letter_retention)
                .with_retention(crate::store::Retention::of(&shared.config))
        })
    };
    let Location::Dir(dir) = location else {
        return Ok(open()?);
    };
    let path = crate::store::partition_path(dir, p);
    if !path.exists() {
        redb::Database::create(&path).with_context(|| format!("creating {}", path.display()))?;
    }
    // A local store with quarantined records is rebuilt too: here the changelog holds every
    // record, so nothing needs to be refused.
    let opened = open().and_then(|store| match store.quarantine().len() {
        0 => Ok(store),
        n => Err(crate::store::StoreError::damaged(format!(
            "{n} damaged records (see the log lines above)"
        ))),
    });
    match opened {
        Ok(store) => Ok(store),
        Err(e) => {
            let aside = path.with_extension("redb.damaged");
            tracing::error!(
                partition = p,
                "local store unusable, rebuilding it from the changelog (old file kept as {}): {e}",
                aside.display()
            );
            std::fs::rename(&path, &aside)
                .with_context(|| format!("moving {} aside", path.display()))?;
            redb::Database::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            Ok(open()?)
        }
    }
}

/// The process's producer, replaced when it turns fatal: an idempotent producer that the broker
/// fenced (after a long broker pause, say) never produces again, so every later send would
/// fail until the process restarts.
struct Producers {
    config: ClientConfig,
    current: std::sync::RwLock<FutureProducer>,
}

impl Producers {
    fn new(config: ClientConfig) -> anyhow::Result<Producers> {
        let producer = config.create().context("creating the Kafka producer")?;
        Ok(Producers {
            config,
            current: std::sync::RwLock::new(producer),
        })
    }

    /// The producer to send with now.
    fn get(&self) -> FutureProducer {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sends one record with the current producer; a failure that left the producer fatal
    /// replaces it, so the next send (a retry) works again.
    async fn send<K, P>(
        &self,
        record: FutureRecord<'_, K, P>,
        timeout: Duration,
    ) -> rdkafka::producer::future_producer::OwnedDeliveryResult
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        let result = self.get().send(record, timeout).await;
        if let Err((e, _)) = &result {
            self.renew_after(e);
        }
        result
    }

    /// After a failed send: if the producer is in a fatal state, or the broker fenced its
    /// producer id (Tansu does after a long pause, on every later send), replace it.
    fn renew_after(&self, error: &rdkafka::error::KafkaError) {
        use rdkafka::types::RDKafkaErrorCode as Code;
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let fenced = matches!(
            error.rdkafka_error_code(),
            Some(
                Code::ProducerFenced
                    | Code::InvalidProducerEpoch
                    | Code::UnknownProducerId
                    | Code::OutOfOrderSequenceNumber
            )
        );
        let Some((code, reason)) = current.client().fatal_error().or_else(|| {
            fenced.then(|| {
                (
                    error.rdkafka_error_code().expect("fenced"),
                    error.to_string(),
                )
            })
        }) else {
            return;
        };
        match self.config.create::<FutureProducer>() {
            Ok(fresh) => {
                tracing::warn!(
                    "the Kafka producer failed for good ({code}: {reason}); replaced it"
                );
                *current = fresh;
            }
            Err(e) => tracing::error!(
                "the Kafka producer failed for good ({code}: {reason}) and could not be replaced: {e}"
            ),
        }
    }
}

/// Drops the reads and swaps queued for a partition that is not serving: each waiting caller
/// sees its reply channel close and answers `not_owned` instead of waiting.
fn refuse_queued(control: &crossbeam_channel::Receiver<Command>) {
    while let Ok(command) = control.try_recv() {
        drop(command);
    }
}

/// Exponential backoff between retries of a partition's trouble, 100 ms up to 5 s.
#[derive(Default)]
struct Backoff {
    /// Consecutive failures so far.
    failures: u32,
}

impl Backoff {
    fn next(&self) -> Duration {
        Duration::from_millis((100u64 << self.failures.min(6)).min(5_000))
    }

    /// Waits the next delay (waking early when `stop` is set) and lengthens the one after.
    fn sleep(&mut self, stop: &AtomicBool) {
        let until = Instant::now() + self.next();
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.failures = self.failures.saturating_add(1);
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Where a data dir keeps the local copies of this cluster's partitions:
/// `DATA_DIR/kafka/<changelog_topic>/cluster-<id>`. The cluster id is in the path because the
/// changelog's offsets alone cannot tell two clusters apart: after a broker lost its data, a new
/// cluster's changelog starts again at offset 0, and its end soon passes a stale copy's
/// position (every restore attempt writes a fence), after which the stale copy would be served
/// as if it were this cluster's state, and the new requests before its position skipped. A copy
/// of another cluster is left where it is (see [`note_former_clusters`]).
fn local_store_dir(data_dir: &Path, kafka: &KafkaConfig, cluster_id: &str) -> PathBuf {
    data_dir
        .join("kafka")
        .join(&kafka.changelog_topic)
        .join(format!("cluster-{cluster_id}"))
}

/// Logs, once at start, the local copies under the data dir that belong to another cluster on
/// the same changelog topic (a cluster whose broker lost its data, or one before this layout
/// recorded ids): they are never read, and an operator may delete them.
fn note_former_clusters(data_dir: &Path, kafka: &KafkaConfig, cluster_id: &str) {
    let ours = local_store_dir(data_dir, kafka, cluster_id);
    let Ok(entries) = std::fs::read_dir(data_dir.join("kafka").join(&kafka.changelog_topic)) else {
        return;
    };
    let former: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|path| *path != ours)
        .map(|path| path.display().to_string())
        .collect();
    if !former.is_empty() {
        tracing::warn!(
            cluster = cluster_id,
            former = ?former,
            "the data dir holds local copies of another Kafka cluster on this changelog topic (the broker lost its data, or they predate cluster ids); they are not used, delete them when no longer needed"
        );
    }
}

fn restore_and_serve(
    shared: &Shared,
    p: u32,
    stop: &AtomicBool,
    stats: &Arc<OwnedStats>,
    control: &crossbeam_channel::Receiver<Command>,
) -> anyhow::Result<()> {
    let kafka = &shared.kafka;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    // With a data dir, each partition's state stays on disk with the changelog position it
    // reflects, so a process that gets a partition back reads only what changed meanwhile.
    let location = match &shared.config.store.data_dir {
        Some(dir) => {
            let dir = local_store_dir(dir, kafka, &shared.cluster_id);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            Location::Dir(dir)
        }
        None => Location::Memory,
    };
    let mut store = open_local_store(shared, &location, p)?;
    let Some(restored) = runtime.block_on(changelog::restore(shared, p, &mut store, stop))? else {
        return Ok(());
    };
    let resume = restored.checkpoint.resume;
    stats
        .restored_records
        .store(restored.records, Ordering::Relaxed);
    stats
        .quarantined
        .fetch_add(restored.quarantined, Ordering::Relaxed);
    stats.zombie.fetch_add(restored.zombie, Ordering::Relaxed);
    stats
        .restore_ms
        .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    stats
        .restored_from
        .store(restored.read_from, Ordering::Relaxed);
    stats.next_offset.store(resume, Ordering::Relaxed);
    stats.high_watermark.store(-1, Ordering::Relaxed);
    stats.read_backs.store(0, Ordering::Relaxed);
    tracing::info!(
        partition = p,
        read_from = restored.read_from,
        records = restored.records,
        quarantined = restored.quarantined,
        zombie = restored.zombie,
        resume_offset = resume,
        epoch = restored.checkpoint.epoch,
        took_ms = started.elapsed().as_millis() as u64,
        "partition restored"
    );
    let tail = Tail::new(shared, p, restored.checkpoint)?;

    let requests = shared.session_consumers()?.read(
        consumers::Source::Requests,
        &kafka.requests_topic,
        p,
        resume,
    )?;
    let rule = shared
        .rules
        .running_rule(p)
        .context("the partition's rule version is not loaded")?;
    let engine = Engine {
        id: p,
        partitioner: shared.partitioner,
        store,
        decider: Decider::Wasm(shared.sandbox.instantiate(rule, p)?),
        breaker: crate::breaker::Breaker::new(shared.sandbox.limits().breaker),
        stats: stats.partition.clone(),
        max_batch: shared.config.partitions.max_batch,
        sync_interval: Duration::from_millis(shared.config.store.flush_interval_ms),
        route_cache: None,
    };
    let mut transport = KafkaLog {
        shared,
        p,
        requests,
        read_next: resume,
        control,
        stop,
        stats,
        runtime,
        tail,
        next_offset: resume,
        last_watermark: Instant::now(),
        backoff: Backoff::default(),
        failure: None,
        fenced: false,
    };
    *stats.failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
    stats.restored.store(true, Ordering::Relaxed);
    shared.announce(p, OwnerState::Serving);
    engine.run(&mut transport);
    if transport.fenced {
        // A newer owner wrote a fence: if the group really moved the partition, its revocation
        // (the stop) comes within a session timeout. If it does not, the fence was not a real
        // owner's (a stray or forged record): restore again, with a fence of this process's own.
        stats.restored.store(false, Ordering::Relaxed);
        let grace = Instant::now() + Duration::from_millis(2 * kafka.session_timeout_ms);
        while !stop.load(Ordering::Relaxed) && Instant::now() < grace {
            refuse_queued(control);
            std::thread::sleep(Duration::from_millis(50));
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        anyhow::bail!(
            "partition {p} was fenced but the group still assigns it to this process; restoring it again"
        );
    }
    match transport.failure.take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Where the answer to a request consumed from the log goes: the outcomes topic, under the
/// request's id, if the record had a readable id.
pub(crate) struct LogReply {
    /// The request id (none for a record too damaged to name one).
    id: Option<String>,
    /// The record's offset.
    offset: i64,
    /// The request's fingerprint, carried into its outcome record (empty when unreadable).
    fingerprint: String,
    /// The outcomes partition the record asked for (see [`REPLY_PARTITION_HEADER`]).
    reply_partition: Option<u32>,
}

/// Kafka mode's transport: the partition's requests topic partition in front, the changelog as
/// the commit step, the outcomes topic for answers, and the control queue for reads, swaps and
/// stop.
struct KafkaLog<'a> {
    shared: &'a Shared,
    p: u32,
    /// Reads this partition of the requests topic (its queue of the shared consumer), from
    /// the restored offset.
    requests: consumers::PartitionReader,
    /// Offset of the next record to read: anything older is an outdated fetch, skipped.
    read_next: i64,
    /// Reads, dead letters, swaps from the API.
    control: &'a crossbeam_channel::Receiver<Command>,
    /// Set when the partition is revoked or the process stops.
    stop: &'a AtomicBool,
    stats: &'a OwnedStats,
    /// Drives the producer's futures on this thread.
    runtime: tokio::runtime::Runtime,
    /// Follows this owner's changelog partition before each acknowledgement (fencing): reads
    /// it back only when another writer's records are between this owner's.
    tail: Tail,
    /// Set when a newer owner fenced this one: nothing more is acknowledged.
    fenced: bool,
    /// Offset of the next record to apply: where to seek back to after a failed batch.
    next_offset: i64,
    /// When the high watermark was last read, for the lag.
    last_watermark: Instant,
    /// Delay before retrying a failed batch.
    backoff: Backoff,
    /// A failure that needs the partition restored again before it can go on.
    failure: Option<anyhow::Error>,
}

impl Transport for KafkaLog<'_> {
    type Reply = LogReply;

    fn next_batch(&mut self, inbox: &mut Inbox<LogReply>, max_batch: usize) -> bool {
        if self.stop.load(Ordering::Relaxed) || self.failure.is_some() || self.fenced {
            return false;
        }
        if self.requests.missed_a_record() {
            self.failure = Some(anyhow::anyhow!(
                "a record of partition {} went to the shared consumer's main queue; restoring to read it",
                self.p
            ));
            return false;
        }
        while let Ok(command) = self.control.try_recv() {
            let ends = matches!(command, Command::Swap { .. } | Command::Stop);
            inbox.others.push(command);
            if ends {
                return true;
            }
        }
        if self.last_watermark.elapsed() > Duration::from_secs(1) {
            self.last_watermark = Instant::now();
            if let Ok((_, high)) = self.requests.consumer().fetch_watermarks(
                &self.shared.kafka.requests_topic,
                self.p as i32,
                Duration::from_millis(500),
            ) {
                self.stats.high_watermark.store(high, Ordering::Relaxed);
            }
        }
        let mut timeout = Duration::from_millis(50);
        while inbox.requests.len() < max_batch {
            match self.requests.queue().poll(timeout) {
                Some(Ok(message)) if message.offset() < self.read_next => {}
                Some(Ok(message)) => {
                    self.read_next = message.offset() + 1;
                    inbox.requests.push(self.read_record(&message));
                    timeout = Duration::ZERO;
                }
                Some(Err(e)) => {
                    tracing::warn!(partition = self.p, "reading requests: {e}");
                    break;
                }
                None => break,
            }
        }
        true
    }

    fn before_commit(
        &mut self,
        tx: &mut crate::store::Batch<'_>,
        batch: &[Incoming<LogReply>],
        results: &[Applied],
    ) -> Result<(), StoreError> {
        // Every consumed record leaves a changelog record with its offset, applied or not, so
        // a restore resumes after it and never applies it a second time.
        let epoch = self.tail.epoch();
        let consumed = batch
            .iter()
            .zip(results)
            .map(|(incoming, done)| changelog::Consumed {
                source_offset: incoming.reply.offset,
                request: &incoming.request,
                applied: done.applied,
                new_state: match &done.result {
                    Ok(Decision {
                        verdict: Verdict::Transition(state),
                        ..
                    }) if done.applied => Some(state),
                    _ => None,
                },
                moved_route: done.route_order.is_some(),
            });
        let format = self.shared.changelog_format;
        let mut records = changelog::batch_records(tx, epoch, format, consumed)?;
        let resume = batch
            .last()
            .map_or(self.next_offset, |i| i.reply.offset + 1);
        // A zombie's writes seen on the way are answered by writing the owner's own values
        // again (bounded: a zombie that keeps writing is fenced by its own read-back).
        // The route of every request that moved one, published once it is decided, whichever
        // front end the request came through (a reserve fed straight into the requests topic
        // too): the routes topic then ends in the order requests were applied. The last record
        // of a user in the batch is the one applied last.
        // Newest first, one per user, then back in applied order: linear in the batch, which
        // runs on the partition's thread.
        let recorded_at_ms = now_ms();
        let mut published = std::collections::HashSet::new();
        let mut routes: Vec<(String, Vec<u8>)> = batch
            .iter()
            .zip(results)
            .rev()
            .filter(|(incoming, done)| {
                done.route_order.is_some() && published.insert(incoming.request.user.as_str())
            })
            .map(|(incoming, _)| {
                // Timed by this process, not by the record: a producer's `received_at_ms` must
                // not decide how long a route lives.
                let route = Route {
                    key: incoming.request.key.clone(),
                    recorded_at_ms,
                };
                (
                    incoming.request.user.clone(),
                    serde_json::to_vec(&route).expect("routes serialize"),
                )
            })
            .collect();
        routes.reverse();
        for attempt in 0..3 {
            let offsets = if attempt == 0 {
                self.produce_changelog_and_routes(&records, &routes)?
            } else {
                self.produce_changelog(&records)?
            };
            let followed = self.tail.follow(self.p, &offsets, &self.shared.broker_lost);
            self.stats
                .read_backs
                .store(self.tail.read_backs(), Ordering::Relaxed);
            match followed? {
                Err(fenced) => {
                    tracing::error!(partition = self.p, "{fenced}");
                    self.fenced = true;
                    self.shared.fenced.fetch_add(1, Ordering::Relaxed);
                    return Err(StoreError::unavailable(fenced.to_string()));
                }
                Ok(zombie) if zombie.is_empty() => break,
                Ok(zombie) => {
                    tracing::warn!(
                        partition = self.p,
                        ?zombie,
                        "overwriting a fenced-out writer's changelog records"
                    );
                    self.stats
                        .zombie
                        .fetch_add(zombie.len() as u64, Ordering::Relaxed);
                    records = changelog::repair_records(tx, epoch, format, resume, &zombie)?;
                }
            }
        }
        tx.put_checkpoint(
            CHECKPOINT,
            &Checkpoint {
                changelog_next: self.tail.next(),
                epoch,
                resume,
                epoch_fence: self.tail.epoch_fence(),
            },
        )
    }

    fn answer(&mut self, answers: Vec<(LogReply, Result<Decision, ApplyError>)>) {
        self.backoff.reset();
        if let Some((last, _)) = answers.last() {
            self.next_offset = last.offset + 1;
            self.stats
                .next_offset
                .store(self.next_offset, Ordering::Relaxed);
        }
        let outcome_partitions = self.shared.outcome_partitions.load(Ordering::Relaxed);
        let outcomes: Vec<(String, Option<i32>, Vec<u8>)> = answers
            .into_iter()
            .filter_map(|(reply, result)| {
                let id = reply.id?;
                // Without a reply partition, the outcomes partition numbered like the requests
                // partition the record was read from: its producer knows that number (it
                // picked it), and each partition thread then writes to one outcomes partition
                // rather than to every one. By key, every process wrote a small batch to each
                // outcomes partition in every produce, and with two processes the broker's CPU
                // per request went up by half (BENCHMARKS.md, issue 15).
                let partition = reply
                    .reply_partition
                    .filter(|p| *p < outcome_partitions)
                    .or((outcome_partitions > 0).then(|| self.p % outcome_partitions))
                    .map(|p| p as i32);
                let record = OutcomeRecord {
                    schema: OUTCOME_SCHEMA,
                    id: id.clone(),
                    fingerprint: reply.fingerprint,
                    result: result.map_err(|e| RemoteError::from(&e)),
                };
                Some((
                    id,
                    partition,
                    serde_json::to_vec(&record).expect("outcomes serialize"),
                ))
            })
            .collect();
        // Not awaited: the batch's effects are in the changelog already (a retry with the same id
        // gets the answer), so the partition goes on with its next batch while another thread
        // waits for the broker. Measured: waiting here took as long as the changelog's produce.
        let producer = self.shared.producer.get();
        let topic = &self.shared.kafka.outcomes_topic;
        let mut deliveries = Vec::with_capacity(outcomes.len());
        for (id, partition, value) in &outcomes {
            let mut partition = *partition;
            loop {
                let mut record = FutureRecord::to(topic).key(id).payload(value);
                if let Some(partition) = partition {
                    record = record.partition(partition);
                }
                match producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        _,
                    )) => std::thread::sleep(Duration::from_millis(1)),
                    // The producer's metadata does not know the partition (it names fewer than
                    // the reader saw): the outcome goes by key rather than nowhere.
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::UnknownPartition,
                        ),
                        _,
                    )) if partition.is_some() => partition = None,
                    Err((e, _)) => {
                        tracing::warn!(partition = self.p, "producing an outcome: {e}");
                        break;
                    }
                }
            }
        }
        self.shared.outcome_acks.watch(self.p, deliveries);
    }

    fn failed(&mut self, batch: Vec<Incoming<LogReply>>, error: &StoreError) {
        // Nothing of the batch is in the local store, but part of its changelog may be: the
        // local state is no longer known to match the changelog, so the partition restores
        // again (from the changelog, which holds everything acknowledged) before going on.
        drop(batch);
        self.failure = Some(anyhow::anyhow!("{error}"));
    }
}

impl KafkaLog<'_> {
    /// Produces changelog records to this partition and waits for the broker; returns their
    /// offsets, in order.
    fn produce_changelog(&self, records: &[(String, Vec<u8>)]) -> Result<Vec<i64>, StoreError> {
        self.produce_changelog_and_routes(records, &[])
    }

    /// [`KafkaLog::produce_changelog`], and publishes `routes` (user, route JSON) to the routes
    /// topic at the same time; returns once the broker has acknowledged both.
    fn produce_changelog_and_routes(
        &self,
        records: &[(String, Vec<u8>)],
        routes: &[(String, Vec<u8>)],
    ) -> Result<Vec<i64>, StoreError> {
        let shared = &self.shared;
        let p = self.p as i32;
        let routes_partitioner = shared.routes_partitioner;
        let this_partition = |_: &str| Some(p);
        let user_partition = |user: &str| Some(routes_partitioner.partition(user) as i32);
        let produced = self.runtime.block_on(async {
            tokio::select! {
                both = async {
                    tokio::join!(
                        produce_all(
                            &shared.producer,
                            &shared.kafka.changelog_topic,
                            &this_partition,
                            records
                        ),
                        produce_all(
                            &shared.producer,
                            &shared.kafka.routes_topic,
                            &user_partition,
                            routes
                        )
                    )
                } => Some(both),
                // With the broker lost, a partition does not wait out the producer's timeout:
                // its batch is left unanswered, like one whose produce failed, and the next
                // owner's restore decides what was written.
                () = stopped(&shared.broker_lost) => None,
            }
        });
        let Some((changelog, published)) = produced else {
            return Err(StoreError::unavailable(format!(
                "partition {} stopped while its changelog was being written: the broker is lost",
                self.p
            )));
        };
        published.map_err(|e| {
            StoreError::unavailable(format!(
                "publishing the routes of partition {}: {e:#}",
                self.p
            ))
        })?;
        changelog.map_err(|e| {
            StoreError::unavailable(format!(
                "writing the changelog of partition {}: {e:#}",
                self.p
            ))
        })
    }

    /// Reads one record of the requests topic. A record that cannot be read still becomes an
    /// incoming request (refused and dead-lettered by the engine), so nothing is skipped silently.
    fn read_record(&self, message: &rdkafka::message::BorrowedMessage<'_>) -> Incoming<LogReply> {
        let offset = message.offset();
        let source = Some(RecordSource {
            topic: self.shared.kafka.requests_topic.clone(),
            partition: message.partition() as u32,
            offset,
        });
        let payload = message.payload().unwrap_or_default();
        match serde_json::from_slice::<RequestRecord>(payload) {
            Ok(record) => {
                let mut request = record.request;
                // Every request in Kafka mode is deduplicated by its id: a producer cannot turn
                // that off for its records.
                request.idempotent = true;
                // Computed here, never taken from the record: a producer cannot make two
                // different requests look the same to deduplication.
                let fingerprint = crate::runtime::fingerprint(
                    &request.kind,
                    &request.key,
                    &request.user,
                    &request.payload,
                );
                Incoming {
                    reply: LogReply {
                        id: Some(request.id.clone()),
                        offset,
                        fingerprint: fingerprint.clone(),
                        reply_partition: reply_partition_of(message),
                    },
                    request,
                    unreadable: None,
                    fingerprint,
                    source,
                    moves_route: true,
                }
            }
            Err(e) => {
                let value = serde_json::from_slice::<serde_json::Value>(payload).ok();
                let id = value
                    .as_ref()
                    .and_then(|v| v["request"]["id"].as_str().map(str::to_string))
                    .filter(|id| !id.is_empty() && id.len() <= crate::runtime::MAX_FIELD_BYTES);
                let text = String::from_utf8_lossy(&payload[..payload.len().min(4096)]);
                let key = message
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                Incoming {
                    request: RoutedRequest {
                        id: id.clone().unwrap_or_else(|| format!("offset-{offset}")),
                        idempotent: false,
                        kind: String::new(),
                        key,
                        user: String::new(),
                        payload: serde_json::to_string(&text).expect("strings serialize"),
                        received_at_ms: now_ms(),
                    },
                    unreadable: Some(format!(
                        "record {}/{}/{offset} is not a Turnstile request record: {e}",
                        self.shared.kafka.requests_topic, self.p
                    )),
                    fingerprint: String::new(),
                    source,
                    moves_route: true,
                    reply: LogReply {
                        id,
                        offset,
                        fingerprint: String::new(),
                        // A refused record's producer still gets its answer where it asked.
                        reply_partition: reply_partition_of(message),
                    },
                }
            }
        }
    }
}

/// Waits for the broker's acknowledgements of produced outcomes on its own thread, so that a
/// partition thread never waits for them, and logs the failures (one line per batch).
struct OutcomeAcks {
    /// Each batch's deliveries, with its partition; bounded, so a broker that stops
    /// acknowledging slows the partitions down instead of growing memory.
    batches: std::sync::mpsc::SyncSender<(u32, Vec<rdkafka::producer::DeliveryFuture>)>,
}

impl OutcomeAcks {
    fn start() -> anyhow::Result<OutcomeAcks> {
        let (batches, receiver) =
            std::sync::mpsc::sync_channel::<(u32, Vec<rdkafka::producer::DeliveryFuture>)>(1024);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("outcome-acks".into())
            .spawn(move || {
                for (partition, deliveries) in receiver {
                    let total = deliveries.len();
                    let mut failed = 0;
                    let mut first = None;
                    for delivery in deliveries {
                        match runtime.block_on(delivery) {
                            Ok(Ok(_)) => {}
                            Ok(Err((e, _))) => {
                                failed += 1;
                                first.get_or_insert_with(|| e.to_string());
                            }
                            Err(_) => {
                                failed += 1;
                                first.get_or_insert_with(|| "the producer went away".into());
                            }
                        }
                    }
                    if let Some(first) = first {
                        // The effects are in the changelog; a retry with the same id gets the
                        // answer.
                        tracing::warn!(partition, failed, total, "producing outcomes: {first}");
                    }
                }
            })?;
        Ok(OutcomeAcks { batches })
    }

    fn watch(&self, partition: u32, deliveries: Vec<rdkafka::producer::DeliveryFuture>) {
        if !deliveries.is_empty() {
            let _ = self.batches.send((partition, deliveries));
        }
    }
}

/// Returns once `stop` is set (checked every 20 ms).
pub(crate) async fn stopped(stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Produces `records` (key, value) in order and waits until the broker has acknowledged all;
/// returns their offsets, in the same order.
async fn produce_all(
    producers: &Producers,
    topic: &str,
    partition: &(dyn Fn(&str) -> Option<i32> + Sync),
    records: &[(String, Vec<u8>)],
) -> anyhow::Result<Vec<i64>> {
    let result = produce_all_with(&producers.get(), topic, partition, records).await;
    if let Err(e) = &result
        && let Some(e) = e.downcast_ref::<rdkafka::error::KafkaError>()
    {
        producers.renew_after(e);
    }
    result
}

async fn produce_all_with(
    producer: &FutureProducer,
    topic: &str,
    partition: &(dyn Fn(&str) -> Option<i32> + Sync),
    records: &[(String, Vec<u8>)],
) -> anyhow::Result<Vec<i64>> {
    let mut deliveries = Vec::with_capacity(records.len());
    for (key, value) in records {
        loop {
            let mut record = FutureRecord::to(topic).key(key).payload(value);
            if let Some(p) = partition(key) {
                record = record.partition(p);
            }
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    _,
                )) => tokio::time::sleep(Duration::from_millis(1)).await,
                Err((e, _)) => {
                    return Err(anyhow::Error::new(e).context(format!("producing to {topic}")));
                }
            }
        }
    }
    let mut offsets = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        match delivery.await {
            Ok(Ok(delivery)) => offsets.push(delivery.offset),
            Ok(Err((e, _))) => {
                return Err(anyhow::Error::new(e).context(format!("producing to {topic}")));
            }
            Err(_) => bail!("producing to {topic}: the producer went away"),
        }
    }
    Ok(offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(node: &str, state: OwnerState, at_ms: u64) -> OwnerRecord {
        OwnerRecord {
            node: node.into(),
            address: format!("http://{node}"),
            state,
            at_ms,
        }
    }

    /// The attacker's sequence: A serves, is frozen, B takes over and serves, A thaws and
    /// releases. B still owns the partition.
    #[test]
    fn a_former_owners_late_release_does_not_undo_the_new_owner() {
        let mut owners = HashMap::new();
        note_owner(&mut owners, 3, record("a", OwnerState::Serving, 1));
        note_owner(&mut owners, 3, record("b", OwnerState::Restoring, 2));
        note_owner(&mut owners, 3, record("b", OwnerState::Serving, 3));
        note_owner(&mut owners, 3, record("a", OwnerState::Released, 4));
        assert_eq!(owners[&3].node, "b");
        assert_eq!(owners[&3].state, OwnerState::Serving);
    }

    /// An owner's own release stands, and the next announcement, from anyone, replaces it.
    #[test]
    fn an_owners_own_release_stands_until_the_next_announcement() {
        let mut owners = HashMap::new();
        note_owner(&mut owners, 0, record("a", OwnerState::Serving, 1));
        note_owner(&mut owners, 0, record("a", OwnerState::Released, 2));
        assert_eq!(owners[&0].state, OwnerState::Released);
        note_owner(&mut owners, 0, record("b", OwnerState::Restoring, 3));
        assert_eq!(
            (owners[&0].node.as_str(), owners[&0].state),
            ("b", OwnerState::Restoring)
        );
        // A release of a partition nobody was known to own is taken as it is.
        note_owner(&mut owners, 1, record("c", OwnerState::Released, 4));
        assert_eq!(owners[&1].state, OwnerState::Released);
    }
}
