//! The runtime: routing plus the partition threads, behind one library API.
//!
//! [`Runtime::submit`] is the patent's method end to end: check the request, record the route
//! (claim 5) or resolve it (claim 3), pick the partition `abs(hash(key)) % N` (claim 4), queue the
//! request to that partition's single thread, and wait for the decision, which comes only after
//! it is durable. The HTTP API, the benchmark and the rule test toolkit all drive this API.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::config::Config;
use crate::install::{PartitionThreads, RuleControl};
use crate::model::{Decision, Request, RoutedRequest, State, now_ms};
use crate::partition::{ApplyError, Command, Partition, PartitionSetup, QueueError};
use crate::reload::{InstallError, InstallReport, RuleRegistry};
use crate::router::{Partitioner, Route, RouteCache};
use crate::sandbox::{REFERENCE_RULE, RuleFailure, RuleLimits, Sandbox};
use crate::store::{self, DeadLetter, Location, StoreError, StoreReader};

/// Most store lookups (routes missing from the cache, ids of user-only requests) running at
/// once; more wait for a turn.
const CONCURRENT_LOOKUPS: usize = 8;

/// Longest accepted kind, user, key or id, in bytes.
pub const MAX_FIELD_BYTES: usize = 1024;

/// Why a request got no decision. Each variant is one API error code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    /// The request is malformed; it reached no partition.
    #[error("{0}")]
    Invalid(String),
    /// The request has no key and the user has no live route.
    #[error(
        "no route for user `{0}`: send a request with a key first (routes expire after routes.ttl_seconds)"
    )]
    UnknownRoute(String),
    /// The partition's queue is full.
    #[error("partition {0} is at capacity; retry shortly")]
    Backpressure(u32),
    /// The runtime is stopping.
    #[error("the runtime is shutting down")]
    ShuttingDown,
    /// The rule failed on this request.
    #[error("{0}")]
    Rule(RuleFailure),
    /// The id was used before for another request.
    #[error(
        "request id `{0}` was already used for a different request (kind, key, user or payload differ); use a new id for a new request"
    )]
    IdConflict(String),
    /// The store failed; nothing was applied.
    #[error("{0}")]
    Store(String),
    /// The partition's file is damaged: nothing was applied, and a retry cannot help until the
    /// file is restored (see [`crate::store::StoreErrorKind::Damaged`]).
    #[error("{0}")]
    Damaged(String),
    /// A record the request needs is damaged (quarantined); nothing was applied, and a retry
    /// cannot help until the record is repaired (see [`crate::store::Quarantine`]).
    #[error("{0}")]
    RecordDamaged(String),
    /// Kafka mode: no outcome came back in time. The request may still be applied; retry it
    /// with the same id to learn its answer.
    #[error("{0}")]
    Timeout(String),
    /// The key's rule failures went over the budget; retry after `retry_after_ms`.
    #[error("{message}")]
    Quarantined {
        /// What happened, for the client.
        message: String,
        /// How long until a request of the key is let through again.
        retry_after_ms: u64,
    },
    /// Kafka mode: the broker died (every connection closed); this process suspended its
    /// partitions until it answers. Nothing was produced; retry.
    #[error("{0}")]
    ClusterUnavailable(String),
    /// Kafka mode: the broker came back without this cluster's data; this process stopped
    /// serving until an operator restarts it. Nothing was produced.
    #[error("{0}")]
    ClusterDataLost(String),
}

impl SubmitError {
    /// The stable error code the API returns.
    pub fn code(&self) -> &'static str {
        match self {
            SubmitError::Invalid(_) => "invalid_request",
            SubmitError::UnknownRoute(_) => "unknown_route",
            SubmitError::Backpressure(_) => "backpressure",
            SubmitError::ShuttingDown => "shutting_down",
            SubmitError::Rule(f) => f.kind.code(),
            SubmitError::IdConflict(_) => "id_conflict",
            SubmitError::Store(_) => "store_unavailable",
            SubmitError::Damaged(_) => "store_damaged",
            SubmitError::RecordDamaged(_) => "record_damaged",
            SubmitError::Timeout(_) => "outcome_timeout",
            SubmitError::Quarantined { .. } => "rule_quarantined",
            SubmitError::ClusterUnavailable(_) => "cluster_unavailable",
            SubmitError::ClusterDataLost(_) => "cluster_data_lost",
        }
    }
}

