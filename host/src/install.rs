//! Installs and rollbacks of rule versions over the partition threads of either mode: the one
//! path `PUT /v1/admin/rule` and `POST /v1/admin/rule/rollback` take in local mode and in Kafka
//! mode alike.
//!
//! A new component is compiled and checked off the partition threads. Each target partition
//! that has a thread in this process gets a `Swap` message through the same queue as its other
//! control messages, so it switches between two requests; the install answers once every one of
//! them runs the new version, and only then is it recorded. In Kafka mode a target partition
//! that no thread of this process owns has nothing to swap: the recorded version is what a
//! thread starts with when the group gives it the partition.

use std::sync::Arc;

use crossbeam_channel::Sender;
use tokio::sync::oneshot;

use crate::partition::Command;
use crate::reload::{Action, InstallError, InstallReport, RuleRegistry, parse_partitions};
use crate::sandbox::CompiledRule;

/// Where a partition takes control messages in this process.
pub(crate) trait PartitionThreads: Send + Sync {
    /// The control queue of partition `p`'s thread, or `None` when no thread of this process
    /// runs it (Kafka mode: another process owns it).
    fn control(&self, p: u32) -> Option<Sender<Command>>;
}

/// What a switch records in the history.
struct Change {
    action: Action,
    /// The history entry a rollback undoes.
    undone: Option<usize>,
    /// The install's label.
    label: Option<String>,
}

/// The rule versions of a process's partitions and the lock that serializes changing them.
pub(crate) struct RuleControl {
    /// Versions, history, compiled rules; locked only for short bookkeeping.
    registry: std::sync::Mutex<RuleRegistry>,
    /// Serializes installs and rollbacks (held across the swaps, which await).
    install_lock: tokio::sync::Mutex<()>,
    /// N.
    partitions: u32,
}

impl RuleControl {
    pub(crate) fn new(registry: RuleRegistry, partitions: u32) -> RuleControl {
        RuleControl {
            registry: std::sync::Mutex::new(registry),
            install_lock: tokio::sync::Mutex::new(()),
            partitions,
        }
    }

    pub(crate) fn registry(&self) -> std::sync::MutexGuard<'_, RuleRegistry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The compiled rule partition `p` runs (what a thread that takes it starts with).
    pub(crate) fn running_rule(&self, p: u32) -> Option<Arc<CompiledRule>> {
        let registry = self.registry();
        let version = registry.running().get(p as usize)?.clone();
        registry.compiled(&version)
    }

    /// Compiles and checks `bytes` (off the partition threads), then switches `partitions`
    /// (all when `None`, or a canary subset given as `"0,3"`) to it between two requests.
    /// `label` (e.g. a git sha) is kept in the history entry. Installing the version every
    /// target partition already runs changes nothing and adds no history entry.
    pub(crate) async fn install(
        &self,
        threads: &dyn PartitionThreads,
        bytes: Vec<u8>,
        partitions: Option<&str>,
        label: Option<String>,
    ) -> Result<InstallReport, InstallError> {
        let started = std::time::Instant::now();
        let targets = match partitions {
            Some(list) => parse_partitions(list, self.partitions)?,
            None => (0..self.partitions).collect(),
        };
        let _installing = self.install_lock.lock().await;
        let version = crate::sandbox::version_id(&bytes);
        let known = self.registry().compiled(&version);
        let rule = match known {
            Some(rule) => rule,
            None => {
                let sandbox = self.registry().sandbox().clone();
                let compiled = tokio::task::spawn_blocking(move || {
                    sandbox.compile(&bytes).map(|rule| (Arc::new(rule), bytes))
                })
                .await
                .map_err(|e| InstallError::SwapFailed(format!("compiling: {e}")))??;
                let (rule, bytes) = compiled;
                self.registry().add(rule.clone(), &bytes)?;
                rule
            }
        };
        let versions = vec![rule.version.clone(); targets.len()];
        let running = self.registry().running().to_vec();
        if targets.iter().all(|p| running[*p as usize] == rule.version) {
            return Ok(InstallReport {
                pause_us: vec![0; targets.len()],
                partitions: targets,
                versions,
                elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
            });
        }
        let change = Change {
            action: Action::Install,
            undone: None,
            label,
        };
        self.switch(threads, &targets, &versions, change, started)
            .await
    }

