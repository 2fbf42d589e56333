//! `turnstile inspect --changelog`: a cluster's changelog records as JSON lines, whatever the
//! format they were written in (binary since changelog format 2, JSON before), so the topic
//! stays readable by people and by `jq`. It reads from the broker outside the cluster's group
//! and writes nothing, so it can run beside a live cluster.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::json;

use super::changelog::{BINARY_MARK, ChangelogRecord};
use super::consumer_config;
use crate::config::Config;

/// How long the broker may stay silent before the command gives up.
const SILENCE: Duration = Duration::from_secs(30);

/// What [`inspect_changelog`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangelogSummary {
    /// The changelog topic.
    pub topic: String,
    /// Partitions read to their end.
    pub partitions: u32,
    /// Records read (printed, when they pass the key filter).
    pub records: u64,
    /// Records that could not be decoded (printed with an `error` instead of a `record`).
    pub undecodable: u64,
}

/// Prints the changelog records of `partition` (every partition when `None`) from the start
/// to the end the broker has now, one JSON object a line: `partition`, `offset`, `key` (the
/// Kafka key), `format` (1 or 2) and `record`, or `error` for a record that cannot be decoded.
/// With `key`, only the records of that Kafka key (`state/<key>`, `route/<user>`,
/// `dedup/<id>`, `progress`, `fence/<id>`).
pub fn inspect_changelog(
    config: &Config,
    partition: Option<u32>,
    key: Option<&str>,
    out: &mut impl Write,
) -> anyhow::Result<ChangelogSummary> {
    let kafka = config
        .kafka
        .as_ref()
        .context("the configuration has no [kafka] section: there is no changelog to read")?;
    let topic = &kafka.changelog_topic;
    let count = config.partitions.count();
    let partitions: Vec<u32> = match partition {
        Some(p) if p >= count => anyhow::bail!(
            "partition {p} does not exist: the configuration has {count} partitions (0 to {})",
            count - 1
        ),
        Some(p) => vec![p],
        None => (0..count).collect(),
    };
    let consumer: BaseConsumer = consumer_config(kafka)
        .set("group.id", format!("{}-inspect", kafka.group))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .context("creating the Kafka consumer")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| {
            format!(
                "reading the metadata of topic {topic} from {}",
                kafka.brokers
            )
        })?;
    let on_broker = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len() as u32);
    anyhow::ensure!(
        on_broker > 0,
        "the brokers at {} have no topic {topic} (kafka.changelog_topic)",
        kafka.brokers
    );
    anyhow::ensure!(
        on_broker == count,
        "topic {topic} has {on_broker} partitions but the configuration says {count}: not this configuration's cluster"
    );
    let mut assignment = TopicPartitionList::new();
    for &p in &partitions {
        assignment.add_partition_offset(topic, p as i32, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;

    let mut summary = ChangelogSummary {
        topic: topic.clone(),
        partitions: 0,
        records: 0,
        undecodable: 0,
    };
    let mut at_end = std::collections::BTreeSet::new();
    let mut progress = crate::progress::Progress::new("changelog partitions");
    let mut heard = Instant::now();
    while at_end.len() < partitions.len() {
        anyhow::ensure!(
            heard.elapsed() < SILENCE,
            "reading topic {topic}: nothing from the brokers for {} s ({} of {} partitions read to their end)",
            SILENCE.as_secs(),
            at_end.len(),
            partitions.len()
        );
        let Some(polled) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        heard = Instant::now();
        let message = match polled {
            Ok(message) => message,
            Err(KafkaError::PartitionEOF(p)) => {
                at_end.insert(p);
                progress.update(at_end.len() as u64, partitions.len() as u64);
                continue;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("reading topic {topic}"))),
        };
        summary.records += 1;
        let record_key = String::from_utf8_lossy(message.key().unwrap_or_default());
        if key.is_some_and(|k| k != record_key) {
            continue;
        }
        let value = message.payload().unwrap_or_default();
        let format = if value.first() == Some(&BINARY_MARK) {
            2
        } else {
            1
        };
        let mut line = json!({
            "partition": message.partition(),
            "offset": message.offset(),
            "key": record_key,
            "format": format,
        });
        match ChangelogRecord::decode(value) {
            Ok(record) => line["record"] = serde_json::to_value(&record)?,
            Err(e) => {
                summary.undecodable += 1;
                line["error"] = json!(e);
            }
        }
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")?;
    }
    progress.finish();
    out.flush()?;
    summary.partitions = at_end.len() as u32;
    Ok(summary)
}
