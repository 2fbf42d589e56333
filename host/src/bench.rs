//! `turnstile bench`: load on the real runtime, and the baselines it is measured against, on the
//! same workload in the same process.
//!
//! The workload is the patent's: `users` users, each sending `reserve` (key + user) and then
//! `associate`. In process the two are sent back to back without waiting (the way a queue
//! delivers them), so ordering matters; over HTTP (`--url`) the client waits for the reserve's
//! answer first, as an HTTP client must.
//!
//! Variants (`--compare` runs all of them):
//! - `turnstile`: the runtime with the Wasm rule (router, route cache, partition threads, store),
//!   a fresh instance per call (the default `rule.isolation`).
//! - `turnstile-warm`: the same with `rule.isolation = "warm_instance_leaks_state"`: the cost of
//!   per-call isolation is the ratio of the two.
//! - `turnstile-native`: the same runtime with the reference rule compiled natively: the cost of
//!   the sandbox is the ratio of the two.
//! - `locked-workers`: the status-quo design the patent replaces: a pool of worker threads taking
//!   requests from one shared queue and updating a shared map under per-key locks, with the same
//!   Wasm rule (one instance per worker) and the same durability (an append-only file, fsynced
//!   per request with `sync`).
//! - `unordered-workers`: a naive multi-consumer: requests dealt round-robin to workers, no
//!   per-key serialization. It counts the users it gets wrong (not `associated` at the end).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::config::{Config, Durability};
use crate::model::{Outcome, Request, RoutedRequest, State, Verdict};
use crate::runtime::Runtime;
use crate::sandbox::{RuleLimits, Sandbox};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Partitions (and, for the baselines, worker threads).
    pub partitions: u32,
    /// Users; each sends two requests.
    pub users: u64,
    /// Concurrent clients (in process: tasks; over HTTP: connections).
    pub clients: usize,
    /// Store durability.
    pub durability: Durability,
    /// Most requests per group commit.
    pub max_batch: usize,
    /// The rule component (default: the embedded reference rule).
    pub rule: Option<Vec<u8>>,
    /// Run every baseline too.
    pub compare: bool,
    /// Drive running servers over HTTP instead (clients are spread over the URLs, e.g. the
    /// processes of a Kafka-mode cluster).
    pub url: Option<Vec<String>>,
}

/// One line of the results table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Which variant.
    pub variant: String,
    /// Requests sent.
    pub requests: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Requests per second.
    pub throughput: f64,
    /// Latency percentiles of one request, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Process CPU time (user + system) per request, µs.
    pub cpu_us_per_request: f64,
    /// Users that did not end `associated` after exactly two transitions (a correct design has
    /// none). For the Turnstile variants this is judged from the answers, for the worker
    /// baselines from their final state.
    pub wrong: u64,
}

/// Runs the benchmark; `progress(done, total)` as it goes.
pub fn run(options: &BenchOptions, progress: &mut dyn FnMut(u64, u64)) -> anyhow::Result<Vec<Row>> {
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-client")
        .build()?;
    if let Some(urls) = &options.url {
        return Ok(vec![tokio.block_on(http(urls, options, progress))?]);
    }
    let mut rows = Vec::new();
    rows.push(turnstile_variant(&tokio, options, Decide::Wasm, progress)?);
    if options.compare {
        rows.push(turnstile_variant(
            &tokio,
            options,
            Decide::WasmWarm,
            progress,
        )?);
        rows.push(turnstile_variant(
            &tokio,
            options,
            Decide::Native,
            progress,
        )?);
        rows.push(workers_variant(
            &tokio,
            options,
            WorkerDesign::Locked,
            progress,
        )?);
        rows.push(workers_variant(
            &tokio,
            options,
            WorkerDesign::Unordered,
            progress,
        )?);
    }
    Ok(rows)
}