    /// Undoes the newest install not yet rolled back: its partitions go back to the versions
    /// they ran before it.
    pub(crate) async fn rollback(
        &self,
        threads: &dyn PartitionThreads,
    ) -> Result<InstallReport, InstallError> {
        let started = std::time::Instant::now();
        let _installing = self.install_lock.lock().await;
        let (index, entry) = {
            let registry = self.registry();
            let (index, entry) = registry
                .last_install()
                .ok_or(InstallError::NothingToRollBack)?;
            (index, entry.clone())
        };
        let change = Change {
            action: Action::Rollback,
            undone: Some(index),
            label: None,
        };
        self.switch(threads, &entry.partitions, &entry.previous, change, started)
            .await
    }

    /// A version compiled: from memory, or (after it was evicted) compiled again off the
    /// partition threads from the bytes saved in the data dir.
    async fn compiled(&self, version: &str) -> Result<Arc<CompiledRule>, InstallError> {
        let (sandbox, bytes) = {
            let registry = self.registry();
            if let Some(rule) = registry.compiled(version) {
                return Ok(rule);
            }
            let bytes = registry
                .saved_bytes(version)
                .ok_or_else(|| {
                    InstallError::SwapFailed(format!(
                        "version {version} was dropped from memory (rule.max_idle_compiled_versions) and there is no data dir to compile it again from"
                    ))
                })?
                .map_err(|e| InstallError::SwapFailed(format!("{e:#}")))?;
            (registry.sandbox().clone(), bytes)
        };
        let rule = tokio::task::spawn_blocking(move || sandbox.compile(&bytes))
            .await
            .map_err(|e| InstallError::SwapFailed(format!("compiling: {e}")))??;
        let rule = Arc::new(rule);
        self.registry().insert_compiled(rule.clone());
        Ok(rule)
    }

    /// Sends a swap to each target partition's thread and waits for all of them.
    async fn switch(
        &self,
        threads: &dyn PartitionThreads,
        targets: &[u32],
        versions: &[String],
        change: Change,
        started: std::time::Instant,
    ) -> Result<InstallReport, InstallError> {
        // Every rule first, so that compiling an evicted one cannot evict another of them.
        let mut rules = Vec::with_capacity(versions.len());
        for version in versions {
            rules.push(self.compiled(version).await?);
        }
        let mut answers = Vec::with_capacity(targets.len());
        for (p, rule) in targets.iter().zip(rules) {
            let Some(sender) = threads.control(*p) else {
                // No thread here runs it: the recorded version is what one starts with.
                answers.push(None);
                continue;
            };
            let (reply, answer) = oneshot::channel();
            // The swap must queue behind the requests already accepted, so it waits for room
            // rather than fail: a reload never turns into a lost request or a refused swap.
            let queued = tokio::task::spawn_blocking(move || {
                sender
                    .send_timeout(
                        Command::Swap { rule, reply },
                        std::time::Duration::from_secs(30),
                    )
                    .is_ok()
            })
            .await
            .map_err(|e| InstallError::SwapFailed(format!("partition {p}: {e}")))?;
            if !queued {
                return Err(InstallError::SwapFailed(format!(
                    "partition {p} did not take the swap within 30 s (stopped or stuck)"
                )));
            }
            answers.push(Some(answer));
        }
        let mut pause_us = Vec::with_capacity(targets.len());
        let mut switched = Vec::with_capacity(targets.len());
        let mut failures = Vec::new();
        for ((p, version), answer) in targets.iter().zip(versions).zip(answers) {
            let Some(answer) = answer else {
                pause_us.push(0);
                switched.push((*p, version.clone()));
                continue;
            };
            match answer.await {
                Ok(Ok(pause)) => {
                    pause_us.push(pause.as_micros() as u64);
                    switched.push((*p, version.clone()));
                }
                Ok(Err(e)) => failures.push(format!("partition {p}: {e}")),
                Err(_) => failures.push(format!("partition {p}: stopped")),
            }
        }
        let (partitions, versions): (Vec<u32>, Vec<String>) = switched.into_iter().unzip();
        self.registry().record(
            change.action,
            &partitions,
            &versions,
            change.undone,
            change.label,
        )?;
        if !failures.is_empty() {
            return Err(InstallError::SwapFailed(format!(
                "some partitions kept their old version: {}",
                failures.join("; ")
            )));
        }
        Ok(InstallReport {
            partitions,
            versions,
            pause_us,
            elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
        })
    }
}
