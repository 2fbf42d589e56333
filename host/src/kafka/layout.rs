//! The cluster's layout, agreed in the cluster itself.
//!
//! Every process of a cluster must route alike and own partitions through one consumer group:
//! two processes with different `partitions.hash` send one key to two partitions (two users end
//! up holding one reservation), and two groups on the same topics both own every partition and
//! apply each request twice. Nothing in Kafka stops either. So the first process records the
//! layout — partition count, hash, group, topic names, changelog format — as the first record of
//! a one-partition topic named after the requests topic (`<requests_topic>-layout`, deleted by
//! nothing: `cleanup.policy=delete` with infinite retention), and every process compares its own
//! configuration with that first record before it joins, refusing to start with the setting
//! named when they differ.
//!
//! The first record wins: two processes that start at the same moment with different layouts
//! may both write one, and both then read the same first record, so exactly one of them starts.
//! Changing a cluster's layout means new topics (or deleting the layout topic while every
//! process is stopped).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::changelog::ChangelogFormat;
use crate::config::{Config, KafkaConfig};

/// The changelog format a new cluster records; a process joins a cluster whose recorded format
/// it writes (see [`ChangelogFormat`]), and writes that one.
pub const CHANGELOG_FORMAT: u32 = ChangelogFormat::NEWEST.number();

/// What every process of one cluster must agree on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// [`CHANGELOG_FORMAT`] of the process that recorded it.
    pub changelog_format: u32,
    /// N = servers × containers.
    pub partitions: u32,
    /// `partitions.hash`.
    pub hash: String,
    /// `kafka.group`.
    pub group: String,
    /// `kafka.requests_topic`.
    pub requests_topic: String,
    /// `kafka.outcomes_topic`.
    pub outcomes_topic: String,
    /// `kafka.changelog_topic`.
    pub changelog_topic: String,
    /// `kafka.routes_topic`.
    pub routes_topic: String,
    /// A random id the first process gave the cluster when it recorded the layout. Not a
    /// setting (never compared): a process remembers the id it joined, and a broker that later
    /// holds another id, or none, has lost the cluster's data (see [`super::watch`]).
    #[serde(default)]
    pub cluster: String,
}

impl Layout {
    /// This process's layout.
    pub fn of(config: &Config, kafka: &KafkaConfig) -> Layout {
        Layout {
            changelog_format: CHANGELOG_FORMAT,
            partitions: config.partitions.count(),
            hash: config.partitions.hash.name().into(),
            group: kafka.group.clone(),
            requests_topic: kafka.requests_topic.clone(),
            outcomes_topic: kafka.outcomes_topic.clone(),
            changelog_topic: kafka.changelog_topic.clone(),
            routes_topic: kafka.routes_topic.clone(),
            cluster: format!("{:016x}", rand::random::<u64>()),
        }
    }

    /// The settings where `self` (this process) differs from `agreed`, as
    /// "`setting` is X here but Y in the cluster".
    fn differences(&self, agreed: &Layout) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |setting: &str, here: String, there: String| {
            if here != there {
                out.push(format!(
                    "{setting} is {here:?} here but {there:?} in the cluster"
                ));
            }
        };
        check(
            "partitions.servers × partitions.containers",
            self.partitions.to_string(),
            agreed.partitions.to_string(),
        );
        check("partitions.hash", self.hash.clone(), agreed.hash.clone());
        check("kafka.group", self.group.clone(), agreed.group.clone());
        check(
            "kafka.requests_topic",
            self.requests_topic.clone(),
            agreed.requests_topic.clone(),
        );
        check(
            "kafka.outcomes_topic",
            self.outcomes_topic.clone(),
            agreed.outcomes_topic.clone(),
        );
        check(
            "kafka.changelog_topic",
            self.changelog_topic.clone(),
            agreed.changelog_topic.clone(),
        );
        check(
            "kafka.routes_topic",
            self.routes_topic.clone(),
            agreed.routes_topic.clone(),
        );
        // Every format this build writes is accepted: an upgraded process joins a cluster of
        // older ones and writes the cluster's format, which they read.
        if ChangelogFormat::from_number(agreed.changelog_format).is_none() {
            out.push(format!(
                "the changelog format is {} here (formats 1 and 2 are written) but {} in the cluster",
                self.changelog_format, agreed.changelog_format
            ));
        }
        out
    }
}

/// The layout topic of a cluster.
pub fn topic(kafka: &KafkaConfig) -> String {
    format!("{}-layout", kafka.requests_topic)
}

