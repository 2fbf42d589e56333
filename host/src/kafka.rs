//! Kafka mode: several `turnstile run` processes share the partitions of a Kafka-protocol log,
//! the patent's own setting (N = servers × containers partitions, each consumed by one thread).
//!
//! # Topics
//!
//! | topic       | partitions | key         | value                                              |
//! |-------------|-----------:|-------------|----------------------------------------------------|
//! | requests    | N          | routing key | a routed request and its fingerprint               |
//! | changelog   | N          | routing key | per applied request: the key's new state, the route, the dedup entry, and the request's offset; or a restore fence |
//! | outcomes    | any        | request id  | the decision (or the error) for one request        |
//! | routes      | any        | user        | the user's route (key + when recorded)             |
//!
//! # How a request flows
//!
//! Any process's HTTP front end accepts a request, records the user's route (in its own cache and
//! on the routes topic, before routing: claim 5) or resolves it (claim 3), and produces the
//! request to the requests partition that Turnstile's partitioner picks, so a producer that is not
//! Turnstile can feed the topic with the same partitioner. It then waits for the outcome on the
//! outcomes topic, which every process reads.
//!
//! Every process joins one consumer group on the requests topic. The group consumer only serves
//! membership: the partitions it is given are paused on it, and each one gets its own dedicated
//! thread (1:1, the only writer) with its own consumer positioned exactly where the partition's
//! state says it stopped. On revocation the thread finishes its batch, flushes, and stops.
//!
//! # Delivery guarantee
//!
//! *State transitions are exactly once; answers are at least once.* A partition thread applies a
//! batch to its in-memory partition store, then writes one changelog record per request, each
//! carrying the request's offset together with the state, route and dedup entry it produced (so
//! the consumed offset is stored atomically with its effect), waits until the broker has them all,
//! and only then produces the outcomes. A process that gains a partition writes a fence record to
//! the changelog partition, reads the partition from the start up to its own fence (so it needs
//! no end-offset query), rebuilds the state, and resumes at the offset after the last one the
//! changelog holds. So a request is applied once whatever crashes or rebalances happen; a crash
//! between the changelog and the outcome loses only the answer, and a retry with the same id gets
//! it from the dedup entry.
//!
//! Not covered: fencing of a zombie owner (a process cut off from the group that keeps writing
//! after its partition moved), which Kafka Streams does with transactions; Tansu and this code do
//! not use transactions.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
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
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::config::{Config, Durability, KafkaConfig};
use crate::model::{Decision, Request, RoutedRequest, State, now_ms};
use crate::partition::{ApplyError, Decider, PartitionStats, apply_one};
use crate::router::{Partitioner, Route, RouteCache};
use crate::runtime::{RequestIds, SubmitError, validate};
use crate::sandbox::{CompiledRule, FailureKind, RuleFailure, RuleLimits, Sandbox};
use crate::store::{DedupEntry, Location, PartitionStore};

/// A record of the requests topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestRecord {
    /// The request as routed.
    pub request: RoutedRequest,
    /// Its dedup fingerprint (empty without a client id).
    pub fingerprint: String,
}

/// A record of the changelog topic.
#[allow(
    clippy::large_enum_variant,
    reason = "built and serialized once per request; boxing would only add an allocation"
)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChangelogRecord {
    /// The effect of one applied request.
    Applied {
        /// Offset of the request in the requests partition.
        source_offset: i64,
        /// The key.
        key: String,
        /// The key's state after the request (none if it still has none).
        state: Option<State>,
        /// The user whose route the request recorded.
        user: String,
        /// The route it recorded.
        route: Route,
        /// The dedup entry it left, for a request with a client id.
        dedup: Option<(String, DedupEntry)>,
    },
    /// Written by a process that is about to restore the partition; reading up to it means
    /// having read everything written before.
    Fence {
        /// Unique to one restore.
        id: String,
    },
}

/// A record of the outcomes topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutcomeRecord {
    /// The request id.
    pub id: String,
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
}

