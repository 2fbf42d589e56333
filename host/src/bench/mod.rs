//! `turnstile bench`: load on the real runtime, and the baselines it is measured against, on the
//! same workload in the same process.
//!
//! Workloads (`--workload`):
//! - `pairs` (the patent's): `users` users, each sending `reserve` (key + user) and then
//!   `associate` (user only, resolved through the route cache). In process the two are sent back
//!   to back without waiting (the way a queue delivers them), so ordering matters: `wrong` counts
//!   users that did not end `associated` at version 2 with both answers transitions. Over HTTP
//!   (`--url`) the client waits for the reserve's answer first, as an HTTP client must.
//! - `race`: for each user, `rounds` times, a `reserve` and an `associate` sent at the same time
//!   from two different client tasks. Any order of the two is allowed; `anomalies` counts users
//!   whose answers and final stored state no serial order of their requests explains (an
//!   oracle replaying the reference rule over every order the rounds allow).
//!
//! Load (`--rate`): without it, closed loop (each client waits for its answers before its next
//! user). With `--rate R[,R...]`, open loop: requests are scheduled at a fixed rate whatever the
//! answers, and latency counts from each request's *scheduled* send time (no coordinated
//! omission), recorded in an HDR histogram; one row per rate.
//!
//! Variants (`--compare` runs all of them):
//! - `turnstile`: the runtime with the Wasm rule (router, route cache, partition threads, store),
//!   a fresh instance per call (the default `rule.isolation`).
//! - `turnstile-hardened`: the same with `rule.spectre_hardening = true` (guard pages, so each
//!   per-call instance costs `mprotect` calls).
//! - `turnstile-warm`: the same with `rule.isolation = "warm_instance_leaks_state"`.
//! - `turnstile-native`: the same runtime with the reference rule compiled natively.
//! - `locked-workers`: the status-quo design the patent replaces: worker threads taking requests
//!   from one shared queue and deciding under per-key locks, with the same Wasm rule.
//! - `unordered-workers`: requests dealt round-robin to workers, no per-key serialization.
//!
//! The baselines do the same work as Turnstile: the same route resolution (the same route cache,
//! recorded by a request with a key, looked up by one without), the same records (route, state,
//! log entry) in the same store (one redb file per shard, as many shards as partitions), written
//! by one committer thread per shard in group commits of up to `max_batch` with the same
//! durability, and a failed write fails the requests of its batch. What differs is the design:
//! shared workers and locks instead of one thread per partition. One difference remains: a
//! worker reads the current state from an in-memory map (the state is shared between workers),
//! Turnstile from its store's transaction.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;

pub mod kafka;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::config::{Config, Durability};
use crate::model::{Outcome, Request, RoutedRequest, State, Verdict};
use crate::router::{Partitioner, Route, RouteCache};
use crate::runtime::{Runtime, SubmitError};
use crate::sandbox::{RuleLimits, Sandbox};
use crate::store::{Location, LogEntry, PartitionStore};

/// Which requests the clients send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Per user, `reserve` then `associate`, back to back from one client.
    Pairs,
    /// Per user, `rounds` times, `reserve` and `associate` at once from two clients.
    Race {
        /// How many times each user's pair is sent.
        rounds: u32,
    },
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Partitions (and, for the baselines, worker threads and store shards).
    pub partitions: u32,
    /// Users; each sends two requests per round.
    pub users: u64,
    /// Concurrent clients (in process: tasks; over HTTP: connections). In open loop, the number
    /// of tasks scheduling the requests; over HTTP it then also bounds the connections (twice
    /// it for the race workload): a request that is due while every connection is busy waits
    /// for a free one.
    pub clients: usize,
    /// Store durability.
    pub durability: Durability,
    /// Most requests per group commit.
    pub max_batch: usize,
    /// The rule component (default: the embedded reference rule).
    pub rule: Option<Vec<u8>>,
    /// Run every baseline too.
    pub compare: bool,
    /// Which requests.
    pub workload: Workload,
    /// Open-loop arrival rates, requests per second, one row each; empty: closed loop.
    pub rates: Vec<f64>,
    /// Drive running servers over HTTP instead (clients are spread over the URLs, e.g. the
    /// processes of a Kafka-mode cluster).
    pub url: Option<Vec<String>>,
    /// After each Turnstile variant's run, stop it and time opening its data dir again (start
    /// to ready with every key the run wrote).
    pub restart: bool,
    /// With `url`: other processes (the servers) whose CPU time per request to report, by label.
    pub cpu: Vec<(String, u32)>,
    /// In process: each user's key is chosen so that the partitions' shares of the users follow
    /// a Zipf law of this exponent (partition 0 the hottest). Keys stay one per user, so the
    /// oracle still judges every user; what is skewed is the load on the partitions.
    pub zipf: Option<f64>,
}

/// One line of the results table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Which variant.
    pub variant: String,
    /// `pairs` or `race`.
    pub workload: String,
    /// The open-loop arrival rate, req/s; `None` for closed loop.
    pub offered_rate: Option<f64>,
    /// Requests sent.
    pub requests: u64,
    /// Wall-clock seconds from the first send to the last answer.
    pub seconds: f64,
    /// Requests answered per second.
    pub throughput: f64,
    /// Latency percentiles of one request, µs (open loop: from its scheduled send time).
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Slowest request, µs.
    pub max_us: f64,
    /// Process CPU time (user + system) per request, µs.
    pub cpu_us_per_request: f64,
    /// Requests per store commit during the load (Turnstile's batches, the baselines' group
    /// commits): what a commit's cost is shared by. `None` over HTTP, where the bench does not
    /// read the server's commits.
    pub requests_per_commit: Option<f64>,
    /// With `--cpu`: each named process's CPU time (user + system) per request during the
    /// load, µs, by label.
    pub cpu_us_per_request_of: Vec<(String, f64)>,
    /// With `--zipf`: the hottest partition's share of the requests, and the p99 latency (µs) of
    /// its requests and of every other partition's.
    pub hot_partition: Option<HotPartition>,
    /// Requests that got no decision (store failure, rule failure, runtime stopping).
    pub errors: u64,
    /// `pairs`: users that did not end `associated` at version 2 with a transition for each
    /// request (a correct design has none). `race`: 0.
    pub wrong: u64,
    /// `race`: users whose answers and final state no serial order explains. `pairs`: 0.
    pub anomalies: u64,
    /// With `--restart`: seconds from opening the stopped variant's data dir to a runtime ready
    /// to serve (partitions open, routes loaded). `None` for the baselines and without it.
    pub restart_seconds: Option<f64>,
    /// With `--restart`: seconds from opening the data dir until every stored route is in the
    /// route cache (loaded in the background after ready; until then a route missing from the
    /// cache is read from the stores).
    pub routes_warm_seconds: Option<f64>,
}

