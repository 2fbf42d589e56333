//! A partition: one dedicated OS thread that owns one store, one rule instance and one bounded
//! queue, and consumes the queue strictly in arrival order.
//!
//! Nothing but this thread touches the partition's `Store`, rule instance or database. Other
//! threads talk to it only by [`Command`] messages, and get answers on oneshot channels. A full
//! queue is refused at once (backpressure), so memory stays bounded.
//!
//! The loop is a group commit: take what is queued (up to `max_batch`), apply each request
//! through the rule in order inside one write transaction, commit, and only then reply to every
//! request of the batch. A batch therefore costs one fsync however many requests it holds, and
//! the batch grows by itself when load is high.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tokio::sync::oneshot;

use crate::config::Durability;
use crate::model::{Decision, Outcome, RoutedRequest, State, Verdict, now_ms};
use crate::router::{Partitioner, Route, RouteCache};
use crate::sandbox::{CompiledRule, FailureKind, RuleFailure, RuleInstance, Sandbox};
use crate::store::{
    DeadLetter, DedupEntry, Location, LogEntry, PartitionStore, StoreError, StoreReader,
};

/// Why a request could not be applied.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApplyError {
    /// The rule failed on it; nothing of it was stored but a dead letter.
    #[error("{0}")]
    Rule(RuleFailure),
    /// The client id was used before for a request with another body.
    #[error(
        "request id `{0}` was already used for a different request (kind, key, user or payload differ); use a new id for a new request"
    )]
    IdConflict(String),
    /// The batch could not be stored; nothing of it was applied.
    #[error("the partition's store failed: {0}")]
    Store(StoreError),
    /// The request is malformed or on the wrong partition (a record from a producer that is not
    /// Turnstile); it was dead-lettered, not applied.
    #[error("{0}")]
    Invalid(String),
    /// The key's rule failures went over the budget: refused before the rule ran, nothing
    /// stored (see [`crate::breaker`]).
    #[error(
        "key `{key}` is quarantined: the rule failed on it too often; retry after {retry_after_ms} ms"
    )]
    Quarantined {
        /// The refused key.
        key: String,
        /// How long until a request of the key is let through again.
        retry_after_ms: u64,
    },
}

impl ApplyError {
    /// The stable error code the API returns.
    pub fn code(&self) -> &'static str {
        match self {
            ApplyError::Rule(f) => f.kind.code(),
            ApplyError::IdConflict(_) => "id_conflict",
            ApplyError::Store(e) if e.is_damage() => "store_damaged",
            ApplyError::Store(e) if e.is_record_damage() => "record_damaged",
            ApplyError::Store(_) => "store_unavailable",
            ApplyError::Invalid(_) => "invalid_request",
            ApplyError::Quarantined { .. } => "rule_quarantined",
        }
    }
}

