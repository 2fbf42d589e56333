//! `turnstile bench --kafka CLUSTER.toml`: the patent's own setting, measured against a floor.
//!
//! In the patent, requests arrive on a queue and partition threads consume them. This bench is
//! the outside producer: it writes each user's `reserve` and then `associate` (both keyed, to the
//! partition the cluster's hash picks, the way an external producer would) to the cluster's
//! requests topic, and reads the outcomes topic until every request has its outcome. The
//! Turnstile processes under test are started by the user with the same configuration file.
//!
//! **The floor.** In the same run, the same load goes through a *pass-through pipe* on the same
//! broker: a child process (`turnstile bench-pipe`, one thread and one consumer per partition, as
//! Turnstile has) that reads each batch of requests, produces one changelog record per request
//! and waits for the broker's acknowledgement (the durability a Turnstile answer has), then
//! produces one outcome per request. No state, no rule, no read-back: the broker's limit for
//! this work on this machine. Turnstile's throughput is reported as a ratio of it.
//!
//! Figures per run: requests per second from the first send to the last outcome, end-to-end
//! latency (scheduled send → outcome read back by the bench) in an HDR histogram, and the CPU
//! time per request of each component named with `--cpu label=PID` (the broker, each Turnstile
//! process), of the pipe, and of the load generator itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::{Config, KafkaConfig};
use crate::kafka::RequestRecord;
use crate::model::{RoutedRequest, now_ms};
use crate::router::Partitioner;

/// What to run.
#[derive(Debug, Clone)]
pub struct KafkaBenchOptions {
    /// The cluster's configuration (brokers, topics, partitions, hash), as the processes under
    /// test run with it.
    pub config: Config,
    /// Users; each sends `reserve` then `associate`.
    pub users: u64,
    /// Open-loop send rates, requests per second, one run each; empty: send everything at once
    /// (a backlog, which measures capacity).
    pub rates: Vec<f64>,
    /// Processes whose CPU time is reported, by label (e.g. `broker`, `turnstile-1`).
    pub cpu: Vec<(String, u32)>,
    /// Run the pass-through floor too.
    pub floor: bool,
    /// How long to wait without a new outcome before counting the rest as missing.
    pub idle_timeout: Duration,
}

/// One run against one target.
#[derive(Debug, Clone, Serialize)]
pub struct KafkaRow {
    /// `turnstile` or `pipe (floor)`.
    pub target: String,
    /// The open-loop rate, req/s; `None` for a backlog.
    pub offered_rate: Option<f64>,
    /// Requests sent.
    pub requests: u64,
    /// Seconds from the first send to the last outcome.
    pub seconds: f64,
    /// Outcomes per second over those seconds.
    pub throughput: f64,
    /// End-to-end latency, µs: from the request's scheduled send to its outcome read back.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Slowest, µs.
    pub max_us: f64,
    /// Outcomes that carried an error.
    pub errors: u64,
    /// Outcomes that were the rule's reject (each user's `associate` follows its `reserve` on
    /// one partition, so a correct run has none).
    pub rejected: u64,
    /// Requests with no outcome when the bench stopped waiting.
    pub missing: u64,
    /// CPU µs per request of each component, by label (`load generator`, `pipe`, and `--cpu`).
    pub cpu_us_per_request: Vec<(String, f64)>,
}