/// What a skewed run (`--zipf`) measured of its hottest partition against the others.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HotPartition {
    /// Share of the requests that went to the hottest partition.
    pub share: f64,
    /// p99 latency of the hottest partition's requests, µs.
    pub p99_us: f64,
    /// p99 latency of every other partition's requests, µs.
    pub others_p99_us: f64,
}

/// Runs the benchmark; `progress(done, total)` as it goes.
pub fn run(options: &BenchOptions, progress: &mut dyn FnMut(u64, u64)) -> anyhow::Result<Vec<Row>> {
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-client")
        .build()?;
    let loads: Vec<Option<f64>> = if options.rates.is_empty() {
        vec![None]
    } else {
        options.rates.iter().copied().map(Some).collect()
    };
    if let Some(urls) = &options.url {
        return loads
            .into_iter()
            .map(|rate| tokio.block_on(http(urls, options, rate, progress)))
            .collect();
    }
    let mut variants = vec![Variant::Turnstile(Decide::Wasm)];
    if options.compare {
        variants.extend([
            Variant::Turnstile(Decide::WasmHardened),
            Variant::Turnstile(Decide::WasmWarm),
            Variant::Turnstile(Decide::Native),
            Variant::Workers(WorkerDesign::Locked),
            Variant::Workers(WorkerDesign::Unordered),
        ]);
    }
    let mut rows = Vec::new();
    // Rates outside, variants inside: the rows of one rate are measured close together.
    for rate in loads {
        for variant in &variants {
            let dir = TempDir::new("run")?;
            let system = variant.start(options, &dir.0)?;
            let row = tokio.block_on(drive(system.clone(), options, rate, progress))?;
            let row = Row {
                variant: variant.name().to_string(),
                ..row
            };
            system.stop();
            drop(system);
            let (restart_seconds, routes_warm_seconds) = match variant {
                Variant::Turnstile(_) if options.restart => {
                    let started = Instant::now();
                    let reopened = variant.start(options, &dir.0)?;
                    let ready = started.elapsed().as_secs_f64();
                    while !reopened.warmed() {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    let warm = started.elapsed().as_secs_f64();
                    reopened.stop();
                    (Some(ready), Some(warm))
                }
                _ => (None, None),
            };
            rows.push(Row {
                restart_seconds,
                routes_warm_seconds,
                ..row
            });
        }
    }
    Ok(rows)
}

/// What one request got, as the oracle and the counters see it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// The rule made a transition to this status.
    Transition(String),
    /// The rule rejected it, or it had no key and the user no route: nothing changed.
    Rejected,
    /// No decision (store failure, rule failure, stopping): the oracle cannot judge the user.
    Failed,
}

type Pending = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// A design under load: Turnstile or a baseline, behind one interface so that every variant
/// gets exactly the same load generator.
trait System: Send + Sync + 'static {
    /// Submits one request; the future is its answer once durable.
    fn submit(self: Arc<Self>, request: Request) -> Pending;
    /// The key's durable status and version after the load, read from the store.
    fn final_state(
        self: Arc<Self>,
        key: String,
    ) -> Pin<Box<dyn Future<Output = Option<State>> + Send>>;
    /// Stops the threads.
    fn stop(&self);
    /// Whether background start-up work (Turnstile's route cache warm-up) is over.
    fn warmed(&self) -> bool {
        true
    }
    /// Store commits made so far, where the bench can count them.
    fn commits(&self) -> Option<u64> {
        None
    }
}

#[derive(Debug, Clone, Copy)]
enum Variant {
    Turnstile(Decide),
    Workers(WorkerDesign),
}

impl Variant {
    fn name(&self) -> &'static str {
        match self {
            Variant::Turnstile(Decide::Wasm) => "turnstile",
            Variant::Turnstile(Decide::WasmHardened) => "turnstile-hardened",
            Variant::Turnstile(Decide::WasmWarm) => "turnstile-warm",
            Variant::Turnstile(Decide::Native) => "turnstile-native",
            Variant::Workers(WorkerDesign::Locked) => "locked-workers",
            Variant::Workers(WorkerDesign::Unordered) => "unordered-workers",
        }
    }

    fn start(
        &self,
        options: &BenchOptions,
        dir: &std::path::Path,
    ) -> anyhow::Result<Arc<dyn System>> {
        Ok(match *self {
            Variant::Turnstile(decide) => {
                let mut config = base_config(options, dir.to_path_buf());
                match decide {
                    Decide::WasmWarm => {
                        config.rule.isolation = crate::sandbox::Isolation::WarmInstanceLeaksState
                    }
                    Decide::WasmHardened => config.rule.spectre_hardening = true,
                    Decide::Wasm | Decide::Native => {}
                }
                Arc::new(TurnstileSystem(if decide == Decide::Native {
                    Runtime::start_native(&config, crate::native::REFERENCE)?
                } else {
                    Runtime::start(&config, options.rule.clone())?
                }))
            }
            Variant::Workers(design) => Arc::new(Workers::start(options, dir, design)?),
        })
    }
}

fn base_config(options: &BenchOptions, data_dir: PathBuf) -> Config {
    let mut config = Config::default();
    config.partitions.servers = 1;
    config.partitions.containers = options.partitions;
    config.partitions.max_batch = options.max_batch;
    config.partitions.queue_capacity = queue_capacity(options);
    config.store.durability = options.durability;
    config.store.data_dir = Some(data_dir);
    config
}

/// Room in each queue, the same for Turnstile's partitions and the baselines' workers.
fn queue_capacity(options: &BenchOptions) -> usize {
    (options.clients * 4).max(1024)
}