/// A message to a partition thread.
pub(crate) enum Command {
    /// Apply a request and reply with its decision once it is durable.
    Apply {
        request: RoutedRequest,
        /// sha256 (hex) of the request's body, compared on a retry with the same client id.
        fingerprint: String,
        /// See [`Incoming::moves_route`].
        moves_route: bool,
        reply: oneshot::Sender<Result<Decision, ApplyError>>,
    },
    /// Read a key's committed state.
    ReadState {
        key: String,
        reply: oneshot::Sender<Result<Option<State>, StoreError>>,
    },
    /// Read dead letters after a sequence number.
    DeadLetters {
        after: u64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<DeadLetter>, StoreError>>,
    },
    /// Mark dead letter `seq` as resubmitted.
    MarkResubmitted {
        seq: u64,
        mark: crate::store::Resubmitted,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    /// Switch to another rule between two requests: everything queued before this is decided
    /// by the old rule, everything after by the new one.
    Swap {
        rule: Arc<CompiledRule>,
        /// Answers with how long the switch held the partition, or why it failed.
        reply: oneshot::Sender<Result<std::time::Duration, String>>,
    },
    /// Issue 12 item 11 (backup): a read transaction over everything committed so far, taken
    /// between two batches, for a backup thread to copy.
    Snapshot {
        reply: oneshot::Sender<Result<redb::ReadTransaction, StoreError>>,
    },
    /// Finish everything queued before this, then stop the thread.
    Stop,
}

/// Counters a partition thread publishes; written only by that thread.
#[derive(Debug)]
pub struct PartitionStats {
    /// Requests applied (transitions and rejects).
    pub applied: AtomicU64,
    /// Requests answered from the dedup table without being applied again.
    pub deduplicated: AtomicU64,
    /// Batches committed.
    pub batches: AtomicU64,
    /// Requests whose batch failed to commit.
    pub store_failures: AtomicU64,
    /// Rule failures, by [`FailureKind::ALL`] order.
    pub rule_failures: [AtomicU64; FailureKind::ALL.len()],
    /// Requests per committed batch.
    pub batch_sizes: crate::metrics::Histogram,
    /// Fuel the rule used, summed over calls.
    pub fuel_used: AtomicU64,
    /// Requests refused before the rule saw them (malformed, or on the wrong partition) and
    /// dead-lettered.
    pub refused: AtomicU64,
    /// Damaged records quarantined in the partition's file (refused one by one).
    pub quarantined: AtomicU64,
    /// Size of the partition's file in bytes, sampled between batches (0 in memory).
    pub data_bytes: AtomicU64,
    /// Stored routes removed because they outlived `routes.ttl_seconds`.
    pub routes_expired: AtomicU64,
    /// The failure budget's counters.
    pub breaker: crate::breaker::BreakerStats,
}

impl Default for PartitionStats {
    fn default() -> Self {
        PartitionStats {
            applied: AtomicU64::default(),
            deduplicated: AtomicU64::default(),
            batches: AtomicU64::default(),
            store_failures: AtomicU64::default(),
            rule_failures: Default::default(),
            batch_sizes: crate::metrics::Histogram::new(&crate::metrics::BATCH_BUCKETS),
            fuel_used: AtomicU64::default(),
            refused: AtomicU64::default(),
            quarantined: AtomicU64::default(),
            data_bytes: AtomicU64::default(),
            routes_expired: AtomicU64::default(),
            breaker: Default::default(),
        }
    }
}

/// What a partition thread needs to start.
pub(crate) struct PartitionSetup {
    pub id: u32,
    pub partitioner: Partitioner,
    pub sandbox: Arc<Sandbox>,
    pub rule: Arc<CompiledRule>,
    pub location: Location,
    pub durability: Durability,
    pub dedup_retention: u64,
    pub dead_letter_retention: u64,
    /// What the store trims (the log, expired routes).
    pub retention: crate::store::Retention,
    pub queue_capacity: usize,
    pub max_batch: usize,
    pub sync_interval: std::time::Duration,
    /// Decide with this native function instead of the Wasm rule (benchmarks only).
    pub native: Option<crate::native::NativeRule>,
    /// The route cache the partition confirms the routes of the requests it applied in.
    pub route_cache: Option<Arc<RouteCache>>,
}

/// The handle other threads hold to a partition.
pub struct Partition {
    /// The partition's index, `0..N`.
    pub id: u32,
    /// Name of its OS thread.
    pub thread_name: String,
    sender: Sender<Command>,
    /// Counters the thread publishes.
    pub stats: Arc<PartitionStats>,
    /// Reads the partition's routes and dedup entries without queueing behind its requests.
    pub(crate) reader: StoreReader,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

/// Why a message could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueError {
    /// The queue is at capacity.
    Full,
    /// The thread has stopped.
    Stopped,
}

/// What a starting partition's thread sends once its store is open (every record verified): a
/// reader of it, or why it could not start.
type Opened = anyhow::Result<StoreReader>;

/// A partition whose thread is opening its store (see [`Partition::spawn`]).
pub(crate) struct StartingPartition {
    id: u32,
    thread_name: String,
    sender: Sender<Command>,
    stats: Arc<PartitionStats>,
    /// Answers once the store is open.
    ready: std::sync::mpsc::Receiver<Opened>,
    thread: JoinHandle<()>,
}

impl StartingPartition {
    /// Waits until the partition is ready or failed to start.
    pub(crate) fn ready(self) -> anyhow::Result<Partition> {
        let id = self.id;
        let reader = self
            .ready
            .recv()
            .map_err(|_| anyhow::anyhow!("partition {id} thread died while starting"))??;
        Ok(Partition {
            id,
            thread_name: self.thread_name,
            sender: self.sender,
            stats: self.stats,
            reader,
            thread: std::sync::Mutex::new(Some(self.thread)),
        })
    }
}

impl Partition {
    /// Starts the thread, which opens its store and instance on its own: start every partition
    /// this way, then wait for each with [`StartingPartition::ready`], and the partitions' files
    /// are opened (and verified) in parallel.
    pub(crate) fn spawn(setup: PartitionSetup) -> anyhow::Result<StartingPartition> {
        let (sender, receiver) = crossbeam_channel::bounded(setup.queue_capacity);
        let stats = Arc::new(PartitionStats::default());
        let thread_name = format!("partition-{}", setup.id);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let id = setup.id;
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name(thread_name.clone())
            .spawn(move || {
                let opening = std::time::Instant::now();
                let opened = PartitionStore::open(
                    &setup.location,
                    setup.id,
                    setup.durability,
                    setup.dedup_retention,
                )
                .map(|store| {
                    store
                        .with_dead_letter_retention(setup.dead_letter_retention)
                        .with_retention(setup.retention)
                })
                .map_err(|e| anyhow::anyhow!("opening the store of partition {}: {e}", setup.id))
                .and_then(|store| {
                    let verified_ms = opening.elapsed().as_millis() as u64;
                    let instance = match setup.native {
                        Some(native) => Decider::Native(native),
                        None => {
                            Decider::Wasm(setup.sandbox.instantiate(setup.rule.clone(), setup.id)?)
                        }
                    };
                    tracing::debug!(
                        partition = setup.id,
                        verified_ms,
                        total_ms = opening.elapsed().as_millis() as u64,
                        "partition opened"
                    );
                    Ok((store, instance))
                });
                match opened {
                    Ok((store, instance)) => {
                        let _ = ready_tx.send(Ok(store.reader()));
                        let engine = Engine {
                            id: setup.id,
                            partitioner: setup.partitioner,
                            store,
                            decider: instance,
                            breaker: crate::breaker::Breaker::new(setup.sandbox.limits().breaker),
                            stats: thread_stats,
                            max_batch: setup.max_batch,
                            sync_interval: setup.sync_interval,
                            route_cache: setup.route_cache,
                        };
                        engine.run(&mut LocalQueue {
                            receiver,
                            idle_wake: setup.sync_interval,
                        });
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        Ok(StartingPartition {
            id,
            thread_name,
            sender,
            stats,
            ready: ready_rx,
            thread,
        })
    }

    /// Queues a command without waiting.
    pub(crate) fn try_send(&self, command: Command) -> Result<(), QueueError> {
        self.sender.try_send(command).map_err(|e| match e {
            TrySendError::Full(_) => QueueError::Full,
            TrySendError::Disconnected(_) => QueueError::Stopped,
        })
    }

    /// A sender for messages that must wait for room in the queue rather than be refused
    /// (swaps). Use it from a blocking thread.
    pub(crate) fn blocking_sender(&self) -> Sender<Command> {
        self.sender.clone()
    }

    /// Messages waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.sender.len()
    }

    /// Lets the thread finish what is queued, then waits for it to exit. Idempotent.
    pub fn stop(&self) {
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            // A blocking send: Stop must queue behind everything already accepted.
            let _ = self.sender.send(Command::Stop);
            if thread.join().is_err() {
                tracing::error!(partition = self.id, "partition thread panicked");
            }
        }
    }
}

/// What decides a partition's requests: the Wasm rule, or (benchmarks only) the reference rule
/// compiled natively into the host, to measure what the sandbox costs.
pub(crate) enum Decider {
    /// A rule component instance.
    Wasm(RuleInstance),
    /// A native function.
    Native(crate::native::NativeRule),
}

impl Decider {
    /// The version id of what decides.
    pub(crate) fn version(&self) -> &str {
        match self {
            Decider::Wasm(instance) => &instance.rule().version,
            Decider::Native(rule) => rule.version,
        }
    }

    fn handle(
        &mut self,
        current: Option<&State>,
        request: &RoutedRequest,
    ) -> Result<Outcome, RuleFailure> {
        match self {
            Decider::Wasm(instance) => instance.handle(current, request),
            Decider::Native(rule) => (rule.decide)(current, request),
        }
    }

    fn fuel_used(&self) -> u64 {
        match self {
            Decider::Wasm(instance) => instance.fuel_used(),
            Decider::Native(_) => 0,
        }
    }

    fn replace_rule(&mut self, rule: Arc<CompiledRule>) -> anyhow::Result<()> {
        match self {
            Decider::Wasm(instance) => instance.replace_rule(rule),
            Decider::Native(_) => anyhow::bail!("a native rule cannot be swapped"),
        }
    }
}

/// Where a request came from when it was not handed over in-process: a record of a Kafka topic.
/// Kept with a dead letter so an operator can find the record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordSource {
    /// The topic.
    pub topic: String,
    /// The topic partition.
    pub partition: u32,
    /// The record's offset.
    pub offset: i64,
}

/// One request of a batch as the transport hands it to the engine.
pub(crate) struct Incoming<R> {
    /// The request, or why the transport could not read one (an undecodable record); the
    /// placeholder request then carries what could be read, for the dead letter.
    pub request: RoutedRequest,
    /// Set when the transport already knows the request cannot be applied.
    pub unreadable: Option<String>,
    /// sha256 (hex) of the request's body, compared on a retry with the same id.
    pub fingerprint: String,
    /// Where the record came from, if it came from a log.
    pub source: Option<RecordSource>,
    /// Whether applying the request records its user's route: one that came with a key does; a
    /// user-only one does not (it went by the route, possibly a provisional one whose request
    /// was then refused, which it must not make durable). Kafka mode: every request.
    pub moves_route: bool,
    /// Where the answer goes.
    pub reply: R,
}

/// What one batch holds: requests in arrival order and control messages.
pub(crate) struct Inbox<R> {
    /// Requests to apply, in arrival order.
    pub requests: Vec<Incoming<R>>,
    /// Reads and control messages, handled after the batch commits (so reads see it).
    pub others: Vec<Command>,
}

impl<R> Default for Inbox<R> {
    fn default() -> Self {
        Inbox {
            requests: Vec::new(),
            others: Vec::new(),
        }
    }
}

impl<R> Inbox<R> {
    /// Whether a message taken into this batch ends it: a swap changes the rule for what
    /// follows, and nothing follows a stop.
    pub fn ended(&self) -> bool {
        self.others
            .last()
            .is_some_and(|c| matches!(c, Command::Swap { .. } | Command::Stop))
    }

