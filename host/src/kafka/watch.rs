//! The broker watch: notices that the cluster's broker is gone, and whether it came back with the
//! cluster's data or without it.
//!
//! Two things go wrong when a Kafka-protocol broker restarts without its data (a broker whose
//! storage was lost, or a test broker that keeps everything in memory):
//!
//! - the topics come back empty, or re-created by the broker with its default partition count,
//!   so every acknowledged state is gone while the processes keep applying requests as if
//!   nothing happened;
//! - librdkafka 2.12.1 (the newest the `rdkafka` crate bundles) dereferences a null topic name
//!   in `rd_kafka_metadata_update_op` when a fetch answer names a topic it no longer knows, and
//!   the process dies of a segfault.
//!
//! The crash needs a consumer fetching from the broker that came back, so the window between
//! the broker's death and the last consumer's end is closed twice over: every consumer is built
//! with a long reconnect backoff ([`super::consumer_config`]; a consumer's immediate reconnect is
//! refused by the dead broker and its next attempt comes seconds later), and every consumer is
//! registered in [`Fetchers`], which the watch pauses the moment the broker is lost, before
//! anything is closed.
//!
//! So a watch thread listens for librdkafka's "all brokers down" event and asks the broker for
//! the requests and changelog topics every `kafka.broker_check_ms`. On that event (a broker that
//! died closes every connection at once) the process suspends its share of the cluster (a
//! broker that is only silent, frozen or cut off, keeps its data and is waited for; failed
//! checks are logged after `BROKER_LOST_AFTER` in a row): every consumer (group member, partition threads, routes
//! and outcomes readers) is stopped and dropped, so none is left fetching when the broker
//! returns, and requests are answered 503 `cluster_unavailable`. When the broker answers again,
//! the watch checks that it still holds this cluster: the topics with their partition counts,
//! and the layout record with the cluster id this process joined. If so, the process rejoins
//! (partitions are restored from the changelog as after any move). If not, the data is gone:
//! the process logs why, stays suspended and answers 503 `cluster_data_lost` until an operator
//! restarts it; `/readyz` says not ready. While connected, the watch also re-checks the
//! partition counts on each round, which catches topics deleted and re-created under a running
//! cluster.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;

/// A consumer that the watch can stop fetching at once.
pub(crate) trait Fetching: Send + Sync {
    /// Pauses every partition assigned to it: no fetch is sent from now on.
    fn stop_fetching(&self);
}

impl<C: ConsumerContext + 'static> Fetching for BaseConsumer<C> {
    fn stop_fetching(&self) {
        if let Ok(assignment) = self.assignment() {
            let _ = self.pause(&assignment);
        }
    }
}

/// Every consumer of the process that fetches, so the watch can pause them all the moment the
/// broker is lost: closing them takes 0.2-0.6 s (each thread finishes what it was doing), and a
/// consumer created a few seconds before the broker died may reconnect within that time (its
/// reconnect backoff runs from its first connection), which is enough to meet a broker that
/// came back empty and crash. A pause is a flag librdkafka checks before each fetch.
#[derive(Default)]
pub(crate) struct Fetchers {
    inner: Mutex<FetchersInner>,
}

#[derive(Default)]
struct FetchersInner {
    /// Set between a halt and the next session: consumers registered meanwhile start paused.
    halted: bool,
    /// Weak, so a consumer dropped by its thread leaves the list on the next registration.
    consumers: Vec<std::sync::Weak<dyn Fetching>>,
}

impl Fetchers {
    /// Adds `consumer` (after its partitions are assigned); paused at once while halted.
    pub(crate) fn register<F: Fetching + 'static>(&self, consumer: &Arc<F>) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.consumers.retain(|c| c.strong_count() > 0);
        if inner.halted {
            consumer.stop_fetching();
        }
        let weak: std::sync::Weak<dyn Fetching> = Arc::downgrade(consumer) as _;
        inner.consumers.push(weak);
    }

    /// Pauses every registered consumer, and every one registered until [`Fetchers::reopen`];
    /// returns how many were paused.
    pub(crate) fn halt(&self) -> usize {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.halted = true;
        let live: Vec<Arc<dyn Fetching>> =
            inner.consumers.iter().filter_map(|c| c.upgrade()).collect();
        for consumer in &live {
            consumer.stop_fetching();
        }
        live.len()
    }

    /// Runs `start` (which makes a registered consumer fetch more, e.g. assigns it a partition)
    /// unless the broker is lost; returns whether it ran. Under the registry's lock, so a halt
    /// comes either before it (and it does not run) or after it (and pauses what it started).
    pub(crate) fn unless_halted<R>(&self, start: impl FnOnce() -> R) -> Option<R> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (!inner.halted).then(start)
    }

    /// A new session: consumers registered from now on fetch.
    pub(crate) fn reopen(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.halted = false;
        inner.consumers.retain(|c| c.strong_count() > 0);
    }
}

/// Failed checks in a row after which the broker counts as lost.
const BROKER_LOST_AFTER: u32 = 2;