/// A temporary directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> anyhow::Result<TempDir> {
        let path = std::env::temp_dir().join(format!(
            "turnstile-bench-{label}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How a Turnstile variant decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decide {
    /// The Wasm rule, a fresh instance per call.
    Wasm,
    /// The Wasm rule, a fresh instance per call, with guard pages (`rule.spectre_hardening`).
    WasmHardened,
    /// The Wasm rule, one warm instance per partition.
    WasmWarm,
    /// The rule compiled into the host.
    Native,
}

struct TurnstileSystem(Runtime);

impl System for TurnstileSystem {
    fn submit(self: Arc<Self>, request: Request) -> Pending {
        Box::pin(async move {
            loop {
                match self.0.submit(request.clone()).await {
                    Ok(decision) => {
                        return match decision.verdict {
                            Verdict::Transition(state) => Answer::Transition(state.status),
                            Verdict::Reject(_) => Answer::Rejected,
                        };
                    }
                    Err(SubmitError::UnknownRoute(_)) => return Answer::Rejected,
                    // A full queue: wait for room, as the baselines' producers do.
                    Err(SubmitError::Backpressure(_)) => tokio::task::yield_now().await,
                    Err(_) => return Answer::Failed,
                }
            }
        })
    }

    fn final_state(
        self: Arc<Self>,
        key: String,
    ) -> Pin<Box<dyn Future<Output = Option<State>> + Send>> {
        Box::pin(async move { self.0.key_state(&key).await.ok().and_then(|(_, s)| s) })
    }

    fn stop(&self) {
        self.0.shutdown();
    }

    fn warmed(&self) -> bool {
        self.0.routes_warmed()
    }

    fn commits(&self) -> Option<u64> {
        Some(self.0.partition_progress().iter().map(|p| p.batches).sum())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WorkerDesign {
    /// One shared queue, per-key locks.
    Locked,
    /// Round-robin to per-worker queues, no per-key serialization.
    Unordered,
}

/// A request for a baseline worker.
struct Job {
    request: RoutedRequest,
    reply: oneshot::Sender<Answer>,
}

/// A decided request on its way to its shard's committer.
struct Commit {
    request: RoutedRequest,
    outcome: Outcome,
    /// The new state when the outcome is a transition.
    state: Option<State>,
    state_version: u64,
    reply: oneshot::Sender<Answer>,
    answer: Answer,
}

/// The state the workers share: an in-memory map of current states, per-key lock stripes, and
/// the committers of the store shards.
struct Shared {
    shards: Vec<Mutex<HashMap<String, State>>>,
    key_locks: Vec<Mutex<()>>,
    committers: Vec<crossbeam_channel::Sender<Commit>>,
}

fn index(key: &str, len: usize) -> usize {
    (crate::router::java_string_hash(key).unsigned_abs() as usize) % len
}

/// The lock-based or unordered baseline.
struct Workers {
    routes: RouteCache,
    /// Group commits made by the shards' committers.
    commits: Arc<AtomicU64>,
    senders: Mutex<Option<Vec<crossbeam_channel::Sender<Job>>>>,
    next: AtomicU64,
    stores: Vec<Arc<Mutex<PartitionStore>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Workers {
    fn start(
        options: &BenchOptions,
        dir: &std::path::Path,
        design: WorkerDesign,
    ) -> anyhow::Result<Workers> {
        let config = base_config(options, dir.to_path_buf());
        let shard_count = options.partitions;
        crate::store::create_partition_files(dir, shard_count).map_err(anyhow::Error::msg)?;
        let mut stores = Vec::new();
        let mut threads = Vec::new();
        let mut committers = Vec::new();
        let commits = Arc::new(AtomicU64::new(0));
        for s in 0..shard_count {
            let store = PartitionStore::open(
                &Location::Dir(dir.to_path_buf()),
                s,
                options.durability,
                config.store.dedup_retention,
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            let store = Arc::new(Mutex::new(store));
            let (tx, rx) = crossbeam_channel::bounded::<Commit>(queue_capacity(options));
            let (store_for_thread, max_batch) = (store.clone(), options.max_batch.max(1));
            let commits = commits.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("bench-commit-{s}"))
                    .spawn(move || commit_loop(&rx, &store_for_thread, max_batch, &commits))?,
            );
            stores.push(store);
            committers.push(tx);
        }
        let shared = Arc::new(Shared {
            shards: (0..64).map(|_| Mutex::default()).collect(),
            key_locks: (0..4096).map(|_| Mutex::default()).collect(),
            committers,
        });
        let sandbox = Sandbox::new(RuleLimits::from(&config.rule))?;
        let bytes = options
            .rule
            .clone()
            .unwrap_or_else(|| crate::sandbox::REFERENCE_RULE.to_vec());
        let rule = sandbox.compile_shared(&bytes)?;
        let workers = options.partitions as usize;
        let (senders, receivers): (Vec<_>, Vec<_>) = match design {
            // One queue that every worker takes from.
            WorkerDesign::Locked => {
                let (tx, rx) = crossbeam_channel::bounded::<Job>(queue_capacity(options));
                (vec![tx], vec![rx; workers])
            }
            // One queue per worker, dealt round-robin.
            WorkerDesign::Unordered => (0..workers)
                .map(|_| crossbeam_channel::bounded::<Job>(queue_capacity(options)))
                .unzip(),
        };
        for (w, receiver) in receivers.into_iter().enumerate() {
            let mut instance = sandbox.instantiate(rule.clone(), w as u32)?;
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("bench-worker-{w}"))
                    .spawn(move || {
                        for job in receiver {
                            let key = job.request.key.clone();
                            let _guard = (design == WorkerDesign::Locked).then(|| {
                                shared.key_locks[index(&key, shared.key_locks.len())]
                                    .lock()
                                    .unwrap()
                            });
                            let shard = &shared.shards[index(&key, shared.shards.len())];
                            let current = shard.lock().unwrap().get(&key).cloned();
                            let outcome = match instance.handle(current.as_ref(), &job.request) {
                                Ok(outcome) => outcome,
                                Err(_) => {
                                    let _ = job.reply.send(Answer::Failed);
                                    continue;
                                }
                            };
                            let (state, state_version, answer) = match &outcome {
                                Outcome::Transition { status, data } => {
                                    let state = State {
                                        status: status.clone(),
                                        user: current.as_ref().map_or_else(
                                            || job.request.user.clone(),
                                            |s| s.user.clone(),
                                        ),
                                        data: data.clone(),
                                        version: current.as_ref().map_or(0, |s| s.version) + 1,
                                        rule_version: instance.rule().version.clone(),
                                        updated_at_ms: job.request.received_at_ms,
                                    };
                                    shard.lock().unwrap().insert(key.clone(), state.clone());
                                    let version = state.version;
                                    (Some(state), version, Answer::Transition(status.clone()))
                                }
                                Outcome::Reject { .. } => (
                                    None,
                                    current.as_ref().map_or(0, |s| s.version),
                                    Answer::Rejected,
                                ),
                            };
                            // Handed over while the key's lock is held, so that a key's records
                            // reach its committer in the order they were decided.
                            let commit = Commit {
                                request: job.request,
                                outcome,
                                state,
                                state_version,
                                reply: job.reply,
                                answer,
                            };
                            if let Err(back) =
                                shared.committers[index(&key, shared.committers.len())].send(commit)
                            {
                                let _ = back.0.reply.send(Answer::Failed);
                            }
                        }
                    })?,
            );
        }
        Ok(Workers {
            routes: RouteCache::new(config.routes.capacity, config.routes.ttl_seconds * 1000),
            commits,
            senders: Mutex::new(Some(senders)),
            next: AtomicU64::new(0),
            stores,
            threads: Mutex::new(threads),
        })
    }
}

/// A shard's committer: the same records as a Turnstile partition (route, state on a transition,
/// log entry) in group commits of up to `max_batch`; a failed commit fails its whole batch.
fn commit_loop(
    queue: &crossbeam_channel::Receiver<Commit>,
    store: &Mutex<PartitionStore>,
    max_batch: usize,
    commits: &AtomicU64,
) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(commit) => batch.push(commit),
                Err(_) => break,
            }
        }
        let now = crate::model::now_ms();
        let written = store.lock().unwrap().write_batch(|tx| {
            for c in &batch {
                tx.record_route(
                    &c.request.user,
                    &Route {
                        key: c.request.key.clone(),
                        recorded_at_ms: c.request.received_at_ms,
                    },
                )?;
                if let Some(state) = &c.state {
                    tx.put_state(&c.request.key, state)?;
                }
                tx.append_log(LogEntry {
                    seq: 0,
                    request: c.request.clone(),
                    outcome: c.outcome.clone(),
                    state_version: c.state_version,
                    rule_version: c
                        .state
                        .as_ref()
                        .map_or_else(String::new, |s| s.rule_version.clone()),
                    applied_at_ms: now,
                })?;
            }
            Ok(())
        });
        if written.is_ok() {
            commits.fetch_add(1, Ordering::Relaxed);
        }
        for c in batch {
            let answer = if written.is_ok() {
                c.answer
            } else {
                Answer::Failed
            };
            let _ = c.reply.send(answer);
        }
    }
}