impl crate::store::ErrorCode for SubmitError {
    fn error_code(&self) -> &'static str {
        self.code()
    }
}

impl From<ApplyError> for SubmitError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Rule(f) => SubmitError::Rule(f),
            ApplyError::IdConflict(id) => SubmitError::IdConflict(id),
            ApplyError::Store(e) if e.is_damage() => SubmitError::Damaged(e.message),
            ApplyError::Store(e) if e.is_record_damage() => SubmitError::RecordDamaged(e.message),
            e @ ApplyError::Store(_) => SubmitError::Store(e.to_string()),
            ApplyError::Invalid(message) => SubmitError::Invalid(message),
            e @ ApplyError::Quarantined { retry_after_ms, .. } => SubmitError::Quarantined {
                message: e.to_string(),
                retry_after_ms,
            },
        }
    }
}

/// Why a read could not be answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    /// The partition's queue is full.
    #[error("partition {0} is at capacity; retry shortly")]
    Backpressure(u32),
    /// The runtime is stopping.
    #[error("the runtime is shutting down")]
    ShuttingDown,
    /// The store failed.
    #[error("the partition's store failed: {0}")]
    Store(String),
    /// The partition's file is damaged.
    #[error("{0}")]
    Damaged(String),
    /// The record read is damaged (quarantined).
    #[error("{0}")]
    RecordDamaged(String),
}

impl From<StoreError> for ReadError {
    fn from(e: StoreError) -> Self {
        if e.is_damage() {
            ReadError::Damaged(e.message)
        } else if e.is_record_damage() {
            ReadError::RecordDamaged(e.message)
        } else {
            ReadError::Store(e.message)
        }
    }
}

impl From<StoreError> for SubmitError {
    fn from(e: StoreError) -> Self {
        if e.is_damage() {
            SubmitError::Damaged(e.message)
        } else if e.is_record_damage() {
            SubmitError::RecordDamaged(e.message)
        } else {
            SubmitError::Store(e.message)
        }
    }
}

/// A user's route with the state of its key.
#[derive(Debug, Clone)]
pub struct UserView {
    /// The key the user's route points to.
    pub key: String,
    /// Its partition.
    pub partition: u32,
    /// When the route was recorded.
    pub recorded_at_ms: u64,
    /// The key's state, if it has one.
    pub state: Option<State>,
}

/// What `GET /v1/partitions` shows of one partition.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionInfo {
    /// Index.
    pub id: u32,
    /// OS thread name.
    pub thread: String,
    /// Messages waiting in its queue.
    pub queue_depth: usize,
    /// Requests applied (transitions + rejects).
    pub processed: u64,
    /// Requests answered from the dedup table.
    pub deduplicated: u64,
    /// Batches committed.
    pub batches: u64,
    /// Requests failed because their batch could not be stored.
    pub store_failures: u64,
    /// Requests refused before the rule saw them, and dead-lettered.
    pub refused: u64,
    /// Damaged records quarantined in its file (requests that need one answer
    /// `record_damaged`).
    pub quarantined_records: u64,
    /// Size of its file in bytes, sampled about once a second; none in memory.
    pub data_bytes: Option<u64>,
    /// Rule failures by error code.
    pub rule_failures: std::collections::BTreeMap<&'static str, u64>,
    /// The failure budget: keys quarantined now, breakers opened, requests refused.
    pub breaker: crate::breaker::BreakerView,
    /// Version id of the rule it runs.
    pub rule_version: String,
}

/// A partition's progress counters, as `/readyz` samples them.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// The partition.
    pub partition: u32,
    /// Batches committed.
    pub batches: u64,
    /// Batches whose commit failed (a full or failing disk).
    pub failed_batches: u64,
    /// Requests queued.
    pub queued: usize,
}