    fn is_empty(&self) -> bool {
        self.requests.is_empty() && self.others.is_empty()
    }
}

/// What differs between local mode and Kafka mode: where batches come from, what must be
/// durable elsewhere before a batch commits, and where answers go. Everything else (validation,
/// dedup, the rule call, dead letters, the transaction, reads, swaps, counters) is the engine's.
pub(crate) trait Transport {
    /// Where one request's answer goes.
    type Reply;

    /// Fills `inbox` with the next batch: up to `max_batch` requests, and control messages.
    /// Returns false when the partition must stop now (nothing more will come).
    fn next_batch(&mut self, inbox: &mut Inbox<Self::Reply>, max_batch: usize) -> bool;

    /// The commit step: runs inside the batch's transaction after every request was applied,
    /// before the transaction commits. What it writes elsewhere (Kafka: the changelog) is
    /// therefore in place before the batch is; an error aborts the whole batch.
    fn before_commit(
        &mut self,
        tx: &mut crate::store::Batch<'_>,
        batch: &[Incoming<Self::Reply>],
        results: &[Applied],
    ) -> Result<(), StoreError>;

    /// Delivers the answers of a committed batch, in arrival order.
    fn answer(&mut self, answers: Vec<(Self::Reply, Result<Decision, ApplyError>)>);

