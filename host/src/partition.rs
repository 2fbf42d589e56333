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
use crate::router::Route;
use crate::sandbox::{CompiledRule, FailureKind, RuleFailure, RuleInstance, Sandbox};
use crate::store::{DeadLetter, DedupEntry, Location, LogEntry, PartitionStore, StoreError};

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
}

/// A message to a partition thread.
pub(crate) enum Command {
    /// Apply a request and reply with its decision once it is durable.
    Apply {
        request: RoutedRequest,
        /// sha256 (hex) of the request's body, compared on a retry with the same client id.
        fingerprint: String,
        reply: oneshot::Sender<Result<Decision, ApplyError>>,
    },
    /// Read a key's committed state.
    ReadState {
        key: String,
        reply: oneshot::Sender<Result<Option<State>, StoreError>>,
    },
    /// Read the route this partition holds for a user.
    ReadRoute {
        user: String,
        reply: oneshot::Sender<Result<Option<Route>, StoreError>>,
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
    pub rule_failures: [AtomicU64; 5],
    /// Requests per committed batch.
    pub batch_sizes: crate::metrics::Histogram,
    /// Fuel the rule used, summed over calls.
    pub fuel_used: AtomicU64,
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
        }
    }
}

/// What a partition thread needs to start.
pub(crate) struct PartitionSetup {
    pub id: u32,
    pub sandbox: Arc<Sandbox>,
    pub rule: Arc<CompiledRule>,
    pub location: Location,
    pub durability: Durability,
    pub dedup_retention: u64,
    pub queue_capacity: usize,
    pub max_batch: usize,
    /// Decide with this native function instead of the Wasm rule (benchmarks only).
    pub native: Option<crate::native::NativeRule>,
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

impl Partition {
    /// Starts the thread, opens its store and instance, and returns once it is ready (with the
    /// routes its store holds) or failed to start.
    pub(crate) fn start(
        setup: PartitionSetup,
    ) -> anyhow::Result<(Partition, Vec<(String, Route)>)> {
        let (sender, receiver) = crossbeam_channel::bounded(setup.queue_capacity);
        let stats = Arc::new(PartitionStats::default());
        let thread_name = format!("partition-{}", setup.id);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let id = setup.id;
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name(thread_name.clone())
            .spawn(move || {
                let opened = PartitionStore::open(
                    &setup.location,
                    setup.id,
                    setup.durability,
                    setup.dedup_retention,
                )
                .map_err(|e| anyhow::anyhow!("opening the store of partition {}: {e}", setup.id))
                .and_then(|mut store| {
                    let routes = store.routes()?;
                    let instance = match setup.native {
                        Some(native) => Decider::Native(native),
                        None => {
                            Decider::Wasm(setup.sandbox.instantiate(setup.rule.clone(), setup.id)?)
                        }
                    };
                    Ok((store, instance, routes))
                });
                match opened {
                    Ok((store, instance, routes)) => {
                        let _ = ready_tx.send(Ok(routes));
                        let worker = Worker {
                            id: setup.id,
                            store,
                            instance,
                            stats: thread_stats,
                            max_batch: setup.max_batch,
                        };
                        worker.run(receiver);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        let routes = ready_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("partition {id} thread died while starting"))??;
        Ok((
            Partition {
                id,
                thread_name,
                sender,
                stats,
                thread: std::sync::Mutex::new(Some(thread)),
            },
            routes,
        ))
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

/// The thread's own state: nothing here is shared.
struct Worker {
    id: u32,
    store: PartitionStore,
    instance: Decider,
    stats: Arc<PartitionStats>,
    max_batch: usize,
}

/// The batch being applied, kept between batches so its vectors are allocated once.
#[derive(Default)]
struct BatchBuffers {
    /// Requests to apply, in queue order, each with its fingerprint.
    requests: Vec<(RoutedRequest, String)>,
    /// Where each request's answer goes; same order as `requests`.
    replies: Vec<oneshot::Sender<Result<Decision, ApplyError>>>,
    /// Each request's answer, sent only after the commit; same order as `requests`.
    results: Vec<Applied>,
    /// Reads and control messages, handled after the commit.
    others: Vec<Command>,
}

/// The result of one request in a batch, before the batch commits.
pub(crate) struct Applied {
    pub(crate) result: Result<Decision, ApplyError>,
    /// Whether the rule ran and its effect is in the batch (not a dedup answer or a failure).
    applied: bool,
}

impl Worker {
    fn run(mut self, receiver: Receiver<Command>) {
        let mut buffers = BatchBuffers::default();
        while let Ok(first) = receiver.recv() {
            let mut taken = 1;
            let mut boundary = first.ends_batch();
            buffers.push(first);
            while taken < self.max_batch && !boundary {
                match receiver.try_recv() {
                    Ok(command) => {
                        boundary = command.ends_batch();
                        buffers.push(command);
                        taken += 1;
                    }
                    Err(_) => break,
                }
            }
            if self.process(&mut buffers) {
                break;
            }
        }
        tracing::debug!(partition = self.id, "partition thread stopped");
    }

    /// Applies one batch: requests in queue order in one transaction, replies after the commit,
    /// then reads (from committed data). Returns whether a Stop was seen.
    fn process(&mut self, buffers: &mut BatchBuffers) -> bool {
        if !buffers.requests.is_empty() {
            let now = now_ms();
            let (id, instance, stats) = (self.id, &mut self.instance, &self.stats);
            let (requests, results) = (&buffers.requests, &mut buffers.results);
            let committed = self.store.write_batch(|tx| {
                for (request, fingerprint) in requests {
                    results.push(apply_one(
                        tx,
                        instance,
                        stats,
                        id,
                        now,
                        request,
                        fingerprint,
                    )?);
                }
                Ok(())
            });
            match committed {
                Ok(()) => {
                    self.stats.batches.fetch_add(1, Ordering::Relaxed);
                    self.stats.batch_sizes.record(buffers.requests.len() as u64);
                    for (reply, done) in buffers.replies.drain(..).zip(buffers.results.drain(..)) {
                        if done.applied {
                            self.stats.applied.fetch_add(1, Ordering::Relaxed);
                        } else if done.result.is_ok() {
                            self.stats.deduplicated.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = reply.send(done.result);
                    }
                }
                Err(e) => {
                    tracing::error!(
                        partition = self.id,
                        "batch failed, nothing acknowledged: {e}"
                    );
                    self.stats
                        .store_failures
                        .fetch_add(buffers.replies.len() as u64, Ordering::Relaxed);
                    buffers.results.clear();
                    for reply in buffers.replies.drain(..) {
                        let _ = reply.send(Err(ApplyError::Store(e.clone())));
                    }
                }
            }
            buffers.requests.clear();
        }

        let mut stop = false;
        for command in buffers.others.drain(..) {
            match command {
                Command::Apply { .. } => unreachable!("applies are sorted into requests"),
                Command::ReadState { key, reply } => {
                    let _ = reply.send(self.store.state(&key));
                }
                Command::ReadRoute { user, reply } => {
                    let _ = reply.send(self.store.route(&user));
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
                    let result = self.instance.replace_rule(rule).map(|()| started.elapsed());
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
                Command::Stop => stop = true,
            }
        }
        stop
    }
}

impl Command {
    /// Whether the batch must end after this message: a swap changes the rule for what follows,
    /// and nothing follows a stop.
    fn ends_batch(&self) -> bool {
        matches!(self, Command::Swap { .. } | Command::Stop)
    }
}

impl BatchBuffers {
    fn push(&mut self, command: Command) {
        match command {
            Command::Apply {
                request,
                fingerprint,
                reply,
            } => {
                self.requests.push((request, fingerprint));
                self.replies.push(reply);
            }
            other => self.others.push(other),
        }
    }
}

/// Applies one request inside the batch's transaction and returns the reply to send after the
/// commit. A store error aborts the whole batch.
pub(crate) fn apply_one(
    tx: &mut crate::store::Batch<'_>,
    instance: &mut Decider,
    stats: &PartitionStats,
    partition: u32,
    now: u64,
    request: &RoutedRequest,
    fingerprint: &str,
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
        });
    }

    // Claim 5: the route is stored with the request, before the rule decides.
    tx.record_route(
        &request.user,
        &Route {
            key: request.key.clone(),
            recorded_at_ms: request.received_at_ms,
        },
    )?;

    let current = tx.state(&request.key)?;
    let rule_version = instance.version().to_string();
    let decided = instance.handle(current.as_ref(), request);
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
                failure: failure.clone(),
                rule_version,
                failed_at_ms: now,
                resubmitted: None,
            })?;
            return Ok(Applied {
                result: Err(ApplyError::Rule(failure)),
                applied: false,
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
    })
}