/// The running system: router, route cache, partition threads.
pub struct Runtime {
    partitioner: Partitioner,
    /// Shared with the partition threads, which confirm the routes of the requests they apply.
    routes: Arc<RouteCache>,
    partitions: Vec<Partition>,
    /// Bounds the store reads that serve lookups (a route missing from the cache, a user-only
    /// request's id): a flood of them, e.g. of unknown users, waits here and never reaches the
    /// partitions' write queues.
    lookups: Arc<tokio::sync::Semaphore>,
    /// Rule versions and who runs which; locked only for short bookkeeping.
    rules: RuleControl,
    /// Makes ids for requests that come without one.
    ids: RequestIds,
    /// Request counts and latency, for `/metrics`.
    metrics: crate::metrics::RequestMetrics,
    location: Location,
    /// Loads the stored routes into the cache after the start; stopped at shutdown.
    warmup: RouteWarmup,
}

/// Fills the route cache with the routes the partitions' stores hold, on its own thread, after
/// the runtime is ready: with a million users this takes longer than everything else the start
/// does, and nothing needs it before the first request, since a route missing from the cache is
/// read from the stores ([`Runtime::resolve_route`]). Each route enters the cache with its
/// record order ([`RouteCache::confirm`]), so one a request moved meanwhile is never set back.
struct RouteWarmup {
    /// Set at shutdown: the walk ends at its next page.
    stop: Arc<AtomicBool>,
    /// Set when the walk is over (every stored route is in the cache, or the walk gave up).
    done: Arc<AtomicBool>,
    /// The walking thread, joined at shutdown so that no read of a store outlives the runtime
    /// (redb refuses to open a file a live handle holds, and a restart in the same process
    /// opens them again).
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Routes read per store read transaction while warming the cache.
const WARMUP_PAGE: usize = 4096;

impl RouteWarmup {
    fn start(routes: Arc<RouteCache>, readers: Vec<StoreReader>) -> anyhow::Result<RouteWarmup> {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::Builder::new()
                .name("route-warmup".into())
                .spawn(move || {
                    warm_routes(&routes, &readers, &stop);
                    done.store(true, Ordering::Release);
                })
                .context("spawning the route cache warm-up")?
        };
        Ok(RouteWarmup {
            stop,
            done,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

fn warm_routes(routes: &RouteCache, readers: &[StoreReader], stop: &AtomicBool) {
    let started = std::time::Instant::now();
    let mut loaded = 0u64;
    for (partition, reader) in readers.iter().enumerate() {
        let mut after: Option<String> = None;
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let page = match reader.routes_page(after.as_deref(), WARMUP_PAGE) {
                Ok(page) => page,
                Err(e) => {
                    // Only a warm-up: the routes it leaves out are read from the store when
                    // asked for.
                    tracing::warn!(partition, "loading the stored routes into the cache: {e}");
                    break;
                }
            };
            let now = now_ms();
            for (user, stored) in &page {
                if routes.is_live(stored.route.recorded_at_ms, now) {
                    routes.confirm(user, stored.route.clone(), stored.order);
                    loaded += 1;
                }
            }
            match page.into_iter().last() {
                Some((user, _)) => after = Some(user),
                None => break,
            }
        }
    }
    tracing::info!(
        routes = loaded,
        took_ms = started.elapsed().as_millis() as u64,
        "route cache warmed from the stores"
    );
}

impl Runtime {
    /// Starts a runtime: compiles the rule (`rule_bytes`, else `config.rule.path`, else the
    /// embedded reference rule), checks the data dir, and starts one thread per partition.
    pub fn start(config: &Config, rule_bytes: Option<Vec<u8>>) -> anyhow::Result<Runtime> {
        config.validate()?;
        let sandbox = Sandbox::new(RuleLimits::from(&config.rule)).context("starting wasmtime")?;
        Runtime::start_in(config, sandbox, rule_bytes)
    }

    /// [`Runtime::start`] in an existing sandbox, whose limits must be the configuration's. Lets
    /// a caller that starts many runtimes (`turnstile test`) share one engine.
    pub fn start_in(
        config: &Config,
        sandbox: Arc<Sandbox>,
        rule_bytes: Option<Vec<u8>>,
    ) -> anyhow::Result<Runtime> {
        Runtime::start_with(config, sandbox, rule_bytes, None)
    }

    /// A runtime whose partitions decide with a native function instead of a Wasm rule: the
    /// benchmark's baseline for what the sandbox costs. Everything else (routing, queues, group
    /// commit, store) is the same.
    pub fn start_native(
        config: &Config,
        rule: crate::native::NativeRule,
    ) -> anyhow::Result<Runtime> {
        config.validate()?;
        let sandbox = Sandbox::new(RuleLimits::from(&config.rule)).context("starting wasmtime")?;
        Runtime::start_with(config, sandbox, None, Some(rule))
    }

    fn start_with(
        config: &Config,
        sandbox: Arc<Sandbox>,
        rule_bytes: Option<Vec<u8>>,
        native: Option<crate::native::NativeRule>,
    ) -> anyhow::Result<Runtime> {
        let (bytes, origin) = match (rule_bytes, &config.rule.path) {
            (Some(bytes), _) => (bytes, "the given rule".to_string()),
            (None, Some(path)) => (
                std::fs::read(path).with_context(|| format!("reading rule {}", path.display()))?,
                format!("rule {}", path.display()),
            ),
            (None, None) => (
                REFERENCE_RULE.to_vec(),
                "the embedded reference rule".to_string(),
            ),
        };
        let initial = sandbox
            .compile_shared(&bytes)
            .with_context(|| format!("loading {origin}"))?;

        let n = config.partitions.count();
        let partitioner = Partitioner::new(config.partitions.hash, n);
        let location = match &config.store.data_dir {
            Some(dir) => Location::Dir(store::prepare_dir(dir, n, config.partitions.hash)?),
            None => Location::Memory,
        };
        let (registry, partition_rules) = RuleRegistry::open(
            sandbox.clone(),
            config.store.data_dir.as_deref(),
            initial,
            &bytes,
            n,
        )?;

        let routes = Arc::new(RouteCache::new(
            config.routes.capacity,
            config.routes.ttl_seconds * 1000,
        ));
        let mut partitions = Vec::with_capacity(n as usize);
        let mut starting = Vec::with_capacity(n as usize);
        for id in 0..n {
            starting.push(Partition::spawn(PartitionSetup {
                id,
                partitioner,
                sandbox: sandbox.clone(),
                rule: partition_rules[id as usize].clone(),
                location: location.clone(),
                durability: config.store.durability,
                dedup_retention: config.store.dedup_retention,
                dead_letter_retention: config.store.dead_letter_retention,
                retention: crate::store::Retention::of(config),
                queue_capacity: config.partitions.queue_capacity,
                max_batch: config.partitions.max_batch,
                sync_interval: std::time::Duration::from_millis(config.store.flush_interval_ms),
                native,
                route_cache: Some(routes.clone()),
            })?);
        }
        // Every partition opens (and verifies) its file at once; then each is waited for in
        // order.
        let opening = std::time::Instant::now();
        for starting in starting {
            partitions.push(starting.ready()?);
        }
        tracing::debug!(
            took_ms = opening.elapsed().as_millis() as u64,
            "every partition open"
        );
        let warmup = RouteWarmup::start(
            routes.clone(),
            partitions.iter().map(|p| p.reader.clone()).collect(),
        )?;
        tracing::info!(
            partitions = n,
            hash = config.partitions.hash.name(),
            rule = crate::sandbox::short_version(&partition_rules[0].version),
            store = ?location,
            "runtime started"
        );
        Ok(Runtime {
            partitioner,
            routes,
            partitions,
            lookups: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_LOOKUPS)),
            rules: RuleControl::new(registry, n),
            ids: RequestIds::new(format!("{:08x}", rand::random::<u32>())),
            metrics: crate::metrics::RequestMetrics::default(),
            location,
            warmup,
        })
    }