fn base_config(options: &BenchOptions, data_dir: PathBuf) -> Config {
    let mut config = Config::default();
    config.partitions.servers = 1;
    config.partitions.containers = options.partitions;
    config.partitions.max_batch = options.max_batch;
    config.partitions.queue_capacity = (options.clients * 4).max(1024);
    config.store.durability = options.durability;
    config.store.data_dir = Some(data_dir);
    config
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

fn reserve(u: u64) -> Request {
    Request {
        id: None,
        kind: "reserve".into(),
        key: Some(format!("B-{u}")),
        user: format!("bu-{u}"),
        payload: None,
    }
}

fn associate(u: u64, with_key: bool) -> Request {
    Request {
        id: None,
        kind: "associate".into(),
        key: with_key.then(|| format!("B-{u}")),
        user: format!("bu-{u}"),
        payload: None,
    }
}

/// Measures wall time, CPU time and latencies of one variant.
struct Measure {
    started: Instant,
    cpu_started: Duration,
    latencies_us: Vec<u32>,
}

impl Measure {
    fn start() -> Measure {
        Measure {
            started: Instant::now(),
            cpu_started: process_cpu_time(),
            latencies_us: Vec::new(),
        }
    }

    fn finish(mut self, variant: &str, requests: u64, wrong: u64) -> Row {
        let seconds = self.started.elapsed().as_secs_f64();
        let cpu = process_cpu_time().saturating_sub(self.cpu_started);
        self.latencies_us.sort_unstable();
        let pct = |p: f64| -> f64 {
            if self.latencies_us.is_empty() {
                return 0.0;
            }
            let i = ((self.latencies_us.len() as f64 * p).ceil() as usize)
                .clamp(1, self.latencies_us.len())
                - 1;
            f64::from(self.latencies_us[i])
        };
        Row {
            variant: variant.to_string(),
            requests,
            seconds,
            throughput: requests as f64 / seconds,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            p999_us: pct(0.999),
            cpu_us_per_request: cpu.as_secs_f64() * 1e6 / requests as f64,
            wrong,
        }
    }
}

/// User + system CPU time of this process, from `/proc/self/stat` (clock ticks of 10 ms, the
/// Linux default).
fn process_cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
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

/// Splits users over clients.
fn shares(users: u64, clients: usize) -> Vec<std::ops::Range<u64>> {
    let clients = clients.max(1) as u64;
    (0..clients)
        .map(|c| (users * c / clients)..(users * (c + 1) / clients))
        .collect()
}

/// How a Turnstile variant decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decide {
    /// The Wasm rule, a fresh instance per call.
    Wasm,
    /// The Wasm rule, one warm instance per partition.
    WasmWarm,
    /// The rule compiled into the host.
    Native,
}