/// Records this process's layout if the cluster has none yet, then refuses to go on when the
/// cluster's (first) layout differs from it; returns the cluster's layout.
pub fn agree(
    kafka: &KafkaConfig,
    base: &rdkafka::config::ClientConfig,
    mine: &Layout,
) -> anyhow::Result<Layout> {
    let topic = topic(kafka);
    create_topic(base, &topic)?;
    let agreed = match first_record(kafka, base, &topic)? {
        Some(agreed) => agreed,
        None => {
            write(base, &topic, mine)?;
            let first = first_record(kafka, base, &topic)?
                .with_context(|| format!("the layout just written to {topic} cannot be read"))?;
            // Processes that start together may each write one; the first record is the
            // cluster's, so only its writer says it recorded the layout.
            if first.cluster == mine.cluster {
                tracing::info!(%topic, layout = ?first, "recorded the cluster's layout");
            }
            first
        }
    };
    let differences = mine.differences(&agreed);
    if !differences.is_empty() {
        return Err(LayoutMismatch {
            differences: differences.join("; "),
            topic,
        }
        .into());
    }
    tracing::info!(%topic, cluster = %agreed.cluster, "the layout agrees; joining this cluster");
    Ok(agreed)
}

/// This process's layout differs from the one recorded in the cluster: it must not join.
#[derive(Debug, thiserror::Error)]
#[error(
    "this process does not match the cluster it would join: {differences}; the cluster's layout is recorded in topic {topic} (use other topics for another layout, or delete that topic while every process is stopped)"
)]
pub struct LayoutMismatch {
    /// Each setting that differs, as "`setting` is X here but Y in the cluster".
    differences: String,
    /// The layout topic.
    topic: String,
}

/// The cluster id in the layout topic now: `None` when the topic is gone or empty (a broker
/// that lost its data). Never creates the topic.
pub fn cluster_id(
    kafka: &KafkaConfig,
    base: &rdkafka::config::ClientConfig,
) -> anyhow::Result<Option<String>> {
    let topic = topic(kafka);
    let probe: BaseConsumer = base.clone().create().context("creating the layout probe")?;
    let metadata = probe
        .fetch_metadata(Some(&topic), Duration::from_secs(5))
        .with_context(|| format!("reading the metadata of {topic}"))?;
    let exists = metadata
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
    if !exists {
        return Ok(None);
    }
    Ok(first_record(kafka, base, &topic)?.map(|layout| layout.cluster))
}

fn create_topic(base: &rdkafka::config::ClientConfig, topic: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        base.create().context("creating the Kafka admin client")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(1))
        .set("cleanup.policy", "delete")
        .set("retention.ms", "-1");
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let created = runtime
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(20),
                admin.create_topics([&new], &options),
            )
            .await
        })
        .map_err(|_| anyhow::anyhow!("creating topic {topic}: no answer within 20 s"))?
        .with_context(|| format!("creating topic {topic}"))?;
    for result in created {
        match result {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => bail!("creating the layout topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// The first readable layout record of the topic, if any.
fn first_record(
    kafka: &KafkaConfig,
    base: &rdkafka::config::ClientConfig,
    topic: &str,
) -> anyhow::Result<Option<Layout>> {
    let consumer: BaseConsumer = base
        .clone()
        .set("group.id", format!("{}-layout", kafka.group))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .context("creating the layout reader")?;
    // A topic just created may take a moment to have a leader.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (low, high) = loop {
        match consumer.fetch_watermarks(topic, 0, Duration::from_secs(5)) {
            Ok(marks) => break marks,
            Err(e) if Instant::now() > deadline => {
                return Err(anyhow::Error::new(e).context(format!("reading topic {topic}")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    if high <= low {
        return Ok(None);
    }
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Offset(low))?;
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.with_context(|| format!("reading topic {topic}"))?;
        if let Some(layout) = message
            .payload()
            .and_then(|p| serde_json::from_slice::<Layout>(p).ok())
        {
            return Ok(Some(layout));
        }
        if message.offset() + 1 >= high {
            // Records, but none a layout: not a topic this version wrote.
            bail!("topic {topic} holds no readable cluster layout; is it another program's topic?");
        }
    }
    bail!("reading topic {topic}: no record within 20 s although the broker reports {high}")
}

fn write(base: &rdkafka::config::ClientConfig, topic: &str, layout: &Layout) -> anyhow::Result<()> {
    let producer: FutureProducer = base
        .clone()
        .set("acks", "all")
        .set("message.timeout.ms", "20000")
        .create()
        .context("creating the layout writer")?;
    let value = serde_json::to_vec(layout).expect("layouts serialize");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime
        .block_on(
            producer.send(
                FutureRecord::to(topic)
                    .key("layout")
                    .payload(&value)
                    .partition(0),
                Duration::from_secs(20),
            ),
        )
        .map_err(|(e, _)| {
            anyhow::Error::new(e).context(format!("writing the layout to {topic}"))
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_differing_setting_is_named() {
        let mut config = Config::default();
        config.partitions.servers = 3;
        config.partitions.containers = 4;
        let kafka = KafkaConfig::default();
        let mine = Layout::of(&config, &kafka);
        assert!(mine.differences(&mine).is_empty());
        let mut other = mine.clone();
        other.hash = "murmur2".into();
        other.group = "another".into();
        let named = mine.differences(&other).join("; ");
        assert!(named.contains("partitions.hash"), "{named}");
        assert!(named.contains("kafka.group"), "{named}");
        assert!(!named.contains("kafka.routes_topic"), "{named}");
    }
}
