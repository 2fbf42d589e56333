//! The service the HTTP front end talks to: one interface over the two modes, with typed
//! errors, so a handler says what it wants and never which mode serves it.
//!
//! In local mode every partition is in this process ([`Runtime`]); in Kafka mode this process
//! owns some partitions of a cluster ([`KafkaNode`]), and a read of a partition another process
//! owns is [`ServiceError::NotOwned`].

use std::sync::Arc;

use crate::kafka::{KafkaNode, KeyReadError};
use crate::model::{Decision, Request, State};
use crate::reload::{HistoryEntry, InstallError, InstallReport};
use crate::router::Partitioner;
use crate::runtime::{ReadError, Runtime, SubmitError, UserView};
use crate::store::DeadLetter;

/// What serves requests: this process's partitions, or its share of a Kafka cluster's.
#[derive(Clone)]
pub enum Service {
    /// `turnstile run` on its own: every partition is in this process.
    Local(Arc<Runtime>),
    /// Kafka mode: this process owns some partitions of a cluster.
    Kafka(Arc<KafkaNode>),
}

/// Why a read or a dead-letter call could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The partition could not be read (busy, stopping, store trouble).
    #[error(transparent)]
    Read(#[from] ReadError),
    /// A resubmitted request failed.
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// Kafka mode: another process of the cluster owns the partition.
    #[error(
        "partition {partition} is owned by another process of the cluster; ask that process{}",
        owner_hint(owner)
    )]
    NotOwned {
        /// The partition.
        partition: u32,
        /// Its owner, as announced on the routes topic.
        owner: Option<crate::kafka::OwnerRecord>,
    },
    /// Kafka mode: the partition is between owners (revoked, and not yet restored by the next).
    #[error(
        "partition {partition} is moving between processes of the cluster; retry shortly{}",
        owner_hint(owner)
    )]
    Moving {
        /// The partition.
        partition: u32,
        /// The process restoring it, when known.
        owner: Option<crate::kafka::OwnerRecord>,
    },
}

/// " (at ADDRESS, node N)" for an error message, when the owner is known.
fn owner_hint(owner: &Option<crate::kafka::OwnerRecord>) -> String {
    match owner {
        Some(o) if !o.address.is_empty() => format!(" (at {}, node {})", o.address, o.node),
        Some(o) => format!(" (node {})", o.node),
        None => String::new(),
    }
}

impl From<KeyReadError> for ServiceError {
    fn from(e: KeyReadError) -> Self {
        match e {
            KeyReadError::NotOwned { partition, owner } => {
                ServiceError::NotOwned { partition, owner }
            }
            KeyReadError::Moving { partition, owner } => ServiceError::Moving { partition, owner },
            KeyReadError::Busy(p) => ServiceError::Read(ReadError::Backpressure(p)),
            KeyReadError::Store(e) => ServiceError::Read(ReadError::from(e)),
            KeyReadError::Cluster(e) => ServiceError::Submit(e),
        }
    }
}

impl Service {
    /// The partitioner, the same in both modes.
    pub fn partitioner(&self) -> Partitioner {
        match self {
            Service::Local(runtime) => runtime.partitioner(),
            Service::Kafka(node) => node.partitioner(),
        }
    }

    /// Routes and applies a request; answers once its effect is durable (local) or in the
    /// changelog (Kafka).
    pub async fn submit(&self, request: Request) -> Result<Decision, SubmitError> {
        match self {
            Service::Local(runtime) => runtime.submit(request).await,
            Service::Kafka(node) => node.submit(request).await,
        }
    }

    /// The committed state of `key` and its partition.
    pub async fn key_state(&self, key: &str) -> Result<(u32, Option<State>), ServiceError> {
        Ok(match self {
            Service::Local(runtime) => runtime.key_state(key).await?,
            Service::Kafka(node) => node.key_state(key).await?,
        })
    }

    /// The user's route and the state of its key; `None` for a user with no route.
    pub async fn user(&self, user: &str) -> Result<Option<UserView>, ServiceError> {
        match self {
            Service::Local(runtime) => Ok(runtime.user(user).await?),
            Service::Kafka(node) => {
                let Some(route) = node.route(user).await? else {
                    return Ok(None);
                };
                let (partition, state) = node.key_state(&route.key).await?;
                Ok(Some(UserView {
                    key: route.key,
                    partition,
                    recorded_at_ms: route.recorded_at_ms,
                    state,
                }))
            }
        }
    }