fn turnstile_variant(
    tokio: &tokio::runtime::Runtime,
    options: &BenchOptions,
    decide: Decide,
    progress: &mut dyn FnMut(u64, u64),
) -> anyhow::Result<Row> {
    let dir = TempDir::new("turnstile")?;
    let mut config = base_config(options, dir.0.clone());
    if decide == Decide::WasmWarm {
        config.rule.isolation = crate::sandbox::Isolation::WarmInstanceLeaksState;
    }
    let runtime = Arc::new(if decide == Decide::Native {
        Runtime::start_native(&config, crate::native::REFERENCE)?
    } else {
        Runtime::start(&config, options.rule.clone())?
    });
    let total = options.users * 2;
    let done = Arc::new(AtomicU64::new(0));
    let measure = Measure::start();
    let tasks: Vec<_> = shares(options.users, options.clients)
        .into_iter()
        .map(|range| {
            let (runtime, done) = (runtime.clone(), done.clone());
            tokio.spawn(async move {
                let mut latencies = Vec::with_capacity((range.end - range.start) as usize * 2);
                let mut wrong = 0u64;
                for u in range {
                    let timed = |request: Request| {
                        let runtime = &runtime;
                        async move {
                            let t = Instant::now();
                            let r = runtime.submit(request).await;
                            (r, t.elapsed().as_micros() as u32)
                        }
                    };
                    // Polled in order: the reserve is queued before the associate, which is
                    // routed through the route cache the reserve just filled.
                    let ((r1, l1), (r2, l2)) =
                        tokio::join!(timed(reserve(u)), timed(associate(u, false)));
                    latencies.push(l1);
                    latencies.push(l2);
                    let ok = |r: &Result<crate::model::Decision, _>, status: &str| {
                        matches!(r, Ok(d) if matches!(&d.verdict, Verdict::Transition(s) if s.status == status))
                    };
                    if !(ok(&r1, "reserved") && ok(&r2, "associated")) {
                        wrong += 1;
                    }
                    done.fetch_add(2, Ordering::Relaxed);
                }
                (latencies, wrong)
            })
        })
        .collect();
    let mut measure = measure;
    let mut wrong = 0;
    for (latencies, client_wrong) in wait_with_progress(tokio, tasks, &done, total, progress)? {
        measure.latencies_us.extend(latencies);
        wrong += client_wrong;
    }
    let row = measure.finish(
        match decide {
            Decide::Wasm => "turnstile",
            Decide::WasmWarm => "turnstile-warm",
            Decide::Native => "turnstile-native",
        },
        total,
        wrong,
    );
    drop(runtime);
    Ok(row)
}