    /// The partitioner.
    pub fn partitioner(&self) -> Partitioner {
        self.partitioner
    }

    /// Where the partitions' data lives.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Backup (issue 12 item 11): runs `copy_rules` and then takes one snapshot per partition,
    /// each between two batches and after everything queued before, all while the rule
    /// registry is locked (no install or rollback in between), so rules and states match.
    pub fn snapshots(
        &self,
        copy_rules: &mut dyn FnMut(&RuleRegistry) -> anyhow::Result<()>,
    ) -> anyhow::Result<Vec<redb::ReadTransaction>> {
        let registry = self.registry();
        copy_rules(&registry)?;
        let mut waiting = Vec::with_capacity(self.partitions.len());
        for partition in &self.partitions {
            let (reply, answer) = tokio::sync::oneshot::channel();
            partition
                .blocking_sender()
                .send(crate::partition::Command::Snapshot { reply })
                .map_err(|_| anyhow::anyhow!("partition {} has stopped", partition.id))?;
            waiting.push((partition.id, answer));
        }
        waiting
            .into_iter()
            .map(|(id, answer)| {
                answer
                    .blocking_recv()
                    .map_err(|_| anyhow::anyhow!("partition {id} has stopped"))?
                    .map_err(|e| crate::backup::snapshot_error(id, e))
            })
            .collect()
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, RuleRegistry> {
        self.rules.registry()
    }

    /// The rule version each partition runs.
    pub fn running_versions(&self) -> Vec<String> {
        self.registry().running().to_vec()
    }

    /// The history of installs and rollbacks, oldest first.
    pub fn rule_history(&self) -> Vec<crate::reload::HistoryEntry> {
        self.registry().history().to_vec()
    }

    /// Compiles and checks `bytes` (off the partition threads), then switches `partitions`
    /// (all when `None`, or a canary subset given as `"0,3"`) to it between two requests.
    /// Answers once every target partition runs it.
    ///
    /// `label` (e.g. a git sha) is kept in the history entry. Installing the version every target
    /// partition already runs changes nothing and adds no history entry.
    pub async fn install_rule(
        &self,
        bytes: Vec<u8>,
        partitions: Option<&str>,
        label: Option<String>,
    ) -> Result<InstallReport, InstallError> {
        self.rules.install(self, bytes, partitions, label).await
    }

    /// Undoes the newest install not yet rolled back: its partitions go back to the versions
    /// they ran before it.
    pub async fn rollback_rule(&self) -> Result<InstallReport, InstallError> {
        self.rules.rollback(self).await
    }

    /// Applies one request and returns its decision once it is durable.
    pub async fn submit(&self, request: Request) -> Result<Decision, SubmitError> {
        self.submit_at(request, now_ms()).await
    }

    /// [`Runtime::submit`] with the request time given instead of read from the clock: the time
    /// rules see and routes are stamped with. For deterministic tests (`turnstile test`) and
    /// benchmarks; the HTTP API never lets a client choose it.
    pub async fn submit_at(
        &self,
        request: Request,
        received_at_ms: u64,
    ) -> Result<Decision, SubmitError> {
        let started = std::time::Instant::now();
        let kind = request.kind.clone();
        let result = self.route_and_apply(request, received_at_ms).await;
        self.metrics.record(
            &kind,
            crate::metrics::OutcomeClass::of(&result),
            started.elapsed().as_micros() as u64,
        );
        result
    }

    async fn route_and_apply(
        &self,
        request: Request,
        received_at_ms: u64,
    ) -> Result<Decision, SubmitError> {
        validate(&request)?;
        // Claim 5: a keyed request is recorded before it is routed, provisionally (user-only
        // requests sent meanwhile follow it into its partition's queue); the partition that
        // applies it confirms the route, and one it does not apply (refused, failed, a dedup
        // answer, or never queued) leaves the route as it was once this record is dropped.
        let (key, provisional) = match request.key.clone() {
            Some(key) => {
                let route = Route {
                    key: key.clone(),
                    recorded_at_ms: received_at_ms,
                };
                let provisional = self.routes.provisional(&request.user, route);
                (key, Some(provisional))
            }
            None => {
                // A retry goes where its id was applied, wherever the user's route went since,
                // so it gets the original answer instead of being applied again elsewhere.
                let applied_to = match &request.id {
                    Some(id) => self.applied_key(id).await?,
                    None => None,
                };
                match applied_to {
                    Some(key) => (key, None),
                    None => match self.resolve_route(&request.user, received_at_ms).await? {
                        Some(route) => (route.key, None),
                        None => return Err(SubmitError::UnknownRoute(request.user)),
                    },
                }
            }
        };
        let partition = self.partitioner.partition(&key);
        let (routed, fingerprint) = self.ids.route(request, key, received_at_ms);
        let (reply, answer) = oneshot::channel();
        self.partitions[partition as usize]
            .try_send(Command::Apply {
                request: routed,
                fingerprint,
                moves_route: provisional.is_some(),
                reply,
            })
            .map_err(|e| match e {
                QueueError::Full => SubmitError::Backpressure(partition),
                QueueError::Stopped => SubmitError::ShuttingDown,
            })?;
        let result = match answer.await {
            Ok(result) => result.map_err(SubmitError::from),
            Err(_) => Err(SubmitError::ShuttingDown),
        };
        drop(provisional);
        result
    }

    /// Reads every partition's store with `read` on a blocking thread, beside the partitions'
    /// writers (never through their queues), at most [`CONCURRENT_LOOKUPS`] at a time.
    async fn read_partitions<T: Send + 'static>(
        &self,
        read: impl Fn(&StoreReader) -> Result<Option<T>, StoreError> + Send + 'static,
    ) -> Result<Vec<T>, SubmitError> {
        let permit = self
            .lookups
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| SubmitError::ShuttingDown)?;
        let readers: Vec<StoreReader> = self.partitions.iter().map(|p| p.reader.clone()).collect();
        tokio::task::spawn_blocking(move || {
            // Held until the reads end, even if the caller gave up waiting for them.
            let _permit = permit;
            readers
                .iter()
                .filter_map(|reader| read(reader).transpose())
                .collect::<Result<Vec<T>, StoreError>>()
        })
        .await
        .map_err(|_| SubmitError::ShuttingDown)?
        .map_err(SubmitError::from)
    }