    /// Dead letters after sequence number `after`, at most `limit` per partition: of
    /// `partition`, or of every partition this process has (in Kafka mode, those it owns).
    pub async fn dead_letters(
        &self,
        partition: Option<u32>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, ServiceError> {
        let partitions = match partition {
            Some(p) => vec![p],
            None => (0..self.partitioner().partitions()).collect(),
        };
        let mut letters = Vec::new();
        for p in partitions {
            let page = match self {
                Service::Local(runtime) => runtime.dead_letters(p, after, limit).await?,
                Service::Kafka(node) => match node.dead_letters(p, after, limit).await {
                    Ok(page) => page,
                    // Listing all: the letters of the partitions this process owns.
                    Err(KeyReadError::NotOwned { .. } | KeyReadError::Moving { .. })
                        if partition.is_none() =>
                    {
                        Vec::new()
                    }
                    Err(e) => return Err(e.into()),
                },
            };
            letters.extend(page);
        }
        Ok(letters)
    }

    /// Applies the request of dead letter `seq` of `partition` again (typically after a fixed
    /// rule was installed): same kind, key, user, payload, and the same id if the client gave
    /// one. `Ok(None)` if there is no such letter. The letter stays, marked with when and what
    /// came of it.
    pub async fn resubmit_dead_letter(
        &self,
        partition: u32,
        seq: u64,
    ) -> Result<Option<Decision>, ServiceError> {
        let letters = self
            .dead_letters(Some(partition), seq.saturating_sub(1), 1)
            .await?;
        let Some(letter) = letters.into_iter().find(|l| l.seq == seq) else {
            return Ok(None);
        };
        let result = self.submit(letter.resubmission()).await;
        let mark = crate::store::Resubmitted::of(&result);
        let marked = match self {
            Service::Local(runtime) => runtime
                .mark_resubmitted(partition, seq, mark)
                .await
                .map_err(ServiceError::from),
            Service::Kafka(node) => node
                .mark_resubmitted(partition, seq, mark)
                .await
                .map_err(ServiceError::from),
        };
        // The answer stands even if the mark cannot be written: it is bookkeeping.
        if let Err(e) = marked {
            tracing::warn!(
                partition,
                seq,
                "could not mark the dead letter resubmitted: {e}"
            );
        }
        Ok(Some(result?))
    }

    /// Installs a rule version (see [`crate::install`]).
    pub async fn install_rule(
        &self,
        bytes: Vec<u8>,
        partitions: Option<&str>,
        label: Option<String>,
    ) -> Result<InstallReport, InstallError> {
        match self {
            Service::Local(runtime) => runtime.install_rule(bytes, partitions, label).await,
            Service::Kafka(node) => node.install_rule(bytes, partitions, label).await,
        }
    }

    /// Undoes the newest install.
    pub async fn rollback_rule(&self) -> Result<InstallReport, InstallError> {
        match self {
            Service::Local(runtime) => runtime.rollback_rule().await,
            Service::Kafka(node) => node.rollback_rule().await,
        }
    }

    /// The version each partition runs, and the history of installs and rollbacks.
    pub fn rules(&self) -> (Vec<String>, Vec<HistoryEntry>) {
        match self {
            Service::Local(runtime) => (runtime.running_versions(), runtime.rule_history()),
            Service::Kafka(node) => (node.running_versions(), node.rule_history()),
        }
    }

    /// What `GET /v1/partitions` shows.
    pub fn partitions_json(&self) -> serde_json::Value {
        let partitioner = self.partitioner();
        match self {
            Service::Local(runtime) => serde_json::json!({
                "count": partitioner.partitions(),
                "hash": partitioner.hash().name(),
                "partitions": runtime.partitions(),
            }),
            Service::Kafka(node) => serde_json::json!({
                "mode": "kafka",
                "node": node.node_id(),
                "reply_partition": node.reply_partition(),
                "routes_partitions_read": node.routes_partitions_read(),
                "cluster": {
                    "state": node.cluster_state().0,
                    "reason": node.cluster_state().1,
                    "group_joined": node.group_joined(),
                },
                "count": partitioner.partitions(),
                "hash": partitioner.hash().name(),
                "partitions": node.owned_partitions(),
                "waiting_on": node.waiting_on(),
            }),
        }
    }

    /// Every metric, in the Prometheus text exposition format.
    pub fn render_metrics(&self) -> String {
        match self {
            Service::Local(runtime) => runtime.render_metrics(),
            Service::Kafka(node) => node.render_metrics(),
        }
    }

    /// Per partition: (id, batches committed, requests queued), for readiness; `None` in Kafka
    /// mode, where partition liveness is the cluster membership's business.
    pub fn partition_progress(&self) -> Option<Vec<crate::runtime::Progress>> {
        match self {
            Service::Local(runtime) => Some(runtime.partition_progress()),
            Service::Kafka(_) => None,
        }
    }

    /// Kafka mode: why this process is not ready (the broker is away or lost the cluster's
    /// data, or the consumer group is still forming); `None` when it serves.
    pub fn cluster_not_ready(&self) -> Option<String> {
        match self {
            Service::Local(_) => None,
            Service::Kafka(node) => node.not_ready(),
        }
    }

    /// Stops the partitions (local) or leaves the cluster (Kafka). Blocks.
    pub fn shutdown(&self) {
        match self {
            Service::Local(runtime) => runtime.shutdown(),
            Service::Kafka(node) => node.shutdown(),
        }
    }
}