impl From<&ApplyError> for RemoteError {
    fn from(e: &ApplyError) -> Self {
        let code = match e {
            ApplyError::Rule(f) => f.kind.code(),
            ApplyError::IdConflict(_) => "id_conflict",
            ApplyError::Store(_) => "store_unavailable",
        };
        RemoteError {
            code: code.to_string(),
            message: e.to_string(),
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
}

/// Counters a Kafka partition thread publishes.
#[derive(Debug, Default)]
struct OwnedStats {
    restored: AtomicBool,
    restore_ms: AtomicU64,
    restored_records: AtomicU64,
    next_offset: AtomicI64,
    high_watermark: AtomicI64,
    partition: PartitionStats,
}

/// A partition this process owns: its thread and how to stop it.
struct Owned {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
    stats: Arc<OwnedStats>,
    reads: crossbeam_channel::Sender<StateRead>,
}

/// A read of one key's state, answered by the partition's thread.
type StateRead = (
    String,
    oneshot::Sender<Result<Option<State>, crate::store::StoreError>>,
);

/// Why a key's state could not be read in Kafka mode.
#[derive(Debug, thiserror::Error)]
pub enum KeyReadError {
    /// Another process owns the key's partition (or it is still being restored here).
    #[error("partition {0} is owned by another process")]
    NotOwned(u32),
    /// The partition's store failed.
    #[error("{0}")]
    Store(crate::store::StoreError),
}

/// What the group's rebalance callbacks and the partition threads share.
struct Shared {
    config: Config,
    kafka: KafkaConfig,
    sandbox: Arc<Sandbox>,
    rule: Arc<CompiledRule>,
    producer: FutureProducer,
    node_id: String,
    owned: Mutex<BTreeMap<u32, Owned>>,
}

/// One process of a Turnstile cluster in Kafka mode.
pub struct KafkaNode {
    shared: Arc<Shared>,
    partitioner: Partitioner,
    routes: Arc<RouteCache>,
    /// HTTP requests waiting for their outcome, by request id.
    pending: Arc<Mutex<HashMap<String, Vec<oneshot::Sender<OutcomeRecord>>>>>,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Makes ids for requests that come without one.
    ids: RequestIds,
    /// Request counts and latency, for `/metrics`.
    metrics: crate::metrics::RequestMetrics,
}

fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers)
        .set("socket.keepalive.enable", "true");
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
        ensure_topics(&kafka, n)?;

        let node_id = format!(
            "turnstile-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let producer: FutureProducer = client_config(&kafka)
            .set("client.id", &node_id)
            .set("acks", "all")
            // One request in flight per connection keeps each partition's records in order
            // even when a send is retried.
            .set("max.in.flight.requests.per.connection", "1")
            .set("enable.idempotence", "false")
            .set("linger.ms", "1")
            .set("message.timeout.ms", "30000")
            .create()
            .context("creating the Kafka producer")?;

        let shared = Arc::new(Shared {
            config: config.clone(),
            kafka: kafka.clone(),
            sandbox,
            rule,
            producer,
            node_id: node_id.clone(),
            owned: Mutex::new(BTreeMap::new()),
        });
        let node = Arc::new(KafkaNode {
            shared: shared.clone(),
            partitioner,
            routes: Arc::new(RouteCache::new(
                config.routes.capacity,
                config.routes.ttl_seconds * 1000,
            )),
            pending: Arc::default(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(Vec::new()),
            ids: RequestIds::new(node_id.clone()),
            metrics: crate::metrics::RequestMetrics::default(),
        });
        let threads = vec![
            node.spawn_routes_reader()?,
            node.spawn_outcomes_reader()?,
            spawn_group_member(shared, node.stop.clone())?,
        ];
        *node.threads.lock().unwrap_or_else(|e| e.into_inner()) = threads;
        tracing::info!(node = %node_id, partitions = n, brokers = %kafka.brokers, group = %kafka.group, "joined the Kafka cluster");
        Ok(node)
    }

    /// The partitioner.
    pub fn partitioner(&self) -> Partitioner {
        self.partitioner
    }

    /// This process's id in the cluster.
    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    /// Routes and produces a request, and waits for its outcome.
    pub async fn submit(&self, request: Request) -> Result<Decision, SubmitError> {
        let started = Instant::now();
        let kind = request.kind.clone();
        let result = self.route_and_wait(request).await;
        self.metrics.record(
            &kind,
            crate::metrics::OutcomeClass::of(&result),
            started.elapsed().as_micros() as u64,
        );
        result
    }

    async fn route_and_wait(&self, request: Request) -> Result<Decision, SubmitError> {
        validate(&request)?;
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
        let (request, fingerprint) = self.ids.route(request, key.clone(), received_at_ms);
        let id = request.id.clone();
        let record = RequestRecord {
            request,
            fingerprint,
        };
        let (reply, answer) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.clone())
            .or_default()
            .push(reply);
        let value = serde_json::to_vec(&record).expect("requests serialize");
        let sent = self
            .shared
            .producer
            .send(
                FutureRecord::to(&kafka.requests_topic)
                    .partition(partition as i32)
                    .key(&key)
                    .payload(&value),
                Duration::from_secs(30),
            )
            .await;
        if let Err((e, _)) = sent {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return Err(SubmitError::Store(format!("producing the request: {e}")));
        }
        match tokio::time::timeout(Duration::from_millis(kafka.reply_timeout_ms), answer).await {
            Ok(Ok(outcome)) => outcome.result.map_err(|e| e.into_submit_error(&id)),
            Ok(Err(_)) => Err(SubmitError::ShuttingDown),
            Err(_) => {
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                Err(SubmitError::Timeout(format!(
                    "no outcome for request `{id}` within {} ms; it may still be applied: retry with the same id",
                    kafka.reply_timeout_ms
                )))
            }
        }
    }