    /// The key the request with client id `id` was applied to, if a partition remembers it.
    async fn applied_key(&self, id: &str) -> Result<Option<String>, SubmitError> {
        let id = id.to_string();
        let found = self
            .read_partitions(move |reader| Ok(reader.dedup(&id)?.map(|entry| entry.decision.key)))
            .await?;
        Ok(found.into_iter().next())
    }

    /// The user's live route: from the cache, else the newest (by record order) the partitions'
    /// stores hold, read beside their writers, which then refills the cache.
    async fn resolve_route(&self, user: &str, now: u64) -> Result<Option<Route>, SubmitError> {
        if let Some(route) = self.routes.lookup(user, now) {
            return Ok(Some(route));
        }
        let wanted = user.to_string();
        let stored = self
            .read_partitions(move |reader| reader.route(&wanted))
            .await?;
        let newest = stored
            .into_iter()
            .filter(|s| self.routes.is_live(s.route.recorded_at_ms, now))
            .max_by_key(|s| (s.order, s.route.recorded_at_ms));
        Ok(newest.map(|s| {
            self.routes.confirm(user, s.route.clone(), s.order);
            // What the cache holds now: a request applied meanwhile may have moved it on.
            self.routes.lookup(user, now).unwrap_or(s.route)
        }))
    }