    /// The batch could not be committed: nothing of it is stored. Local mode fails its
    /// requests; a log-fed transport keeps them for a retry.
    fn failed(&mut self, batch: Vec<Incoming<Self::Reply>>, error: &StoreError);
}

/// The partition engine: one thread's store, rule instance and counters, and the loop that
/// takes a batch, applies each request through the rule in arrival order inside one
/// transaction, runs the transport's commit step, commits, and only then answers. It exists
/// once; local and Kafka mode differ only in the [`Transport`] they give it.
pub(crate) struct Engine {
    /// The partition's index.
    pub id: u32,
    /// Checks that a request belongs to this partition (a log may hold records another
    /// producer put on the wrong partition).
    pub partitioner: Partitioner,
    /// The partition's store; only this thread touches it.
    pub store: PartitionStore,
    /// What decides requests.
    pub decider: Decider,
    /// The failure budget of the partition's keys.
    pub breaker: crate::breaker::Breaker,
    /// Counters this thread publishes.
    pub stats: Arc<PartitionStats>,
    /// Most requests per batch (one transaction, one commit).
    pub max_batch: usize,
    /// With durability `none`: how long a commit may stay unsynced (the window a crash loses).
    pub sync_interval: std::time::Duration,
    /// Local mode: the route cache, where the routes of applied requests are confirmed after
    /// the commit and before the answer (Kafka mode confirms routes through its routes topic).
    pub route_cache: Option<Arc<RouteCache>>,
}

impl Engine {
    /// Runs batches until the transport says stop or a Stop message is handled.
    pub(crate) fn run<T: Transport>(mut self, transport: &mut T) {
        let mut inbox = Inbox::default();
        let mut results = Vec::new();
        self.publish_quarantine();
        while transport.next_batch(&mut inbox, self.max_batch) {
            let stop = !inbox.is_empty() && self.process(transport, &mut inbox, &mut results);
            self.publish_quarantine();
            if stop {
                break;
            }
            self.breaker.tick(now_ms(), &self.stats.breaker);
            if self.store.sync_due(self.sync_interval) {
                self.sync();
            }
            if self.store.maintenance_due() {
                self.maintain();
            }
        }
        self.sync();
        tracing::debug!(partition = self.id, "partition thread stopped");
    }