impl System for Workers {
    fn submit(self: Arc<Self>, request: Request) -> Pending {
        Box::pin(async move {
            // The same route resolution as Turnstile's router: a request with a key records the
            // user's route, one without resolves it.
            let now = crate::model::now_ms();
            let key = match request.key {
                Some(key) => {
                    self.routes.record(
                        &request.user,
                        Route {
                            key: key.clone(),
                            recorded_at_ms: now,
                        },
                    );
                    key
                }
                None => match self.routes.lookup(&request.user, now) {
                    Some(route) => route.key,
                    None => return Answer::Rejected,
                },
            };
            let (reply, answer) = oneshot::channel();
            let mut job = Job {
                request: RoutedRequest {
                    id: format!("bench-{}", self.next.fetch_add(1, Ordering::Relaxed)),
                    idempotent: false,
                    kind: request.kind,
                    key,
                    user: request.user,
                    payload: "null".into(),
                    received_at_ms: now,
                },
                reply,
            };
            let sender = {
                let senders = self.senders.lock().unwrap();
                let Some(senders) = senders.as_ref() else {
                    return Answer::Failed;
                };
                senders[self.next.load(Ordering::Relaxed) as usize % senders.len()].clone()
            };
            loop {
                match sender.try_send(job) {
                    Ok(()) => break,
                    // A full queue: wait for room, like a producer would.
                    Err(crossbeam_channel::TrySendError::Full(back)) => {
                        job = back;
                        tokio::task::yield_now().await;
                    }
                    Err(crossbeam_channel::TrySendError::Disconnected(_)) => return Answer::Failed,
                }
            }
            answer.await.unwrap_or(Answer::Failed)
        })
    }

    fn final_state(
        self: Arc<Self>,
        key: String,
    ) -> Pin<Box<dyn Future<Output = Option<State>> + Send>> {
        Box::pin(async move {
            let store = &self.stores[index(&key, self.stores.len())];
            store.lock().unwrap().state(&key).ok().flatten()
        })
    }

    fn commits(&self) -> Option<u64> {
        Some(self.commits.load(Ordering::Relaxed))
    }

    fn stop(&self) {
        self.senders.lock().unwrap().take();
        for t in self.threads.lock().unwrap().drain(..) {
            let _ = t.join();
        }
    }
}

/// Drives running servers over HTTP: keep-alive connections spread over the URLs.
struct HttpSystem {
    client: reqwest::Client,
    urls: Vec<String>,
    next: AtomicU64,
    /// One permit per connection (`--clients`, twice that for the race workload): an open-loop request due while every
    /// connection is busy waits for one, and the wait counts in its latency (from its scheduled
    /// time), as with wrk2's fixed connections. Without it, overload opened a connection per
    /// late request, past the server's `server.max_connections`, and the run measured SYN
    /// retries and refused connections instead of the server.
    connections: tokio::sync::Semaphore,
}

impl HttpSystem {
    fn url(&self) -> &str {
        &self.urls[self.next.fetch_add(1, Ordering::Relaxed) as usize % self.urls.len()]
    }
}