    async fn ask<T>(
        &self,
        partition: u32,
        command: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Command,
    ) -> Result<T, ReadError> {
        let (reply, answer) = oneshot::channel();
        self.partitions[partition as usize]
            .try_send(command(reply))
            .map_err(|e| match e {
                QueueError::Full => ReadError::Backpressure(partition),
                QueueError::Stopped => ReadError::ShuttingDown,
            })?;
        Ok(answer.await.map_err(|_| ReadError::ShuttingDown)??)
    }

    /// The committed state of `key` and its partition.
    pub async fn key_state(&self, key: &str) -> Result<(u32, Option<State>), ReadError> {
        let partition = self.partitioner.partition(key);
        let key = key.to_string();
        let state = self
            .ask(partition, |reply| Command::ReadState { key, reply })
            .await?;
        Ok((partition, state))
    }

    /// The user's route and the state of its key; `None` for a user with no live route.
    pub async fn user(&self, user: &str) -> Result<Option<UserView>, ReadError> {
        self.user_at(user, now_ms()).await
    }

    /// [`Runtime::user`] with the time the route's TTL is judged at given, to match
    /// [`Runtime::submit_at`].
    pub async fn user_at(&self, user: &str, now: u64) -> Result<Option<UserView>, ReadError> {
        let route = match self.resolve_route(user, now).await {
            Ok(route) => route,
            Err(SubmitError::Backpressure(p)) => return Err(ReadError::Backpressure(p)),
            Err(SubmitError::Store(e)) => return Err(ReadError::Store(e)),
            Err(SubmitError::Damaged(e)) => return Err(ReadError::Damaged(e)),
            Err(SubmitError::RecordDamaged(e)) => return Err(ReadError::RecordDamaged(e)),
            Err(_) => return Err(ReadError::ShuttingDown),
        };
        let Some(route) = route else { return Ok(None) };
        let (partition, state) = self.key_state(&route.key).await?;
        Ok(Some(UserView {
            key: route.key,
            partition,
            recorded_at_ms: route.recorded_at_ms,
            state,
        }))
    }