    /// Issue 12 item 8: expired stored routes are removed a slice at a time between batches,
    /// and the file's size is published.
    fn maintain(&mut self) {
        let (expired, size) = self.store.maintain(now_ms());
        self.stats
            .routes_expired
            .fetch_add(expired, Ordering::Relaxed);
        self.stats
            .data_bytes
            .store(size.unwrap_or(0), Ordering::Relaxed);
    }

    /// Publishes how many damaged records the store has quarantined.
    fn publish_quarantine(&self) {
        let known = self.store.quarantine().len() as u64;
        self.stats.quarantined.store(known, Ordering::Relaxed);
    }

    /// Syncs unsynced commits (durability `none`); a failure is logged and retried later.
    fn sync(&mut self) {
        if let Err(e) = self.store.sync() {
            tracing::error!(partition = self.id, "syncing the store: {e}");
        }
    }

    /// Applies one batch, then handles its control messages. Returns whether a Stop was seen.
    fn process<T: Transport>(
        &mut self,
        transport: &mut T,
        inbox: &mut Inbox<T::Reply>,
        results: &mut Vec<Applied>,
    ) -> bool {
        if !inbox.requests.is_empty() {
            let now = now_ms();
            let (id, partitioner) = (self.id, self.partitioner);
            let (decider, breaker, stats) = (&mut self.decider, &mut self.breaker, &self.stats);
            let requests = &inbox.requests;
            results.clear();
            let committed = self.store.write_batch(|tx| {
                for incoming in requests {
                    results.push(apply_incoming(
                        tx,
                        decider,
                        breaker,
                        stats,
                        id,
                        partitioner,
                        now,
                        incoming,
                    )?);
                }
                transport.before_commit(tx, requests, results)
            });
            let mut batch = std::mem::take(&mut inbox.requests);
            match committed {
                Ok(()) => {
                    self.stats.batches.fetch_add(1, Ordering::Relaxed);
                    self.stats.batch_sizes.record(batch.len() as u64);
                    if let Some(cache) = &self.route_cache {
                        // Only now, committed, does a request move its user's route; the
                        // record order makes the request applied last win across partitions.
                        for (incoming, done) in batch.iter().zip(results.iter()) {
                            if let Some(order) = done.route_order {
                                cache.confirm(
                                    &incoming.request.user,
                                    Route {
                                        key: incoming.request.key.clone(),
                                        recorded_at_ms: incoming.request.received_at_ms,
                                    },
                                    order,
                                );
                            }
                        }
                    }
                    let mut answers = Vec::with_capacity(batch.len());
                    for (incoming, done) in batch.drain(..).zip(results.drain(..)) {
                        match (&done.result, done.applied) {
                            (_, true) => self.stats.applied.fetch_add(1, Ordering::Relaxed),
                            (Ok(_), false) => {
                                self.stats.deduplicated.fetch_add(1, Ordering::Relaxed)
                            }
                            (Err(ApplyError::Invalid(_)), false) => {
                                self.stats.refused.fetch_add(1, Ordering::Relaxed)
                            }
                            (Err(_), false) => 0,
                        };
                        answers.push((incoming.reply, done.result));
                    }
                    transport.answer(answers);
                    // The emptied vector goes back with its capacity: a new one per batch grew
                    // by doublings into freshly faulted pages (2.4% of the server's CPU).
                    inbox.requests = batch;
                }
                Err(e) => {
                    tracing::error!(
                        partition = self.id,
                        "batch failed, nothing acknowledged: {e}"
                    );
                    self.stats
                        .store_failures
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    results.clear();
                    transport.failed(batch, &e);
                }
            }
        }

        let mut stop = false;
        for command in inbox.others.drain(..) {
            match command {
                Command::Apply { .. } => unreachable!("applies are sorted into requests"),
                Command::ReadState { key, reply } => {
                    let _ = reply.send(self.store.state(&key));
                }
                Command::DeadLetters {
                    after,
                    limit,
                    reply,
                } => {
                    let _ = reply.send(self.store.dead_letters(after, limit));
                }
                Command::MarkResubmitted { seq, mark, reply } => {
                    let _ = reply.send(self.store.mark_resubmitted(seq, mark));
                }
                Command::Swap { rule, reply } => {
                    let started = std::time::Instant::now();
                    let version = rule.version.clone();
                    let result = self.decider.replace_rule(rule).map(|()| started.elapsed());
                    if result.is_ok() {
                        // The new rule may not fail where the old one did.
                        self.breaker.reset(&self.stats.breaker);
                    }
                    match &result {
                        Ok(pause) => tracing::info!(
                            partition = self.id,
                            rule = crate::sandbox::short_version(&version),
                            pause_us = pause.as_micros() as u64,
                            "rule swapped"
                        ),
                        Err(e) => tracing::error!(partition = self.id, "rule swap failed: {e:#}"),
                    }
                    let _ = reply.send(result.map_err(|e| format!("{e:#}")));
                }
                Command::Snapshot { reply } => {
                    let _ = reply.send(self.store.snapshot());
                }
                Command::Stop => stop = true,
            }
        }
        stop
    }
}

/// Local mode's transport: the partition's bounded in-process queue, and oneshot replies.
struct LocalQueue {
    receiver: Receiver<Command>,
    /// How long to wait for a message before handing the engine an empty batch, so an idle
    /// partition still syncs its unsynced commits on time.
    idle_wake: std::time::Duration,
}

impl Transport for LocalQueue {
    type Reply = oneshot::Sender<Result<Decision, ApplyError>>;