/// Waits for the client tasks, reporting progress, and returns what each returned.
fn wait_with_progress<T: Send + 'static>(
    tokio: &tokio::runtime::Runtime,
    tasks: Vec<tokio::task::JoinHandle<T>>,
    done: &AtomicU64,
    total: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> anyhow::Result<Vec<T>> {
    while !tasks.iter().all(|t| t.is_finished()) {
        progress(done.load(Ordering::Relaxed), total);
        std::thread::sleep(Duration::from_millis(100));
    }
    progress(total, total);
    tasks
        .into_iter()
        .map(|task| tokio.block_on(task).context("a bench client failed"))
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum WorkerDesign {
    /// One shared queue, per-key locks.
    Locked,
    /// Round-robin to per-worker queues, no per-key serialization.
    Unordered,
}

/// A job for a baseline worker.
struct Job {
    request: RoutedRequest,
    reply: oneshot::Sender<Result<Outcome, String>>,
}

/// The shared state of the baselines: a sharded map, per-key lock stripes, and a durable log.
struct Shared {
    shards: Vec<Mutex<HashMap<String, State>>>,
    key_locks: Vec<Mutex<()>>,
    log: Mutex<std::fs::File>,
    sync: bool,
}

impl Shared {
    fn index(&self, key: &str, len: usize) -> usize {
        (crate::router::java_string_hash(key).unsigned_abs() as usize) % len
    }
}

fn workers_variant(
    tokio: &tokio::runtime::Runtime,
    options: &BenchOptions,
    design: WorkerDesign,
    progress: &mut dyn FnMut(u64, u64),
) -> anyhow::Result<Row> {
    let dir = TempDir::new("workers")?;
    let sandbox = Sandbox::new(RuleLimits::from(&Config::default().rule))?;
    let bytes = options
        .rule
        .clone()
        .unwrap_or_else(|| crate::sandbox::REFERENCE_RULE.to_vec());
    let rule = sandbox.compile_shared(&bytes)?;
    let shared = Arc::new(Shared {
        shards: (0..64).map(|_| Mutex::default()).collect(),
        key_locks: (0..4096).map(|_| Mutex::default()).collect(),
        log: Mutex::new(std::fs::File::create(dir.0.join("log"))?),
        sync: options.durability == Durability::Sync,
    });
    let workers = options.partitions as usize;
    let (senders, receivers): (Vec<_>, Vec<_>) = match design {
        // One queue that every worker takes from.
        WorkerDesign::Locked => {
            let (tx, rx) = crossbeam_channel::bounded::<Job>(options.clients * 4);
            (vec![tx], vec![rx; workers])
        }
        // One queue per worker, dealt round-robin.
        WorkerDesign::Unordered => (0..workers)
            .map(|_| crossbeam_channel::bounded::<Job>(options.clients * 4))
            .unzip(),
    };
    let mut threads = Vec::new();
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
                            shared.key_locks[shared.index(&key, shared.key_locks.len())]
                                .lock()
                                .unwrap()
                        });
                        let shard = &shared.shards[shared.index(&key, shared.shards.len())];
                        let current = shard.lock().unwrap().get(&key).cloned();
                        let result = instance
                            .handle(current.as_ref(), &job.request)
                            .map_err(|e| e.message);
                        if let Ok(Outcome::Transition { status, data }) = &result {
                            let state = State {
                                status: status.clone(),
                                user: current
                                    .as_ref()
                                    .map_or_else(|| job.request.user.clone(), |s| s.user.clone()),
                                data: data.clone(),
                                version: current.as_ref().map_or(0, |s| s.version) + 1,
                                rule_version: String::new(),
                                updated_at_ms: job.request.received_at_ms,
                            };
                            let line = serde_json::to_vec(&(&key, &state)).expect("serializable");
                            let file = {
                                let mut log = shared.log.lock().unwrap();
                                let _ = log.write_all(&line);
                                let _ = log.write_all(b"\n");
                                log.try_clone()
                            };
                            if shared.sync
                                && let Ok(file) = file
                            {
                                let _ = file.sync_data();
                            }
                            shard.lock().unwrap().insert(key, state);
                        }
                        let _ = job.reply.send(result);
                    }
                })?,
        );
    }
    let senders = Arc::new(senders);
    let next = Arc::new(AtomicU64::new(0));
    let total = options.users * 2;
    let done = Arc::new(AtomicU64::new(0));
    let measure = Measure::start();
    let tasks: Vec<_> = shares(options.users, options.clients)
        .into_iter()
        .map(|range| {
            let (senders, next, done) = (senders.clone(), next.clone(), done.clone());
            tokio.spawn(async move {
                let mut latencies = Vec::new();
                for u in range {
                    // Queue the reserve, then the associate, then wait for both answers. Whether
                    // they were right is judged afterwards from the final state.
                    let first = enqueue(&senders, &next, reserve(u)).await;
                    let second = enqueue(&senders, &next, associate(u, true)).await;
                    let ((_, l1), (_, l2)) = tokio::join!(first, second);
                    latencies.push(l1);
                    latencies.push(l2);
                    done.fetch_add(2, Ordering::Relaxed);
                }
                latencies
            })
        })
        .collect();
    let mut measure = measure;
    measure.latencies_us = wait_with_progress(tokio, tasks, &done, total, progress)?
        .into_iter()
        .flatten()
        .collect();
    // Judge by the final state, which also catches lost updates that answered 200.
    let associated = shared
        .shards
        .iter()
        .map(|shard| {
            shard
                .lock()
                .unwrap()
                .values()
                .filter(|s| s.status == "associated" && s.version == 2)
                .count() as u64
        })
        .sum::<u64>();
    let wrong = options.users - associated;
    let name = match design {
        WorkerDesign::Locked => "locked-workers",
        WorkerDesign::Unordered => "unordered-workers",
    };
    let row = measure.finish(name, total, wrong);
    drop(senders);
    for t in threads {
        let _ = t.join();
    }
    Ok(row)
}