impl System for HttpSystem {
    fn submit(self: Arc<Self>, request: Request) -> Pending {
        Box::pin(async move {
            let mut body = serde_json::json!({"kind": request.kind, "user": request.user});
            if let Some(key) = request.key {
                body["key"] = key.into();
            }
            let url = format!("{}/v1/requests", self.url());
            let mut backoff = Duration::from_millis(1);
            loop {
                let exchange = async {
                    let _connection = self.connections.acquire().await.ok()?;
                    let response = self.client.post(&url).json(&body).send().await.ok()?;
                    let status = response.status().as_u16();
                    Some((status, response.json::<serde_json::Value>().await.ok()?))
                };
                let Some((status, reply)) = exchange.await else {
                    return Answer::Failed;
                };
                return match (status, reply["error"]["code"].as_str()) {
                    (200, _) => reply["state"]["status"]
                        .as_str()
                        .map_or(Answer::Failed, |s| Answer::Transition(s.to_string())),
                    (409, _) | (404, Some("unknown_route")) => Answer::Rejected,
                    // A full partition queue: send again after a wait that doubles up to 64 ms,
                    // the connection given back meanwhile. A fixed 1 ms made every busy
                    // connection resend 1 000 times a second, and an overloaded server spent its
                    // CPU refusing them: 4 000 answered per second where it could do 15 000.
                    (_, Some("backpressure")) => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(64));
                        continue;
                    }
                    _ => Answer::Failed,
                };
            }
        })
    }

    fn final_state(
        self: Arc<Self>,
        key: String,
    ) -> Pin<Box<dyn Future<Output = Option<State>> + Send>> {
        Box::pin(async move {
            // In a cluster only the key's owner answers with its state; the others say
            // `not_owned`, so every process is asked until one knows.
            let mut found = None;
            for base in &self.urls {
                let url = format!("{base}/v1/keys/{key}");
                let reply: serde_json::Value =
                    self.client.get(&url).send().await.ok()?.json().await.ok()?;
                if reply["error"]["code"] != "not_owned" {
                    found = Some(reply);
                    break;
                }
            }
            let reply = found?;
            Some(State {
                status: reply["state"]["status"].as_str()?.to_string(),
                user: String::new(),
                data: String::new(),
                version: reply["state"]["version"].as_u64()?,
                rule_version: String::new(),
                updated_at_ms: 0,
            })
        })
    }

    fn stop(&self) {}
}

async fn http(
    urls: &[String],
    options: &BenchOptions,
    rate: Option<f64>,
    progress: &mut dyn FnMut(u64, u64),
) -> anyhow::Result<Row> {
    // A race client has its two requests in flight at once.
    let connections = match options.workload {
        Workload::Pairs => options.clients.max(1),
        Workload::Race { .. } => 2 * options.clients.max(1),
    };
    let client = reqwest::Client::builder()
        // As many kept open as may be in use, so none is closed and opened again.
        .pool_max_idle_per_host(connections)
        // A server that never answers fails the request instead of keeping its connection.
        .timeout(Duration::from_secs(30))
        .build()?;
    for base in urls {
        probe(&client, base).await?;
    }
    let system = Arc::new(HttpSystem {
        client,
        urls: urls.to_vec(),
        next: AtomicU64::new(0),
        connections: tokio::sync::Semaphore::new(connections),
    });
    let row = drive(system, options, rate, progress).await?;
    // A server that answered its probe and then failed everything (it went away, or is not a
    // Turnstile) leaves nothing to measure: the table would show the failures' timings as
    // latencies and a throughput of 0.
    if row.requests > 0 && row.errors >= row.requests {
        bail!(
            "every one of the {} requests failed against {}: nothing was measured",
            row.requests,
            urls.join(", ")
        );
    }
    Ok(Row {
        variant: "turnstile-http".into(),
        ..row
    })
}