/// Runs the bench: the floor first (when asked), then Turnstile, for each rate.
pub fn run(
    options: &KafkaBenchOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> anyhow::Result<Vec<KafkaRow>> {
    let kafka =
        options.config.kafka.clone().context(
            "the configuration has no [kafka] section: --kafka needs the cluster's file",
        )?;
    let partitioner = Partitioner::new(
        options.config.partitions.hash,
        options.config.partitions.count(),
    );
    let loads: Vec<Option<f64>> = if options.rates.is_empty() {
        vec![None]
    } else {
        options.rates.iter().copied().map(Some).collect()
    };
    let mut rows = Vec::new();
    for rate in loads {
        if options.floor {
            rows.push(run_floor(options, &kafka, partitioner, rate, progress)?);
        }
        let target = Target {
            label: "turnstile".into(),
            requests_topic: kafka.requests_topic.clone(),
            outcomes_topic: kafka.outcomes_topic.clone(),
            cpu: options.cpu.clone(),
        };
        rows.push(drive(
            options,
            &kafka,
            partitioner,
            &target,
            rate,
            progress,
        )?);
    }
    Ok(rows)
}

/// Where one run sends its requests and reads its outcomes.
struct Target {
    /// The row's name.
    label: String,
    /// Topic the requests are produced to.
    requests_topic: String,
    /// Topic the outcomes are read from.
    outcomes_topic: String,
    /// Processes whose CPU time is measured during the run.
    cpu: Vec<(String, u32)>,
}

/// Creates fresh topics for the floor, starts the pipe as a child process, drives it, stops it.
fn run_floor(
    options: &KafkaBenchOptions,
    kafka: &KafkaConfig,
    partitioner: Partitioner,
    rate: Option<f64>,
    progress: &mut dyn FnMut(u64, u64),
) -> anyhow::Result<KafkaRow> {
    let prefix = format!("turnstile-floor-{:08x}", rand::random::<u32>());
    let floor = KafkaConfig {
        requests_topic: format!("{prefix}-requests"),
        outcomes_topic: format!("{prefix}-outcomes"),
        changelog_topic: format!("{prefix}-changelog"),
        routes_topic: format!("{prefix}-routes"),
        ..kafka.clone()
    };
    crate::kafka::ensure_topics(&floor, partitioner.partitions())?;
    let exe = std::env::current_exe().context("finding the turnstile binary for the pipe")?;
    let mut pipe = std::process::Command::new(exe)
        .args([
            "bench-pipe",
            "--brokers",
            &floor.brokers,
            "--requests-topic",
            &floor.requests_topic,
            "--outcomes-topic",
            &floor.outcomes_topic,
            "--changelog-topic",
            &floor.changelog_topic,
            "--partitions",
            &partitioner.partitions().to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("starting the pass-through pipe")?;
    let mut cpu = options.cpu.clone();
    cpu.push(("pipe".into(), pipe.id()));
    let target = Target {
        label: "pipe (floor)".into(),
        requests_topic: floor.requests_topic.clone(),
        outcomes_topic: floor.outcomes_topic.clone(),
        cpu,
    };
    let row = drive(options, &floor, partitioner, &target, rate, progress);
    // Closing its stdin stops the pipe.
    drop(pipe.stdin.take());
    let _ = pipe.wait();
    row
}

/// The record key, user and id of user `u`'s request (`r`eserve or `a`ssociate) in run `run`.
fn names(run: &str, u: u64) -> (String, String) {
    (format!("bk-{run}-{u}"), format!("bu-{run}-{u}"))
}

/// Sends `2 × users` requests to the target and reads outcomes until all are back (or the idle
/// timeout passes).
fn drive(
    options: &KafkaBenchOptions,
    kafka: &KafkaConfig,
    partitioner: Partitioner,
    target: &Target,
    rate: Option<f64>,
    progress: &mut dyn FnMut(u64, u64),
) -> anyhow::Result<KafkaRow> {
    let run = format!("{:08x}", rand::random::<u32>());
    let total = options.users * 2;
    // The cluster's own client properties (`[kafka.client]`: security, TLS), as its processes use.
    let base = crate::kafka::client_config(kafka);

    // Outcomes are read from each partition's end as it is now, so only this run's count.
    let reader: BaseConsumer = base
        .clone()
        .set("group.id", format!("turnstile-bench-{run}"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .context("creating the outcomes reader")?;
    let metadata = reader
        .fetch_metadata(Some(&target.outcomes_topic), Duration::from_secs(10))
        .with_context(|| format!("reading the metadata of {}", target.outcomes_topic))?;
    let outcome_partitions = metadata
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len() as i32);
    anyhow::ensure!(
        outcome_partitions > 0,
        "topic {} does not exist (start the cluster first)",
        target.outcomes_topic
    );
    let mut assignment = TopicPartitionList::new();
    for p in 0..outcome_partitions {
        let (_, high) = reader
            .fetch_watermarks(&target.outcomes_topic, p, Duration::from_secs(10))
            .context("reading the outcomes topic's end")?;
        assignment.add_partition_offset(&target.outcomes_topic, p, Offset::Offset(high))?;
    }
    reader.assign(&assignment)?;

    // Send times, ns since `origin`, by request index (0 until sent).
    let origin = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let idle_timeout = options.idle_timeout;
    let prefix = format!("b-{run}-");
    let collector = {
        let sent = sent.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("bench-outcomes".into())
            .spawn(move || collect(reader, &prefix, &sent, origin, total, idle_timeout, &stop))?
    };

    let cpu_before = cpu_times(&target.cpu);
    let producer: FutureProducer = base
        .clone()
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .set("message.timeout.ms", "60000")
        .create()
        .context("creating the producer")?;
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let send_errors = tokio.block_on(async {
        let mut deliveries = Vec::with_capacity(total as usize);
        let interval = rate.map(|r| Duration::from_secs_f64(1.0 / r));
        for i in 0..total {
            let u = i / 2;
            if let Some(interval) = interval {
                let due = origin + interval * i as u32;
                let now = Instant::now();
                if due > now {
                    tokio::time::sleep(due - now).await;
                }
                // Latency counts from the schedule, not from when the send happened.
                sent[i as usize].store(nanos(origin, due), Ordering::Relaxed);
            } else {
                sent[i as usize].store(nanos(origin, Instant::now()), Ordering::Relaxed);
            }
            let (key, user) = names(&run, u);
            let kind = if i % 2 == 0 { "reserve" } else { "associate" };
            let record = RequestRecord {
                request: RoutedRequest {
                    id: format!("b-{run}-{i}"),
                    idempotent: true,
                    kind: kind.into(),
                    key: key.clone(),
                    user,
                    payload: "null".into(),
                    received_at_ms: now_ms(),
                },
                fingerprint: String::new(),
            };
            let value = serde_json::to_vec(&record).expect("requests serialize");
            let partition = partitioner.partition(&key) as i32;
            loop {
                let record = FutureRecord::to(&target.requests_topic)
                    .key(&key)
                    .payload(&value)
                    .partition(partition);
                match producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((e, _)) => {
                        if !matches!(
                            e,
                            rdkafka::error::KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull
                            )
                        ) {
                            return Err(anyhow::Error::new(e).context("producing requests"));
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        }
        let mut errors = 0u64;
        for delivery in deliveries {
            if !matches!(delivery.await, Ok(Ok(_))) {
                errors += 1;
            }
        }
        anyhow::Ok(errors)
    })?;

    // Progress while the outcomes come in.
    let counted = loop {
        if collector.is_finished() {
            break collector
                .join()
                .map_err(|_| anyhow::anyhow!("the outcomes reader panicked"))?;
        }
        progress(OUTCOMES_SEEN.load(Ordering::Relaxed), total);
        std::thread::sleep(Duration::from_millis(100));
    };
    let cpu_after = cpu_times(&target.cpu);
    stop.store(true, Ordering::Relaxed);

    let Counted {
        histogram,
        seen,
        errors,
        rejected,
        last_outcome,
    } = counted;
    let seconds = last_outcome.map_or(0.0, |t| t.duration_since(origin).as_secs_f64());
    let mut cpu_us_per_request: Vec<(String, f64)> = target
        .cpu
        .iter()
        .zip(cpu_before.iter().zip(&cpu_after))
        .map(|((label, _), (before, after))| {
            (
                label.clone(),
                after.saturating_sub(*before).as_secs_f64() * 1e6 / total as f64,
            )
        })
        .collect();
    cpu_us_per_request.push((
        "load generator".into(),
        // The generator's own CPU: this process, minus nothing (the pipe is a child process).
        cpu_after
            .last()
            .copied()
            .unwrap_or_default()
            .saturating_sub(cpu_before.last().copied().unwrap_or_default())
            .as_secs_f64()
            * 1e6
            / total as f64,
    ));
    Ok(KafkaRow {
        target: target.label.clone(),
        offered_rate: rate,
        requests: total,
        seconds,
        throughput: if seconds > 0.0 {
            seen as f64 / seconds
        } else {
            0.0
        },
        p50_us: histogram.value_at_quantile(0.50) as f64,
        p99_us: histogram.value_at_quantile(0.99) as f64,
        p999_us: histogram.value_at_quantile(0.999) as f64,
        max_us: histogram.max() as f64,
        errors: errors + send_errors,
        rejected,
        missing: total - seen,
        cpu_us_per_request,
    })
}

/// Outcomes read so far in the running `drive`, for the progress bar.
static OUTCOMES_SEEN: AtomicU64 = AtomicU64::new(0);

/// What the outcomes reader counted.
struct Counted {
    /// End-to-end latencies, µs.
    histogram: Histogram<u64>,
    /// Requests with an outcome.
    seen: u64,
    /// Outcomes carrying an error.
    errors: u64,
    /// Outcomes carrying a reject.
    rejected: u64,
    /// When the last outcome was read.
    last_outcome: Option<Instant>,
}

fn nanos(origin: Instant, at: Instant) -> u64 {
    (at.duration_since(origin).as_nanos() as u64).max(1)
}

/// Reads outcomes of this run (ids starting with `prefix`) until all `total` are in, or none
/// came for `idle_timeout` once sending has started.
fn collect(
    reader: BaseConsumer,
    prefix: &str,
    sent: &[AtomicU64],
    origin: Instant,
    total: u64,
    idle_timeout: Duration,
    stop: &AtomicBool,
) -> Counted {
    OUTCOMES_SEEN.store(0, Ordering::Relaxed);
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("bounds");
    let mut answered = vec![false; total as usize];
    let (mut seen, mut errors, mut rejected) = (0u64, 0u64, 0u64);
    let mut last_outcome = None;
    let mut last_progress = Instant::now();
    while seen < total && !stop.load(Ordering::Relaxed) {
        let Some(message) = reader.poll(Duration::from_millis(100)) else {
            if last_progress.elapsed() > idle_timeout {
                break;
            }
            continue;
        };
        let Ok(message) = message else { continue };
        let now = Instant::now();
        let Some(payload) = message.payload() else {
            continue;
        };
        let Ok(outcome) = serde_json::from_slice::<serde_json::Value>(payload) else {
            continue;
        };
        let Some(index) = outcome["id"]
            .as_str()
            .and_then(|id| id.strip_prefix(prefix))
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|i| *i < answered.len())
        else {
            continue;
        };
        if std::mem::replace(&mut answered[index], true) {
            continue;
        }
        seen += 1;
        OUTCOMES_SEEN.store(seen, Ordering::Relaxed);
        match outcome["result"].get("Ok") {
            None => errors += 1,
            Some(decision) if decision["verdict"].get("reject").is_some() => rejected += 1,
            Some(_) => {}
        }
        let sent_at = sent[index].load(Ordering::Relaxed);
        let latency_us = (nanos(origin, now).saturating_sub(sent_at) / 1000).max(1);
        let _ = histogram.record(latency_us);
        last_outcome = Some(now);
        last_progress = now;
    }
    Counted {
        histogram,
        seen,
        errors,
        rejected,
        last_outcome,
    }
}

/// CPU time of each process, then of this one (last).
fn cpu_times(processes: &[(String, u32)]) -> Vec<Duration> {
    processes
        .iter()
        .map(|(_, pid)| super::process_cpu_time(&pid.to_string()))
        .chain(std::iter::once(super::process_cpu_time("self")))
        .collect()
}

/// The pass-through pipe (`turnstile bench-pipe`): one thread and one consumer per partition;
/// each batch's changelog records are acknowledged before its outcomes are produced, to the
/// outcomes partition numbered like the requests partition (where a Turnstile partition puts the
/// outcome of a record that names no reply partition: the same work). Runs until its standard
/// input closes.
pub fn pipe(
    brokers: &str,
    requests_topic: &str,
    outcomes_topic: &str,
    changelog_topic: &str,
    partitions: u32,
) -> anyhow::Result<()> {
    let mut base = ClientConfig::new();
    base.set("bootstrap.servers", brokers);
    // The same producer settings as a Turnstile process.
    let producer: FutureProducer = base
        .clone()
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .set("message.timeout.ms", "30000")
        .create()
        .context("creating the pipe's producer")?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for p in 0..partitions as i32 {
        let consumer: BaseConsumer = base
            .clone()
            .set("group.id", format!("{requests_topic}-pipe"))
            .set("enable.auto.commit", "false")
            // As a Turnstile partition's consumer.
            .set("fetch.wait.max.ms", "10")
            .create()
            .context("creating a pipe consumer")?;
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(requests_topic, p, Offset::Beginning)?;
        consumer.assign(&assignment)?;
        let producer = producer.clone();
        let stop = stop.clone();
        let (outcomes_topic, changelog_topic) =
            (outcomes_topic.to_string(), changelog_topic.to_string());
        threads.push(std::thread::spawn(move || {
            let tokio = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            while !stop.load(Ordering::Relaxed) {
                let mut batch: Vec<(String, Vec<u8>)> = Vec::new();
                let mut timeout = Duration::from_millis(50);
                while batch.len() < 256 {
                    match consumer.poll(timeout) {
                        Some(Ok(m)) => {
                            let key = m
                                .key()
                                .map(|k| String::from_utf8_lossy(k).into_owned())
                                .unwrap_or_default();
                            batch.push((key, m.payload().unwrap_or_default().to_vec()));
                            timeout = Duration::ZERO;
                        }
                        _ => break,
                    }
                }
                if batch.is_empty() {
                    continue;
                }
                tokio.block_on(async {
                    let changelog: Vec<_> = batch
                        .iter()
                        .filter_map(|(key, value)| {
                            producer
                                .send_result(
                                    FutureRecord::to(&changelog_topic)
                                        .key(key)
                                        .payload(value)
                                        .partition(p),
                                )
                                .ok()
                        })
                        .collect();
                    for delivery in changelog {
                        let _ = delivery.await;
                    }
                    let outcomes: Vec<_> = batch
                        .iter()
                        .filter_map(|(_, value)| {
                            let id = serde_json::from_slice::<serde_json::Value>(value)
                                .ok()
                                .and_then(|v| v["request"]["id"].as_str().map(str::to_string))?;
                            let outcome = serde_json::to_vec(&serde_json::json!({
                                "schema": 1, "id": id, "result": {"Ok": null}
                            }))
                            .expect("outcomes serialize");
                            producer
                                .send_result(
                                    FutureRecord::to(&outcomes_topic)
                                        .key(&id)
                                        .payload(&outcome)
                                        .partition(p),
                                )
                                .ok()
                        })
                        .collect();
                    for delivery in outcomes {
                        let _ = delivery.await;
                    }
                });
            }
        }));
    }
    // Stop when the bench closes our standard input.
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

/// The results as a table, with each target's throughput as a ratio of the floor of its rate.
pub fn render(rows: &[KafkaRow], options: &KafkaBenchOptions) -> String {
    let mut out = format!(
        "turnstile bench --kafka: {} users, {} partitions\n\n",
        options.users,
        options.config.partitions.count()
    );
    out.push_str(&format!(
        "{:<14} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>6} {:>7} {:>8}  CPU µs/request\n",
        "target",
        "offered",
        "req/s",
        "p50 µs",
        "p99 µs",
        "p999 µs",
        "max µs",
        "errors",
        "missing",
        "÷ floor"
    ));
    let floors: HashMap<Option<u64>, f64> = rows
        .iter()
        .filter(|r| r.target.starts_with("pipe"))
        .map(|r| (r.offered_rate.map(|x| x as u64), r.throughput))
        .collect();
    for r in rows {
        let ratio = floors
            .get(&r.offered_rate.map(|x| x as u64))
            .map_or_else(|| "-".to_string(), |f| format!("{:.2}", r.throughput / f));
        let cpu: Vec<String> = r
            .cpu_us_per_request
            .iter()
            .map(|(label, us)| format!("{label} {us:.0}"))
            .collect();
        out.push_str(&format!(
            "{:<14} {:>9} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>6} {:>8} {:>7} {:>8}  {}\n",
            r.target,
            r.offered_rate
                .map_or_else(|| "backlog".to_string(), |o| format!("{o:.0}")),
            r.throughput,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.max_us,
            r.errors,
            r.rejected,
            r.missing,
            ratio,
            cpu.join(", ")
        ));
    }
    out
}