    /// Dead letters of one partition after sequence number `after`.
    pub async fn dead_letters(
        &self,
        partition: u32,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, ReadError> {
        self.ask(partition, |reply| Command::DeadLetters {
            after,
            limit,
            reply,
        })
        .await
    }

    /// Records on dead letter `seq` of `partition` that it was resubmitted; `false` if there
    /// is no such letter.
    pub async fn mark_resubmitted(
        &self,
        partition: u32,
        seq: u64,
        mark: crate::store::Resubmitted,
    ) -> Result<bool, ReadError> {
        self.ask(partition, |reply| Command::MarkResubmitted {
            seq,
            mark,
            reply,
        })
        .await
    }

    /// Per partition, what readiness judges it by. Lock-free, unlike [`Runtime::partitions`], so
    /// a frequent probe never waits on a rule install.
    pub fn partition_progress(&self) -> Vec<Progress> {
        self.partitions
            .iter()
            .map(|p| Progress {
                partition: p.id,
                batches: p.stats.batches.load(Ordering::Relaxed),
                failed_batches: p.stats.store_failures.load(Ordering::Relaxed),
                queued: p.queue_depth(),
            })
            .collect()
    }

    /// One entry per partition.
    pub fn partitions(&self) -> Vec<PartitionInfo> {
        let running = self.running_versions();
        self.partitions
            .iter()
            .map(|p| PartitionInfo {
                id: p.id,
                thread: p.thread_name.clone(),
                queue_depth: p.queue_depth(),
                processed: p.stats.applied.load(Ordering::Relaxed),
                deduplicated: p.stats.deduplicated.load(Ordering::Relaxed),
                batches: p.stats.batches.load(Ordering::Relaxed),
                store_failures: p.stats.store_failures.load(Ordering::Relaxed),
                refused: p.stats.refused.load(Ordering::Relaxed),
                quarantined_records: p.stats.quarantined.load(Ordering::Relaxed),
                data_bytes: matches!(self.location, Location::Dir(_))
                    .then(|| p.stats.data_bytes.load(Ordering::Relaxed)),
                rule_failures: crate::sandbox::FailureKind::ALL
                    .iter()
                    .zip(&p.stats.rule_failures)
                    .map(|(k, n)| (k.code(), n.load(Ordering::Relaxed)))
                    .collect(),
                breaker: p.stats.breaker.view(),
                rule_version: running[p.id as usize].clone(),
            })
            .collect()
    }

    /// Every metric, in the Prometheus text exposition format.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        self.metrics.render(&mut out);
        let running = self.running_versions();
        let samples: Vec<crate::metrics::PartitionSample<'_>> = self
            .partitions
            .iter()
            .map(|p| crate::metrics::PartitionSample {
                id: p.id,
                queue_depth: p.queue_depth() as u64,
                stats: &p.stats,
                rule_version: &running[p.id as usize],
            })
            .collect();
        crate::metrics::render_partitions(&mut out, &samples);
        crate::metrics::render_route_cache(&mut out, self.routes.len());
        out
    }