/// Checks before the load that `base` is a URL, that a server answers there, and that it says
/// it is ready (`/readyz`), so a mistyped or dead `--url` is an error instead of a table of
/// failures.
async fn probe(client: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let url = reqwest::Url::parse(base).with_context(|| format!("--url {base} is not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") {
        bail!("--url {base} is not an http:// or https:// URL");
    }
    let readyz = format!("{base}/readyz");
    let response = client
        .get(&readyz)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .with_context(|| format!("cannot reach the server at {base} (--url)"))?;
    let status = response.status();
    if !status.is_success() {
        bail!("{readyz} answered {status}: the server at {base} is not a ready Turnstile");
    }
    Ok(())
}

/// What one user's requests got.
struct UserResult {
    /// Which user.
    user: u64,
    /// Per round, the reserve's and the associate's answer.
    answers: Vec<(Answer, Answer)>,
    /// Latency of each request, µs.
    latencies_us: Vec<u64>,
    /// When its last answer arrived.
    last_answer: Instant,
    /// Under `--zipf`: whether its key is in the hottest partition (partition 0).
    hot: bool,
}

/// How one run names its users and their keys.
struct Keys {
    /// Random per run, so that runs against one server never share a user or a key.
    run: String,
    /// With `--zipf`: every user's key, chosen before the load (finding one costs a few
    /// hashes per partition, which must not count in a request's latency), and its partition.
    skewed: Option<Vec<(String, u32)>>,
}

impl Keys {
    fn new(options: &BenchOptions) -> Keys {
        let run = format!("{:08x}", rand::random::<u32>());
        let skewed = options.zipf.map(|exponent| {
            let cumulative = zipf_cumulative(options.partitions, exponent);
            // The partitioner the bench's runtime is configured with; the baselines' shards
            // (`index`) place keys the same way.
            let hash = base_config(options, PathBuf::new()).partitions.hash;
            let partitioner = Partitioner::new(hash, options.partitions);
            (0..options.users)
                .map(|u| {
                    let target = zipf_rank(&cumulative, u);
                    let key = (0u64..)
                        .map(|i| format!("B-{run}-{u}-{i}"))
                        .find(|key| partitioner.partition(key) == target)
                        .expect("some suffix hashes to every partition");
                    (key, target)
                })
                .collect()
        });
        Keys { run, skewed }
    }

    fn user(&self, u: u64) -> String {
        format!("bu-{}-{u}", self.run)
    }

    fn key(&self, u: u64) -> String {
        match &self.skewed {
            Some(keys) => keys[u as usize].0.clone(),
            None => format!("B-{}-{u}", self.run),
        }
    }

    /// Under `--zipf`: whether user `u`'s key is in the hottest partition (partition 0), as
    /// the partitioner placed it.
    fn hot(&self, u: u64) -> bool {
        self.skewed
            .as_ref()
            .is_some_and(|keys| keys[u as usize].1 == 0)
    }

    fn reserve(&self, u: u64) -> Request {
        Request {
            id: None,
            kind: "reserve".into(),
            key: Some(self.key(u)),
            user: self.user(u),
            payload: None,
        }
    }

    fn associate(&self, u: u64) -> Request {
        Request {
            id: None,
            kind: "associate".into(),
            key: None,
            user: self.user(u),
            payload: None,
        }
    }
}

/// Each partition's cumulative share of the users under a Zipf law of `exponent`, partition 0
/// the largest.
fn zipf_cumulative(partitions: u32, exponent: f64) -> Vec<f64> {
    let weights: Vec<f64> = (1..=partitions)
        .map(|rank| 1.0 / f64::from(rank).powf(exponent))
        .collect();
    let total: f64 = weights.iter().sum();
    weights
        .iter()
        .scan(0.0, |sum, w| {
            *sum += w / total;
            Some(*sum)
        })
        .collect()
}

/// The partition user `u` is given: drawn from the cumulative shares by a hash of `u`, so a
/// run is the same whatever order its clients go in.
fn zipf_rank(cumulative: &[f64], u: u64) -> u32 {
    // splitmix64: a well-mixed 64-bit value of `u`; its top 53 bits, a fraction in [0, 1).
    let mut z = u.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let fraction = ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64;
    // The last share may sum to a hair under 1.0.
    let rank = cumulative.partition_point(|c| *c <= fraction);
    rank.min(cumulative.len() - 1) as u32
}

/// Sends one user's requests; latency counts from `scheduled` for the first round (from the
/// send of later rounds, which wait for the previous answers).
async fn user_work(
    system: Arc<dyn System>,
    workload: Workload,
    ordered_pairs: bool,
    keys: Arc<Keys>,
    u: u64,
    scheduled: Instant,
) -> UserResult {
    let mut result = UserResult {
        user: u,
        answers: Vec::new(),
        latencies_us: Vec::new(),
        last_answer: scheduled,
        hot: keys.hot(u),
    };
    let timed = |system: Arc<dyn System>, request: Request, from: Instant| async move {
        let answer = system.submit(request).await;
        let at = Instant::now();
        (
            answer,
            at,
            at.saturating_duration_since(from).as_micros() as u64,
        )
    };
    match workload {
        Workload::Pairs if ordered_pairs => {
            // Over HTTP: the associate is sent once the reserve is answered.
            let (a, at, l1) = timed(system.clone(), keys.reserve(u), scheduled).await;
            let (b, bt, l2) = timed(system, keys.associate(u), at).await;
            result.answers.push((a, b));
            result.latencies_us.extend([l1, l2]);
            result.last_answer = bt;
        }
        Workload::Pairs => {
            // Polled in order: the reserve is queued before the associate, which is routed
            // through the route the reserve just recorded.
            let ((a, at, l1), (b, bt, l2)) = tokio::join!(
                timed(system.clone(), keys.reserve(u), scheduled),
                timed(system, keys.associate(u), scheduled)
            );
            result.answers.push((a, b));
            result.latencies_us.extend([l1, l2]);
            result.last_answer = at.max(bt);
        }
        Workload::Race { rounds } => {
            let mut from = scheduled;
            for _ in 0..rounds {
                // Two tasks, so the two requests race from different clients (threads).
                let first = tokio::spawn(timed(system.clone(), keys.reserve(u), from));
                let second = tokio::spawn(timed(system.clone(), keys.associate(u), from));
                let (a, at, l1) = first.await.unwrap_or((Answer::Failed, Instant::now(), 0));
                let (b, bt, l2) = second.await.unwrap_or((Answer::Failed, Instant::now(), 0));
                result.answers.push((a, b));
                result.latencies_us.extend([l1, l2]);
                from = at.max(bt);
                result.last_answer = from;
            }
        }
    }
    result
}

/// Runs the workload against one system and measures it.
async fn drive(
    system: Arc<dyn System>,
    options: &BenchOptions,
    rate: Option<f64>,
    progress: &mut dyn FnMut(u64, u64),
) -> anyhow::Result<Row> {
    let keys = Arc::new(Keys::new(options));
    let per_user = match options.workload {
        Workload::Pairs => 2,
        Workload::Race { rounds } => 2 * u64::from(rounds.max(1)),
    };
    let total = options.users * per_user;
    let ordered_pairs = options.url.is_some();
    let done = Arc::new(AtomicU64::new(0));
    let clients = options.clients.max(1) as u64;
    let cpu_started = process_cpu_time("self");
    let others_started: Vec<Duration> = options
        .cpu
        .iter()
        .map(|(_, pid)| process_cpu_time(&pid.to_string()))
        .collect();
    let commits_started = system.commits();
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (system, done, keys) = (system.clone(), done.clone(), keys.clone());
            let workload = options.workload;
            let users = options.users;
            tokio::spawn(async move {
                let mine = (c..users).step_by(clients as usize);
                let mut results = Vec::new();
                match rate {
                    None => {
                        for u in mine {
                            let r = user_work(
                                system.clone(),
                                workload,
                                ordered_pairs,
                                keys.clone(),
                                u,
                                Instant::now(),
                            )
                            .await;
                            done.fetch_add(per_user, Ordering::Relaxed);
                            results.push(r);
                        }
                    }
                    Some(rate) => {
                        // User u is due at u / (rate / requests per user) seconds, whatever
                        // happened to the users before it.
                        let users_per_second = rate / per_user as f64;
                        let mut pending = Vec::new();
                        for u in mine {
                            let due =
                                started + Duration::from_secs_f64(u as f64 / users_per_second);
                            tokio::time::sleep_until(due.into()).await;
                            let (system, keys, done) = (system.clone(), keys.clone(), done.clone());
                            pending.push(tokio::spawn(async move {
                                let r =
                                    user_work(system, workload, ordered_pairs, keys, u, due).await;
                                done.fetch_add(per_user, Ordering::Relaxed);
                                r
                            }));
                        }
                        for p in pending {
                            if let Ok(r) = p.await {
                                results.push(r);
                            }
                        }
                    }
                }
                results
            })
        })
        .collect();
    let mut results = Vec::new();
    for mut task in tasks {
        let finished = loop {
            match tokio::time::timeout(Duration::from_millis(100), &mut task).await {
                Ok(finished) => break finished,
                Err(_) => progress(done.load(Ordering::Relaxed), total),
            }
        };
        results.extend(finished.context("a bench client failed")?);
    }
    let cpu = process_cpu_time("self").saturating_sub(cpu_started);
    // Read before the final states are read back, which are not the load.
    let cpu_us_per_request_of = options
        .cpu
        .iter()
        .zip(&others_started)
        .map(|((label, pid), started)| {
            // A process gone by now would read as no CPU at all.
            anyhow::ensure!(
                std::path::Path::new(&format!("/proc/{pid}/stat")).exists(),
                "--cpu {label}={pid}: the process ended during the load"
            );
            let used = process_cpu_time(&pid.to_string()).saturating_sub(*started);
            Ok((label.clone(), used.as_secs_f64() * 1e6 / total as f64))
        })
        .collect::<anyhow::Result<_>>()?;
    // Read before the final states are read back, which are not the load.
    let commits = commits_started.zip(system.commits());
    progress(total, total);
    // The clock stops at the last answer, not when this loop noticed it.
    let ended = results
        .iter()
        .map(|r| r.last_answer)
        .max()
        .unwrap_or(started);
    let seconds = ended
        .saturating_duration_since(started)
        .as_secs_f64()
        .max(1e-9);
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    // Under `--zipf`: the hottest partition's requests, and everyone else's.
    let mut hot = [histogram.clone(), histogram.clone()];
    let mut errors = 0;
    for r in &results {
        for l in &r.latencies_us {
            histogram.saturating_record((*l).max(1));
            hot[usize::from(!r.hot)].saturating_record((*l).max(1));
        }
        errors += r
            .answers
            .iter()
            .flat_map(|(a, b)| [a, b])
            .filter(|a| **a == Answer::Failed)
            .count() as u64;
    }
    let hot_partition = options.zipf.map(|_| HotPartition {
        share: hot[0].len() as f64 / histogram.len().max(1) as f64,
        p99_us: hot[0].value_at_quantile(0.99) as f64,
        others_p99_us: hot[1].value_at_quantile(0.99) as f64,
    });
    let requests_per_commit = match commits {
        // A failed request is in no commit (a failed batch counts none either).
        Some((before, after)) if after > before => {
            Some((total - errors) as f64 / (after - before) as f64)
        }
        _ => None,
    };
    // Judged against the durable state, which also catches lost updates that answered well.
    let (mut wrong, mut anomalies) = (0, 0);
    for r in &results {
        let last = system.clone().final_state(keys.key(r.user)).await;
        let final_state = last.as_ref().map(|s| (s.status.as_str(), s.version));
        match options.workload {
            Workload::Pairs => {
                let answered = r.answers.first()
                    == Some(&(
                        Answer::Transition(RESERVED.into()),
                        Answer::Transition(ASSOCIATED.into()),
                    ));
                if !answered || final_state != Some((ASSOCIATED, 2)) {
                    wrong += 1;
                }
            }
            Workload::Race { .. } => {
                let judged = r
                    .answers
                    .iter()
                    .all(|(a, b)| *a != Answer::Failed && *b != Answer::Failed);
                if judged && !serial_order_explains(&r.answers, final_state) {
                    anomalies += 1;
                }
            }
        }
    }
    Ok(Row {
        variant: String::new(),
        workload: match options.workload {
            Workload::Pairs => "pairs".into(),
            Workload::Race { .. } => "race".into(),
        },
        offered_rate: rate,
        requests: total,
        seconds,
        throughput: (total - errors) as f64 / seconds,
        p50_us: histogram.value_at_quantile(0.50) as f64,
        p99_us: histogram.value_at_quantile(0.99) as f64,
        p999_us: histogram.value_at_quantile(0.999) as f64,
        max_us: histogram.max() as f64,
        cpu_us_per_request: cpu.as_secs_f64() * 1e6 / total as f64,
        requests_per_commit,
        cpu_us_per_request_of,
        hot_partition,
        errors,
        wrong,
        anomalies,
        restart_seconds: None,
        routes_warm_seconds: None,
    })
}

