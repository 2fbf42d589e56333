//! The session's shared consumers: one librdkafka consumer reads the requests topic for every
//! partition this process owns, another reads an owner's changelog partition back (only while a
//! read-back needs it: see `changelog.rs`), and each partition thread takes its own partition's
//! queue out of them (`split_partition_queue`), so it still reads only its partition, at its own
//! position, as if it had a consumer of its own.
//!
//! Why: a consumer per owned partition and a read-back consumer per owned partition made about
//! 28 librdkafka clients per process, each with its own broker threads waking up to poll; the
//! profile of the consume benchmark spent most of its samples in the kernel's scheduling and
//! polling (BENCHMARKS.md, issue 15). Two clients fetch the same records with a fraction of the
//! threads and requests.
//!
//! A partition's queue is split off before its partition is added to the consumer's assignment
//! (`incremental_assign`; an `assign` would take the other partitions' queues back), so no record
//! of it ever reaches the consumer's main queue. A pump thread serves that main queue (errors and
//! other events); if a record turned up there all the same, its partition thread would not see
//! it, so the partition is marked and restores from its checkpoint rather than skip it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer, DefaultConsumerContext};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::consumer_config;
use crate::config::KafkaConfig;

/// One shared consumer and the partitions it is found to have delivered to its main queue.
struct SharedConsumer {
    consumer: Arc<BaseConsumer>,
    /// Partitions a record of which reached the main queue (see the module docs).
    strays: Mutex<HashSet<i32>>,
}

/// The two shared consumers of one session, and the thread that serves their main queues.
pub(super) struct SessionConsumers {
    requests: SharedConsumer,
    changelog: SharedConsumer,
    /// Ends the pump thread (set on drop).
    stop: Arc<AtomicBool>,
    pump: Mutex<Option<JoinHandle<()>>>,
}

/// Which of the session's consumers a partition reads from.
#[derive(Clone, Copy, Debug)]
pub(super) enum Source {
    /// The requests topic.
    Requests,
    /// The changelog topic, read back by its owner.
    Changelog,
}

impl SessionConsumers {
    /// Creates both consumers (nothing assigned yet) and the pump thread.
    pub(super) fn start(kafka: &KafkaConfig) -> anyhow::Result<Arc<SessionConsumers>> {
        let create = |role: &str, wait_ms: &str| -> anyhow::Result<SharedConsumer> {
            let consumer: BaseConsumer = consumer_config(kafka)
                .set("group.id", format!("{}-{role}", kafka.group))
                .set("enable.auto.commit", "false")
                .set("fetch.wait.max.ms", wait_ms)
                .create()
                .with_context(|| format!("creating the shared {role} consumer"))?;
            Ok(SharedConsumer {
                consumer: Arc::new(consumer),
                strays: Mutex::new(HashSet::new()),
            })
        };
        let consumers = Arc::new(SessionConsumers {
            requests: create("partition", "10")?,
            changelog: create("tail", "5")?,
            stop: Arc::new(AtomicBool::new(false)),
            pump: Mutex::new(None),
        });
        let pump = {
            let (stop, weak) = (consumers.stop.clone(), Arc::downgrade(&consumers));
            std::thread::Builder::new()
                .name("kafka-consumers".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let Some(consumers) = weak.upgrade() else {
                            return;
                        };
                        consumers.requests.serve_main_queue();
                        consumers.changelog.serve_main_queue();
                    }
                })?
        };
        *consumers.pump.lock().unwrap_or_else(|e| e.into_inner()) = Some(pump);
        Ok(consumers)
    }

    fn shared(&self, source: Source) -> &SharedConsumer {
        match source {
            Source::Requests => &self.requests,
            Source::Changelog => &self.changelog,
        }
    }

    /// The consumer behind `source`, for the fetcher registry and watermark queries.
    pub(super) fn consumer(&self, source: Source) -> &Arc<BaseConsumer> {
        &self.shared(source).consumer
    }

    /// Starts reading partition `p` of `topic` at `offset` through a queue of its own; the
    /// partition leaves the assignment when the returned reader is dropped.
    pub(super) fn read(
        self: &Arc<Self>,
        source: Source,
        topic: &str,
        p: u32,
        offset: i64,
    ) -> anyhow::Result<PartitionReader> {
        let shared = self.shared(source);
        shared
            .strays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(p as i32));
        // Split first: the fetch starts with the assignment, and its records must go to the
        // partition's queue from the first one.
        let queue = shared
            .consumer
            .split_partition_queue(topic, p as i32)
            .with_context(|| {
                format!("taking partition {p} of {topic} out of the shared consumer")
            })?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p as i32, Offset::Offset(offset))?;
        shared
            .consumer
            .incremental_assign(&tpl)
            .with_context(|| format!("adding partition {p} of {topic} to the shared consumer"))?;
        Ok(PartitionReader {
            consumers: self.clone(),
            source,
            queue,
            assignment: tpl,
            partition: p as i32,
        })
    }
}

impl SharedConsumer {
    /// Serves the main queue for a while: events, and records that should not be there.
    fn serve_main_queue(&self) {
        match self.consumer.poll(Duration::from_millis(50)) {
            Some(Ok(message)) => {
                tracing::error!(
                    topic = message.topic(),
                    partition = message.partition(),
                    offset = message.offset(),
                    "a record reached the shared consumer's main queue instead of its partition's; the partition restores to read it"
                );
                self.strays
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(message.partition());
            }
            Some(Err(e)) => tracing::debug!("shared consumer: {e}"),
            None => {}
        }
    }
}

impl Drop for SessionConsumers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let pump = self.pump.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(pump) = pump
            && pump.thread().id() != std::thread::current().id()
        {
            let _ = pump.join();
        }
    }
}

/// One partition's queue of a shared consumer.
pub(super) struct PartitionReader {
    consumers: Arc<SessionConsumers>,
    source: Source,
    queue: PartitionQueue<DefaultConsumerContext>,
    /// The partition with its start offset, to remove it again on drop.
    assignment: TopicPartitionList,
    partition: i32,
}

impl PartitionReader {
    /// The partition's queue.
    pub(super) fn queue(&self) -> &PartitionQueue<DefaultConsumerContext> {
        &self.queue
    }

    /// The shared consumer (for watermark queries).
    pub(super) fn consumer(&self) -> &BaseConsumer {
        self.consumers.consumer(self.source)
    }

    /// True once if a record of this partition reached the shared main queue, which this
    /// reader then never sees: the partition must restore.
    pub(super) fn missed_a_record(&self) -> bool {
        self.consumers
            .shared(self.source)
            .strays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&self.partition)
    }
}

impl Drop for PartitionReader {
    fn drop(&mut self) {
        if let Err(e) = self
            .consumers
            .consumer(self.source)
            .incremental_unassign(&self.assignment)
        {
            tracing::warn!(
                partition = self.partition,
                "removing a partition from the shared consumer: {e}"
            );
        }
    }
}