/// Where this process stands with the cluster's broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterState {
    /// The broker answers and holds this cluster's data.
    Connected,
    /// The broker does not answer; this process's partitions are suspended until it does.
    Unreachable,
    /// The broker answered without this cluster's data (topics gone, re-created, or another
    /// cluster's layout): the partitions stay stopped until an operator restarts the process.
    DataLost,
}

impl ClusterState {
    fn from_u8(v: u8) -> ClusterState {
        match v {
            0 => ClusterState::Connected,
            1 => ClusterState::Unreachable,
            _ => ClusterState::DataLost,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            ClusterState::Connected => 0,
            ClusterState::Unreachable => 1,
            ClusterState::DataLost => 2,
        }
    }
}

/// The cluster state every front end checks before it produces, and why it is what it is.
#[derive(Debug, Default)]
pub struct ClusterHealth {
    /// A [`ClusterState`] as a number, read on every request.
    state: AtomicU8,
    /// Why the state is not `connected`, for errors, logs and `/v1/partitions`.
    reason: Mutex<String>,
}

impl ClusterHealth {
    /// The state now.
    pub fn state(&self) -> ClusterState {
        ClusterState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Why the state is what it is (empty when connected).
    pub fn reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Moves to `state`; data loss is final.
    pub(crate) fn set(&self, state: ClusterState, reason: String) {
        if self.state() == ClusterState::DataLost {
            return;
        }
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason;
        self.state.store(state.as_u8(), Ordering::Release);
    }
}

/// What a check of the broker found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Check {
    /// It answered, with the cluster's topics as this process knows them.
    Intact,
    /// It did not answer.
    Unreachable(String),
    /// It answered without the cluster's data; says what is missing.
    Lost(String),
}

/// The watch client's callbacks: librdkafka reports at once when every connection to the
/// brokers is down (a broker killed closes its sockets), much sooner than a check times out.
#[derive(Debug, Clone, Default)]
pub(crate) struct WatchContext {
    /// Set by librdkafka's "all brokers down"; taken by the watch.
    pub(crate) all_down: Arc<AtomicBool>,
}

impl ClientContext for WatchContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error, KafkaError::Global(RDKafkaErrorCode::AllBrokersDown)) {
            self.all_down.store(true, Ordering::Release);
        }
        tracing::debug!("broker watch: {error}: {reason}");
    }
}

impl ConsumerContext for WatchContext {}

/// Asks the broker for the metadata of the requests and changelog topics and compares their
/// partition counts with `partitions`. Metadata only: this client never fetches, so the
/// librdkafka crash above cannot happen in it.
pub(crate) fn check_topics<C: ConsumerContext>(
    client: &BaseConsumer<C>,
    kafka: &KafkaConfig,
    partitions: u32,
    timeout: Duration,
) -> Check {
    for topic in [&kafka.requests_topic, &kafka.changelog_topic] {
        let metadata = match client.fetch_metadata(Some(topic), timeout) {
            Ok(m) => m,
            Err(e) => return Check::Unreachable(format!("asking for topic {topic}: {e}")),
        };
        let Some(found) = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic.as_str())
        else {
            return Check::Lost(format!("topic {topic} is gone"));
        };
        if let Some(e) = found.error() {
            let code = e;
            if code == rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART {
                return Check::Lost(format!("topic {topic} is gone"));
            }
            return Check::Unreachable(format!("topic {topic}: {code:?}"));
        }
        let count = found.partitions().len() as u32;
        if count != partitions {
            return Check::Lost(format!(
                "topic {topic} has {count} partitions, not the cluster's {partitions} (it was deleted and created again)"
            ));
        }
    }
    Check::Intact
}

/// Counts failed checks in a row; says when the broker counts as lost.
#[derive(Debug, Default)]
pub(crate) struct Failures(u32);

impl Failures {
    /// Records one check's result; true when the broker has just counted as lost.
    pub(crate) fn lost_after(&mut self, failed: bool) -> bool {
        if !failed {
            self.0 = 0;
            return false;
        }
        self.0 += 1;
        self.0 == BROKER_LOST_AFTER
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_loss_is_final() {
        let health = ClusterHealth::default();
        assert_eq!(health.state(), ClusterState::Connected);
        health.set(ClusterState::Unreachable, "gone".into());
        assert_eq!(health.state(), ClusterState::Unreachable);
        health.set(ClusterState::DataLost, "empty".into());
        health.set(ClusterState::Connected, String::new());
        assert_eq!(health.state(), ClusterState::DataLost);
        assert_eq!(health.reason(), "empty");
    }

    #[test]
    fn the_broker_is_lost_after_failures_in_a_row() {
        let mut failures = Failures::default();
        assert!(!failures.lost_after(true));
        assert!(!failures.lost_after(false));
        assert!(!failures.lost_after(true));
        assert!(failures.lost_after(true));
        assert!(!failures.lost_after(true), "reported once");
    }
}