const RESERVED: &str = "reserved";
const ASSOCIATED: &str = "associated";

/// The oracle of the race workload: whether some serial order of one user's requests (in each
/// round the reserve first or the associate first, rounds in sequence since each waits for the
/// previous answers) gives exactly the observed answers and leaves the observed final status and
/// version, with the reference rule deciding and an associate before any reserve finding no
/// route.
fn serial_order_explains(answers: &[(Answer, Answer)], observed: Option<(&str, u64)>) -> bool {
    fn apply(current: &Option<State>, routed: bool, kind: &str) -> (Option<State>, bool, Answer) {
        if kind == "associate" && !routed {
            return (current.clone(), routed, Answer::Rejected);
        }
        let request = RoutedRequest {
            id: String::new(),
            idempotent: false,
            kind: kind.into(),
            key: "k".into(),
            user: "u".into(),
            payload: "null".into(),
            received_at_ms: 0,
        };
        match (crate::native::REFERENCE.decide)(current.as_ref(), &request) {
            Ok(Outcome::Transition { status, data }) => {
                let state = State {
                    status: status.clone(),
                    user: "u".into(),
                    data,
                    version: current.as_ref().map_or(0, |s| s.version) + 1,
                    rule_version: String::new(),
                    updated_at_ms: 0,
                };
                (Some(state), true, Answer::Transition(status))
            }
            _ => (
                current.clone(),
                routed || kind == "reserve",
                Answer::Rejected,
            ),
        }
    }
    fn search(
        current: &Option<State>,
        routed: bool,
        answers: &[(Answer, Answer)],
        observed: Option<(&str, u64)>,
    ) -> bool {
        let Some(((reserve_answer, associate_answer), rest)) = answers.split_first() else {
            return current.as_ref().map(|s| (s.status.as_str(), s.version)) == observed;
        };
        for order in [["reserve", "associate"], ["associate", "reserve"]] {
            let (mid, mid_routed, first) = apply(current, routed, order[0]);
            let (end, end_routed, second) = apply(&mid, mid_routed, order[1]);
            let (got_reserve, got_associate) = if order[0] == "reserve" {
                (first, second)
            } else {
                (second, first)
            };
            if got_reserve == *reserve_answer
                && got_associate == *associate_answer
                && search(&end, end_routed, rest, observed)
            {
                return true;
            }
        }
        false
    }
    search(&None, false, answers, observed)
}