    /// The user's route: from this process's cache, which the routes topic fills. A route
    /// another process recorded a moment ago may still be on its way, so a miss waits up to
    /// `kafka.route_wait_ms` before it is an unknown route.
    async fn wait_for_route(&self, user: &str) -> Result<String, SubmitError> {
        let deadline = Instant::now() + Duration::from_millis(self.shared.kafka.route_wait_ms);
        loop {
            if let Some(route) = self.routes.lookup(user, now_ms()) {
                return Ok(route.key);
            }
            if Instant::now() >= deadline {
                return Err(SubmitError::UnknownRoute(user.to_string()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A key's state, if this process owns its partition.
    pub async fn key_state(&self, key: &str) -> Result<(u32, Option<State>), KeyReadError> {
        let partition = self.partitioner.partition(key);
        let reads = {
            let owned = self.shared.owned.lock().unwrap_or_else(|e| e.into_inner());
            match owned.get(&partition) {
                Some(o) if o.stats.restored.load(Ordering::Relaxed) => o.reads.clone(),
                _ => return Err(KeyReadError::NotOwned(partition)),
            }
        };
        let (reply, answer) = oneshot::channel();
        if reads.send((key.to_string(), reply)).is_err() {
            return Err(KeyReadError::NotOwned(partition));
        }
        match answer.await {
            Ok(Ok(state)) => Ok((partition, state)),
            Ok(Err(e)) => Err(KeyReadError::Store(e)),
            // The partition was revoked between the lookup and the read.
            Err(_) => Err(KeyReadError::NotOwned(partition)),
        }
    }

    /// The user's route as this process knows it.
    pub fn route(&self, user: &str) -> Option<Route> {
        self.routes.lookup(user, now_ms())
    }

    /// The partitions this process owns.
    pub fn owned_partitions(&self) -> Vec<OwnedPartitionInfo> {
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
                    rule_version: &self.shared.rule.version,
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
        crate::metrics::render_route_cache(&mut out, self.routes.len());
        out
    }

    /// Leaves the group (each owned partition finishes its batch and stops) and stops the readers.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
        stop_partitions(&self.shared, None);
    }

    fn spawn_routes_reader(self: &Arc<Self>) -> anyhow::Result<JoinHandle<()>> {
        let consumer = reader(
            &self.shared.kafka,
            &self.shared.kafka.routes_topic,
            Offset::Beginning,
        )?;
        let (routes, stop) = (self.routes.clone(), self.stop.clone());
        Ok(std::thread::Builder::new()
            .name("kafka-routes".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match consumer.poll(Duration::from_millis(100)) {
                        Some(Ok(message)) => {
                            let (Some(user), Some(value)) = (message.key(), message.payload())
                            else {
                                continue;
                            };
                            match (
                                std::str::from_utf8(user),
                                serde_json::from_slice::<Route>(value),
                            ) {
                                (Ok(user), Ok(route)) => routes.record(user, route),
                                _ => tracing::warn!(
                                    offset = message.offset(),
                                    "skipping an unreadable record of the routes topic"
                                ),
                            }
                        }
                        Some(Err(e)) => tracing::warn!("reading routes: {e}"),
                        None => {}
                    }
                }
            })?)
    }

    fn spawn_outcomes_reader(self: &Arc<Self>) -> anyhow::Result<JoinHandle<()>> {
        // From the beginning, not the end: end offsets are not reliable on every broker, and
        // outcomes of other requests are skipped cheaply.
        let consumer = reader(
            &self.shared.kafka,
            &self.shared.kafka.outcomes_topic,
            Offset::Beginning,
        )?;
        let (pending, stop) = (self.pending.clone(), self.stop.clone());
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
                            let waiting = pending
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&outcome.id);
                            for reply in waiting.into_iter().flatten() {
                                let _ = reply.send(outcome.clone());
                            }
                        }
                        Some(Err(e)) => tracing::warn!("reading outcomes: {e}"),
                        None => {}
                    }
                }
            })?)
    }
}