/// Queues a request to a baseline worker (waiting for room, like a producer would) and returns a
/// future of its answer and latency.
async fn enqueue(
    senders: &[crossbeam_channel::Sender<Job>],
    next: &AtomicU64,
    request: Request,
) -> impl std::future::Future<Output = (Result<Outcome, String>, u32)> + use<> {
    let (reply, answer) = oneshot::channel();
    let mut job = Job {
        request: RoutedRequest {
            id: String::new(),
            idempotent: false,
            kind: request.kind,
            key: request.key.unwrap_or_default(),
            user: request.user,
            payload: "null".into(),
            received_at_ms: crate::model::now_ms(),
        },
        reply,
    };
    let started = Instant::now();
    let sender = &senders[next.fetch_add(1, Ordering::Relaxed) as usize % senders.len()];
    let queued = loop {
        match sender.try_send(job) {
            Ok(()) => break true,
            Err(crossbeam_channel::TrySendError::Full(back)) => {
                job = back;
                tokio::task::yield_now().await;
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => break false,
        }
    };
    async move {
        let result = if queued {
            answer
                .await
                .unwrap_or_else(|_| Err("worker stopped".into()))
        } else {
            Err("queue closed".into())
        };
        (result, started.elapsed().as_micros() as u32)
    }
}

/// Drives a running server over HTTP: each client owns keep-alive connections and sends, per
/// user, the reserve and (after its answer) the associate by user.
async fn http(
    urls: &[String],
    options: &BenchOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> anyhow::Result<Row> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(options.clients)
        .build()?;
    let total = options.users * 2;
    let done = Arc::new(AtomicU64::new(0));
    let run_id = format!("{:08x}", rand::random::<u32>());
    let measure = Measure::start();
    let tasks: Vec<_> = shares(options.users, options.clients)
        .into_iter()
        .enumerate()
        .map(|(c, range)| {
            let url = urls[c % urls.len()].clone();
            let (client, done, run_id) = (client.clone(), done.clone(), run_id.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut wrong = 0u64;
                for u in range {
                    let mut ok = true;
                    for (kind, key) in [("reserve", true), ("associate", false)] {
                        let mut body =
                            serde_json::json!({"kind": kind, "user": format!("hu-{run_id}-{u}")});
                        if key {
                            body["key"] = format!("H-{run_id}-{u}").into();
                        }
                        let t = Instant::now();
                        let status = client
                            .post(format!("{url}/v1/requests"))
                            .json(&body)
                            .send()
                            .await
                            .map(|r| r.status().as_u16())
                            .unwrap_or(0);
                        latencies.push(t.elapsed().as_micros() as u32);
                        ok &= status == 200;
                    }
                    if !ok {
                        wrong += 1;
                    }
                    done.fetch_add(2, Ordering::Relaxed);
                }
                (latencies, wrong)
            })
        })
        .collect();
    while !tasks.iter().all(|t| t.is_finished()) {
        progress(done.load(Ordering::Relaxed), total);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    progress(total, total);
    let mut measure = measure;
    let mut wrong = 0;
    for task in tasks {
        let (l, w) = task.await?;
        measure.latencies_us.extend(l);
        wrong += w;
    }
    Ok(measure.finish("turnstile-http", total, wrong))
}

/// The results as a table, with ratios against the first row.
pub fn render(rows: &[Row], options: &BenchOptions) -> String {
    let mut out = format!(
        "turnstile bench: {} partitions, {} users ({} requests), durability {:?}, max batch {}, {} clients\n\n",
        options.partitions,
        options.users,
        options.users * 2,
        options.durability,
        options.max_batch,
        options.clients
    )
    .to_lowercase();
    out.push_str(&format!(
        "{:<18} {:>11} {:>9} {:>9} {:>9} {:>11} {:>8} {:>15}\n",
        "variant", "req/s", "p50 µs", "p99 µs", "p999 µs", "CPU µs/req", "wrong", "turnstile ÷ it"
    ));
    let base = rows.first().map_or(1.0, |r| r.throughput);
    for r in rows {
        out.push_str(&format!(
            "{:<18} {:>11.0} {:>9.0} {:>9.0} {:>9.0} {:>11.1} {:>8} {:>15.2}\n",
            r.variant,
            r.throughput,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.cpu_us_per_request,
            r.wrong,
            base / r.throughput
        ));
    }
    out
}