/// User + system CPU time of process `pid` (`self` for this one), from `/proc/PID/stat` (clock
/// ticks of 10 ms, the Linux default).
fn process_cpu_time(pid: &str) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may contain spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the whole line, 11 and 12 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// The results as a table, with ratios against the first row of the same rate.
pub fn render(rows: &[Row], options: &BenchOptions) -> String {
    let mut out = format!(
        "turnstile bench: workload {:?}, {} partitions, {} users, durability {:?}, max batch {}, {} clients",
        options.workload,
        options.partitions,
        options.users,
        options.durability,
        options.max_batch,
        options.clients
    )
    .to_lowercase();
    if let Some(exponent) = options.zipf {
        out.push_str(&format!(", partitions skewed by zipf {exponent}"));
    }
    out.push_str("\n\n");
    out.push_str(&format!(
        "{:<18} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>6} {:>6} {:>9} {:>14}\n",
        "variant",
        "offered",
        "req/s",
        "p50 µs",
        "p99 µs",
        "p999 µs",
        "max µs",
        "CPU µs",
        "per commit",
        "errors",
        "wrong",
        "anomalies",
        "turnstile ÷ it"
    ));
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.offered_rate == r.offered_rate)
            .map_or(r.throughput, |b| b.throughput);
        out.push_str(&format!(
            "{:<18} {:>9} {:>10.0} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>8.1} {:>10} {:>6} {:>6} {:>9} {:>14.2}\n",
            r.variant,
            r.offered_rate.map_or_else(|| "closed".to_string(), |o| format!("{o:.0}")),
            r.throughput,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.max_us,
            r.cpu_us_per_request,
            r.requests_per_commit
                .map_or_else(|| "-".to_string(), |n| format!("{n:.1}")),
            r.errors,
            r.wrong,
            r.anomalies,
            base / r.throughput
        ));
    }
    for r in rows {
        if let Some(hot) = &r.hot_partition {
            let rate = r
                .offered_rate
                .map_or_else(|| "closed loop".to_string(), |o| format!("{o:.0} req/s"));
            out.push_str(&format!(
                "{} ({rate}): the hottest partition had {:.0}% of the requests, p99 {:.0} µs; the others p99 {:.0} µs\n",
                r.variant,
                hot.share * 100.0,
                hot.p99_us,
                hot.others_p99_us
            ));
        }
    }
    for r in rows {
        for (label, us) in &r.cpu_us_per_request_of {
            let rate = r
                .offered_rate
                .map_or_else(|| "closed loop".to_string(), |o| format!("{o:.0} req/s"));
            out.push_str(&format!(
                "{} ({rate}): {label} CPU {us:.1} µs per request\n",
                r.variant
            ));
        }
    }
    for r in rows {
        if let Some(seconds) = r.restart_seconds {
            out.push_str(&format!(
                "{}: restart to ready {:.3} s with {} users' keys in the data dir",
                r.variant, seconds, options.users
            ));
            if let Some(warm) = r.routes_warm_seconds {
                out.push_str(&format!("; every stored route in the cache at {warm:.3} s"));
            }
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(status: &str) -> Answer {
        Answer::Transition(status.into())
    }

    fn options(partitions: u32, users: u64, zipf: f64) -> BenchOptions {
        BenchOptions {
            partitions,
            users,
            clients: 1,
            durability: Durability::None,
            max_batch: 1,
            rule: None,
            compare: false,
            workload: Workload::Pairs,
            rates: Vec::new(),
            url: None,
            restart: false,
            cpu: Vec::new(),
            zipf: Some(zipf),
        }
    }

    /// `--zipf`: every key lands in the partition its draw chose, by the partitioner the runtime
    /// is configured with, and the shares come out as the law says.
    #[test]
    fn zipf_keys_land_where_the_law_puts_them() {
        for partitions in [2, 4, 7, 256] {
            let options = options(partitions, 3000, 1.0);
            let keys = Keys::new(&options);
            let config = base_config(&options, PathBuf::new());
            let partitioner = Partitioner::new(config.partitions.hash, partitions);
            let cumulative = zipf_cumulative(partitions, 1.0);
            let mut in_zero = 0;
            for u in 0..options.users {
                let key = keys.key(u);
                let landed = partitioner.partition(&key);
                assert_eq!(landed, zipf_rank(&cumulative, u), "{partitions}: {key}");
                assert_eq!(keys.hot(u), landed == 0);
                in_zero += u64::from(landed == 0);
            }
            let share = in_zero as f64 / options.users as f64;
            let expected = cumulative[0];
            assert!(
                (share - expected).abs() < 0.05,
                "{partitions} partitions: {share} in partition 0, the law says {expected}"
            );
        }
        // Without the option, keys are as they always were and no one is hot.
        let plain = Keys::new(&BenchOptions {
            zipf: None,
            ..options(4, 10, 1.0)
        });
        assert_eq!(plain.key(3), format!("B-{}-3", plain.run));
        assert!(!plain.hot(0));
    }

    #[test]
    fn the_oracle_accepts_serial_outcomes_and_refuses_lost_updates() {
        // Reserve first, then the associate, then a second round that changes nothing.
        let serial = [
            (t(RESERVED), t(ASSOCIATED)),
            (Answer::Rejected, Answer::Rejected),
        ];
        assert!(serial_order_explains(&serial, Some((ASSOCIATED, 2))));
        // Associate first (no route or no reservation), then the second round associates.
        let late = [
            (t(RESERVED), Answer::Rejected),
            (Answer::Rejected, t(ASSOCIATED)),
        ];
        assert!(serial_order_explains(&late, Some((ASSOCIATED, 2))));
        // Both answered transitions but the store kept the reserve: a lost update.
        assert!(!serial_order_explains(&serial, Some((RESERVED, 1))));
        // Two reserves that both answered `reserved`.
        let double = [
            (t(RESERVED), Answer::Rejected),
            (t(RESERVED), Answer::Rejected),
        ];
        assert!(!serial_order_explains(&double, Some((RESERVED, 1))));
    }
}