/// A consumer outside any group that reads every partition of `topic` from `offset`.
fn reader(kafka: &KafkaConfig, topic: &str, offset: Offset) -> anyhow::Result<BaseConsumer> {
    let consumer: BaseConsumer = client_config(kafka)
        .set("group.id", format!("{}-reader", kafka.group))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "20")
        .create()
        .with_context(|| format!("creating a reader of {topic}"))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("reading the metadata of {topic}"))?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    if partitions == 0 {
        bail!("topic {topic} has no partitions");
    }
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p as i32, offset)?;
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

/// Creates the topics that do not exist (requests and changelog with N partitions), and refuses
/// to start if the requests or changelog topic has another partition count.
fn ensure_topics(kafka: &KafkaConfig, n: u32) -> anyhow::Result<()> {
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
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, n as i32, TopicReplication::Fixed(1)))
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
        if let Err((topic, code)) = result
            && code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists
        {
            tracing::warn!(%topic, "could not create topic: {code}");
        }
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
        }
    }
}

fn spawn_group_member(
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    let kafka = shared.kafka.clone();
    let consumer: BaseConsumer<GroupContext> = client_config(&kafka)
        .set("group.id", &kafka.group)
        .set("client.id", &shared.node_id)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", kafka.session_timeout_ms.to_string())
        .set(
            "heartbeat.interval.ms",
            (kafka.session_timeout_ms / 3).max(100).to_string(),
        )
        .set("auto.offset.reset", "earliest")
        .create_with_context(GroupContext { shared })
        .context("creating the group consumer")?;
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
    let (reads, read_queue) = crossbeam_channel::bounded(1024);
    let thread = {
        let (shared, stop, stats) = (shared.clone(), stop.clone(), stats.clone());
        std::thread::Builder::new()
            .name(format!("kafka-p{p}"))
            .spawn(move || {
                if let Err(e) = run_partition(&shared, p, &stop, &stats, &read_queue) {
                    // A partition that cannot write its changelog must not answer anything
                    // more; stopping the process moves its partitions to the other processes.
                    tracing::error!(
                        partition = p,
                        "partition failed, stopping the process: {e:#}"
                    );
                    std::process::exit(1);
                }
            })
            .expect("spawning a partition thread")
    };
    owned.insert(
        p,
        Owned {
            stop,
            thread,
            stats,
            reads,
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

/// One owned partition: restore, then consume, apply, log, answer, until told to stop.
fn run_partition(
    shared: &Shared,
    p: u32,
    stop: &AtomicBool,
    stats: &OwnedStats,
    reads: &crossbeam_channel::Receiver<StateRead>,
) -> anyhow::Result<()> {
    let kafka = &shared.kafka;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let mut store = PartitionStore::open(
        &Location::Memory,
        p,
        Durability::None,
        shared.config.store.dedup_retention,
    )?;
    let (resume, records) = runtime.block_on(restore(shared, p, &mut store))?;
    stats.restored_records.store(records, Ordering::Relaxed);
    stats
        .restore_ms
        .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    stats.next_offset.store(resume, Ordering::Relaxed);
    stats.high_watermark.store(-1, Ordering::Relaxed);
    stats.restored.store(true, Ordering::Relaxed);
    tracing::info!(
        partition = p,
        records,
        resume_offset = resume,
        took_ms = started.elapsed().as_millis() as u64,
        "partition restored"
    );

    let consumer: BaseConsumer = client_config(kafka)
        .set("group.id", format!("{}-partition", kafka.group))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&kafka.requests_topic, p as i32, Offset::Offset(resume))?;
    consumer.assign(&tpl)?;
    let mut decider = Decider::Wasm(shared.sandbox.instantiate(shared.rule.clone(), p)?);
    let max_batch = shared.config.partitions.max_batch;
    let mut last_watermark = Instant::now();

    while !stop.load(Ordering::Relaxed) {
        while let Ok((key, reply)) = reads.try_recv() {
            let _ = reply.send(store.state(&key));
        }
        if last_watermark.elapsed() > Duration::from_secs(1) {
            last_watermark = Instant::now();
            if let Ok((_, high)) = consumer.fetch_watermarks(
                &kafka.requests_topic,
                p as i32,
                Duration::from_millis(500),
            ) {
                stats.high_watermark.store(high, Ordering::Relaxed);
            }
        }
        let mut batch: Vec<(i64, Result<RequestRecord, String>)> = Vec::new();
        let mut timeout = Duration::from_millis(50);
        while batch.len() < max_batch {
            match consumer.poll(timeout) {
                Some(Ok(message)) => {
                    let record = message
                        .payload()
                        .ok_or_else(|| "empty record".to_string())
                        .and_then(|v| serde_json::from_slice(v).map_err(|e| e.to_string()));
                    batch.push((message.offset(), record));
                    timeout = Duration::ZERO;
                }
                Some(Err(e)) => {
                    tracing::warn!(partition = p, "reading requests: {e}");
                    break;
                }
                None => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        runtime.block_on(apply_batch(
            shared,
            p,
            &mut store,
            &mut decider,
            stats,
            batch,
        ))?;
    }
    tracing::info!(partition = p, "partition stopped");
    Ok(())
}

/// Applies a batch, writes its changelog (and waits for it), then produces the outcomes.
async fn apply_batch(
    shared: &Shared,
    p: u32,
    store: &mut PartitionStore,
    decider: &mut Decider,
    stats: &OwnedStats,
    batch: Vec<(i64, Result<RequestRecord, String>)>,
) -> anyhow::Result<()> {
    let kafka = &shared.kafka;
    let now = now_ms();
    let mut changes: Vec<ChangelogRecord> = Vec::with_capacity(batch.len());
    let mut outcomes: Vec<OutcomeRecord> = Vec::with_capacity(batch.len());
    let last_offset = batch.last().map_or(0, |(o, _)| *o);
    store
        .write_batch(|tx| {
            for (offset, record) in &batch {
                let record = match record {
                    Ok(record) => record,
                    Err(e) => {
                        tracing::error!(
                            partition = p,
                            offset,
                            "skipping an unreadable request record: {e}"
                        );
                        continue;
                    }
                };
                let request = &record.request;
                tx.set_next_log_seq(*offset as u64 + 1);
                let applied = apply_one(
                    tx,
                    decider,
                    &stats.partition,
                    p,
                    now,
                    request,
                    &record.fingerprint,
                )?;
                let dedup = if request.idempotent {
                    tx.dedup(&request.id)?.map(|e| (request.id.clone(), e))
                } else {
                    None
                };
                changes.push(ChangelogRecord::Applied {
                    source_offset: *offset,
                    key: request.key.clone(),
                    state: tx.state(&request.key)?,
                    user: request.user.clone(),
                    route: Route {
                        key: request.key.clone(),
                        recorded_at_ms: request.received_at_ms,
                    },
                    dedup,
                });
                outcomes.push(OutcomeRecord {
                    id: request.id.clone(),
                    result: applied.result.map_err(|e| RemoteError::from(&e)),
                });
            }
            Ok(())
        })
        .context("applying a batch to the partition store")?;

    // The changelog first: an answer only leaves once its effect is in the log.
    let changelog: Vec<(String, Vec<u8>)> = changes
        .iter()
        .filter_map(|change| match change {
            ChangelogRecord::Applied { key, .. } => Some((
                key.clone(),
                serde_json::to_vec(change).expect("changelog records serialize"),
            )),
            ChangelogRecord::Fence { .. } => None,
        })
        .collect();
    produce_all(
        &shared.producer,
        &kafka.changelog_topic,
        Some(p as i32),
        &changelog,
    )
    .await
    .with_context(|| format!("writing the changelog of partition {p}"))?;
    stats.next_offset.store(last_offset + 1, Ordering::Relaxed);
    stats
        .partition
        .applied
        .fetch_add(outcomes.len() as u64, Ordering::Relaxed);
    stats.partition.batches.fetch_add(1, Ordering::Relaxed);
    stats.partition.batch_sizes.record(batch.len() as u64);

    let answers: Vec<(String, Vec<u8>)> = outcomes
        .iter()
        .map(|o| {
            (
                o.id.clone(),
                serde_json::to_vec(o).expect("outcomes serialize"),
            )
        })
        .collect();
    if let Err(e) = produce_all(&shared.producer, &kafka.outcomes_topic, None, &answers).await {
        // The effects are in the changelog; a retry with the same id gets the answer.
        tracing::warn!(partition = p, "producing outcomes: {e:#}");
    }
    Ok(())
}

/// Produces `records` (key, value) in order and waits until the broker has acknowledged all.
async fn produce_all(
    producer: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    records: &[(String, Vec<u8>)],
) -> anyhow::Result<()> {
    let mut deliveries = Vec::with_capacity(records.len());
    for (key, value) in records {
        loop {
            let mut record = FutureRecord::to(topic).key(key).payload(value);
            if let Some(p) = partition {
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
                Err((e, _)) => bail!("producing to {topic}: {e}"),
            }
        }
    }
    for delivery in deliveries {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => bail!("producing to {topic}: {e}"),
            Err(_) => bail!("producing to {topic}: the producer went away"),
        }
    }
    Ok(())
}

/// Rebuilds partition `p` from its changelog: writes a fence, reads from the start up to it,
/// and returns the offset to resume at and how many records were read.
async fn restore(
    shared: &Shared,
    p: u32,
    store: &mut PartitionStore,
) -> anyhow::Result<(i64, u64)> {
    let kafka = &shared.kafka;
    let fence = format!("{}-{:016x}", shared.node_id, rand::random::<u64>());
    let value = serde_json::to_vec(&ChangelogRecord::Fence { id: fence.clone() })?;
    shared
        .producer
        .send(
            FutureRecord::to(&kafka.changelog_topic)
                .partition(p as i32)
                .key("fence")
                .payload(&value),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("writing the restore fence of partition {p}: {e}"))?;

    let consumer: BaseConsumer = client_config(kafka)
        .set("group.id", format!("{}-restore", kafka.group))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&kafka.changelog_topic, p as i32, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut resume = 0i64;
    let mut records = 0u64;
    let mut pending: Vec<ChangelogRecord> = Vec::new();
    let mut reached = false;
    while !reached {
        if Instant::now() > deadline {
            bail!("restoring partition {p}: the fence did not come back within 120 s");
        }
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.context("reading the changelog")?;
        let Some(value) = message.payload() else {
            continue;
        };
        let record: ChangelogRecord = serde_json::from_slice(value).with_context(|| {
            format!(
                "changelog partition {p} offset {} is unreadable",
                message.offset()
            )
        })?;
        match &record {
            ChangelogRecord::Fence { id } => reached = *id == fence,
            ChangelogRecord::Applied { source_offset, .. } => {
                resume = resume.max(source_offset + 1);
                records += 1;
                pending.push(record);
            }
        }
        if pending.len() >= 1000 || reached {
            let drained = std::mem::take(&mut pending);
            store.write_batch(|tx| {
                for record in &drained {
                    if let ChangelogRecord::Applied {
                        key,
                        state,
                        user,
                        route,
                        dedup,
                        ..
                    } = record
                    {
                        if let Some(state) = state {
                            tx.put_state(key, state)?;
                        }
                        tx.record_route(user, route)?;
                        if let Some((id, entry)) = dedup {
                            tx.put_dedup(id, entry)?;
                        }
                    }
                }
                Ok(())
            })?;
        }
    }
    Ok((resume, records))
}