    fn next_batch(&mut self, inbox: &mut Inbox<Self::Reply>, max_batch: usize) -> bool {
        let first = match self.receiver.recv_timeout(self.idle_wake) {
            Ok(first) => first,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => return true,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return false,
        };
        let mut taken = 1;
        inbox.push(first);
        while taken < max_batch && !inbox.ended() {
            match self.receiver.try_recv() {
                Ok(command) => {
                    inbox.push(command);
                    taken += 1;
                }
                Err(_) => break,
            }
        }
        true
    }

    fn before_commit(
        &mut self,
        _tx: &mut crate::store::Batch<'_>,
        _batch: &[Incoming<Self::Reply>],
        _results: &[Applied],
    ) -> Result<(), StoreError> {
        // The local store's own commit (fsync with durability "sync") is the whole commit.
        Ok(())
    }

    fn answer(&mut self, answers: Vec<(Self::Reply, Result<Decision, ApplyError>)>) {
        for (reply, result) in answers {
            let _ = reply.send(result);
        }
    }

    fn failed(&mut self, batch: Vec<Incoming<Self::Reply>>, error: &StoreError) {
        for incoming in batch {
            let _ = incoming.reply.send(Err(ApplyError::Store(error.clone())));
        }
    }
}

impl Inbox<oneshot::Sender<Result<Decision, ApplyError>>> {
    fn push(&mut self, command: Command) {
        match command {
            Command::Apply {
                request,
                fingerprint,
                moves_route,
                reply,
            } => self.requests.push(Incoming {
                request,
                unreadable: None,
                fingerprint,
                source: None,
                moves_route,
                reply,
            }),
            other => self.others.push(other),
        }
    }
}

/// The result of one request in a batch, before the batch commits.
pub(crate) struct Applied {
    pub(crate) result: Result<Decision, ApplyError>,
    /// Whether the rule ran and its effect is in the batch (not a dedup answer or a failure).
    pub(crate) applied: bool,
    /// The record order the request's route was stored under, when it was applied.
    pub(crate) route_order: Option<u64>,
}

/// Checks a routed request the way the HTTP front end checks a submitted one, and that it
/// belongs to this partition: a log can hold records from producers that are not Turnstile.
pub(crate) fn check_routed(
    request: &RoutedRequest,
    partitioner: Partitioner,
    partition: u32,
) -> Result<(), ApplyError> {
    crate::runtime::validate_fields(
        &request.kind,
        &request.user,
        Some(&request.key),
        Some(&request.id),
        Some(&request.payload),
    )
    .map_err(|e| ApplyError::Invalid(e.to_string()))?;
    let owner = partitioner.partition(&request.key);
    if owner != partition {
        return Err(ApplyError::Invalid(format!(
            "key `{}` belongs to partition {owner}, not {partition}: the record was produced to the wrong partition (use Turnstile's partitioner)",
            request.key
        )));
    }
    Ok(())
}

/// Applies one incoming request: a request the transport could not read, or one that fails
/// the checks, is dead-lettered and refused; anything else goes through [`apply_one`].
#[allow(clippy::too_many_arguments)]
fn apply_incoming<R>(
    tx: &mut crate::store::Batch<'_>,
    decider: &mut Decider,
    breaker: &mut crate::breaker::Breaker,
    stats: &PartitionStats,
    partition: u32,
    partitioner: Partitioner,
    now: u64,
    incoming: &Incoming<R>,
) -> Result<Applied, StoreError> {
    let refused = match &incoming.unreadable {
        Some(reason) => Some(ApplyError::Invalid(reason.clone())),
        None => check_routed(&incoming.request, partitioner, partition).err(),
    };
    if let Some(error) = refused {
        // The id and the reason may come from another producer's record: bounded and escaped.
        let id = crate::sandbox::escape_untrusted(&incoming.request.id, 128);
        let reason = crate::sandbox::escape_untrusted(&error.to_string(), 512);
        tracing::warn!(partition, %id, source = ?incoming.source, "request refused: {reason}");
        tx.dead_letter(DeadLetter {
            seq: 0,
            partition,
            request: incoming.request.clone(),
            failure: crate::store::Failure::refused(&error),
            rule_version: decider.version().to_string(),
            failed_at_ms: now,
            source: incoming.source.clone(),
            resubmitted: None,
        })?;
        return Ok(Applied {
            result: Err(error),
            applied: false,
            route_order: None,
        });
    }
    // Issue 12 item 10: a request that needs a damaged record is refused alone, the rest of the
    // batch goes on.
    if let Some(damage) = tx.damaged_record_for(&incoming.request)? {
        return Ok(Applied {
            result: Err(ApplyError::Store(damage)),
            applied: false,
            route_order: None,
        });
    }
    if let Some(source) = &incoming.source {
        // A log-fed partition numbers its decisions by the record's offset, so the numbers do
        // not restart when the partition moves to another process.
        tx.set_next_log_seq(source.offset as u64 + 1);
    }
    apply_one(
        tx,
        decider,
        breaker,
        stats,
        partition,
        now,
        &incoming.request,
        &incoming.fingerprint,
        incoming.source.as_ref(),
        incoming.moves_route,
    )
}

/// Applies one request inside the batch's transaction and returns the reply to send after the
/// commit. A store error aborts the whole batch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply_one(
    tx: &mut crate::store::Batch<'_>,
    instance: &mut Decider,
    breaker: &mut crate::breaker::Breaker,
    stats: &PartitionStats,
    partition: u32,
    now: u64,
    request: &RoutedRequest,
    fingerprint: &str,
    source: Option<&RecordSource>,
    moves_route: bool,
) -> Result<Applied, StoreError> {
    if request.idempotent
        && let Some(entry) = tx.dedup(&request.id)?
    {
        let result = if entry.fingerprint == fingerprint {
            Ok(entry.decision)
        } else {
            Err(ApplyError::IdConflict(request.id.clone()))
        };
        return Ok(Applied {
            result,
            applied: false,
            route_order: None,
        });
    }

    // A quarantined key is refused before anything is stored: its failures must not cost the
    // partition a rule call, a dead letter or a write each.
    if let Err(quarantined) = breaker.admit(&request.key, now, &stats.breaker) {
        return Ok(Applied {
            result: Err(ApplyError::Quarantined {
                key: request.key.clone(),
                retry_after_ms: quarantined.retry_after_ms,
            }),
            applied: false,
            route_order: None,
        });
    }

    let current = tx.state(&request.key)?;
    let rule_version = instance.version().to_string();
    let decided = instance.handle(current.as_ref(), request);
    breaker.record(&request.key, decided.is_err(), now, &stats.breaker);
    stats
        .fuel_used
        .fetch_add(instance.fuel_used(), Ordering::Relaxed);
    let outcome = match decided {
        Ok(outcome) => outcome,
        Err(failure) => {
            stats.rule_failures[FailureKind::ALL
                .iter()
                .position(|k| *k == failure.kind)
                .expect("every kind is listed")]
            .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(partition, id = %request.id, code = failure.kind.code(), "rule failed: {}", failure.message);
            tx.dead_letter(DeadLetter {
                seq: 0,
                partition,
                request: request.clone(),
                failure: crate::store::Failure::rule(&failure),
                rule_version,
                failed_at_ms: now,
                source: source.cloned(),
                resubmitted: None,
            })?;
            return Ok(Applied {
                result: Err(ApplyError::Rule(failure)),
                applied: false,
                route_order: None,
            });
        }
    };

    let (verdict, state_version) = match &outcome {
        Outcome::Transition { status, data } => {
            let state = State {
                status: status.clone(),
                user: current
                    .as_ref()
                    .map_or_else(|| request.user.clone(), |s| s.user.clone()),
                data: data.clone(),
                version: current.as_ref().map_or(0, |s| s.version) + 1,
                rule_version: rule_version.clone(),
                updated_at_ms: request.received_at_ms,
            };
            tx.put_state(&request.key, &state)?;
            let version = state.version;
            (Verdict::Transition(state), version)
        }
        Outcome::Reject { reason } => (
            Verdict::Reject(reason.clone()),
            current.as_ref().map_or(0, |s| s.version),
        ),
    };
    let seq = tx.append_log(LogEntry {
        seq: 0,
        request: request.clone(),
        outcome,
        state_version,
        rule_version: rule_version.clone(),
        applied_at_ms: now,
    })?;
    let decision = Decision {
        id: request.id.clone(),
        key: request.key.clone(),
        partition,
        seq,
        verdict,
        rule_version,
    };
    // The route is stored with the applied request, in its transaction (the cache recorded it
    // provisionally before routing, claim 5); a request the rule failed on moves no route.
    let route_order = if moves_route {
        Some(tx.record_route(
            &request.user,
            &Route {
                key: request.key.clone(),
                recorded_at_ms: request.received_at_ms,
            },
        )?)
    } else {
        None
    };
    if request.idempotent {
        tx.put_dedup(
            &request.id,
            &DedupEntry {
                fingerprint: fingerprint.to_string(),
                decision: decision.clone(),
            },
        )?;
    }
    Ok(Applied {
        result: Ok(decision),
        applied: true,
        route_order,
    })
}