    /// Whether the stored routes are all in the cache (see [`RouteWarmup`]).
    pub fn routes_warmed(&self) -> bool {
        self.warmup.done.load(Ordering::Acquire)
    }

    /// Stops every partition after it has applied what it already accepted. Blocks; idempotent.
    pub fn shutdown(&self) {
        self.warmup.stop();
        for partition in &self.partitions {
            partition.stop();
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl PartitionThreads for Runtime {
    fn control(&self, p: u32) -> Option<crossbeam_channel::Sender<Command>> {
        self.partitions.get(p as usize).map(|p| p.blocking_sender())
    }
}

/// Makes the ids of requests that come without one: a prefix unique to the process (or run),
/// then a counter.
#[derive(Debug)]
pub(crate) struct RequestIds {
    prefix: String,
    next: AtomicU64,
}

impl RequestIds {
    pub(crate) fn new(prefix: String) -> RequestIds {
        RequestIds {
            prefix,
            next: AtomicU64::new(1),
        }
    }

    /// The routed request a partition applies, and its dedup fingerprint (empty without a
    /// client id: only a client id is remembered for retries, so only then is the body hashed).
    pub(crate) fn route(
        &self,
        request: Request,
        key: String,
        received_at_ms: u64,
    ) -> (RoutedRequest, String) {
        let payload = request.payload.unwrap_or_else(|| "null".to_string());
        let fingerprint = match &request.id {
            Some(_) => fingerprint(&request.kind, &key, &request.user, &payload),
            None => String::new(),
        };
        let (id, idempotent) = match request.id {
            Some(id) => (id, true),
            // A random part too: a host-made id must not be guessable, or another producer of
            // a Kafka requests topic could take it first and make this request an id_conflict.
            None => (
                format!(
                    "{}-{}-{:016x}",
                    self.prefix,
                    self.next.fetch_add(1, Ordering::Relaxed),
                    rand::random::<u64>()
                ),
                false,
            ),
        };
        let routed = RoutedRequest {
            id,
            idempotent,
            kind: request.kind,
            key,
            user: request.user,
            payload,
            received_at_ms,
        };
        (routed, fingerprint)
    }
}

/// Checks a request's fields before it is routed, so nothing malformed reaches a partition.
pub fn validate(request: &Request) -> Result<(), SubmitError> {
    validate_fields(
        &request.kind,
        &request.user,
        request.key.as_deref(),
        request.id.as_deref(),
        request.payload.as_deref(),
    )
}

/// [`validate`] over borrowed fields, so a routed request is checked without copying it.
pub(crate) fn validate_fields(
    kind: &str,
    user: &str,
    key: Option<&str>,
    id: Option<&str>,
    payload: Option<&str>,
) -> Result<(), SubmitError> {
    let field = |name: &str, value: &str| {
        if value.trim().is_empty() {
            Err(SubmitError::Invalid(format!(
                "`{name}` must not be empty or only whitespace"
            )))
        } else if value.len() > MAX_FIELD_BYTES {
            Err(SubmitError::Invalid(format!(
                "`{name}` is {} bytes, more than {MAX_FIELD_BYTES}",
                value.len()
            )))
        } else {
            Ok(())
        }
    };
    field("kind", kind)?;
    field("user", user)?;
    if let Some(key) = key {
        field("key", key)?;
    }
    if let Some(id) = id {
        field("id", id)?;
    }
    if let Some(payload) = payload
        && let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(payload)
    {
        return Err(SubmitError::Invalid(format!("`payload` is not JSON: {e}")));
    }
    Ok(())
}

/// What makes two requests "the same" for deduplication: kind, key, user and payload.
pub(crate) fn fingerprint(kind: &str, key: &str, user: &str, payload: &str) -> String {
    let mut hasher = Sha256::new();
    for part in [kind, key, user, payload] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
