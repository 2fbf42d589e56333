//! Hot reload: which rule version each partition runs, the history of installs, and how a new
//! version reaches the partitions without losing, failing or reordering a request.
//!
//! A new component is compiled and checked off the partition threads (the same checks as at
//! start). Each target partition then gets a `Swap` message through its own queue, so it switches
//! between two requests in its own arrival order: everything queued before the swap is decided by
//! the old version, everything after by the new one. The install answers only once every target
//! partition runs the new version. State and routes are untouched.
//!
//! With a data dir, every version ever installed is kept as `rules/<version>.wasm` and the
//! running versions and history as `rules/installed.json`, so a restart comes back on the
//! versions that were running (they win over `rule.path` and `--rule`, with a warning).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::model::now_ms;
use crate::sandbox::{CompiledRule, LoadError, Sandbox, short_version};

/// Why an install or rollback did not happen (or not everywhere).
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The component would be refused; nothing changed.
    #[error("rule refused: {0}")]
    Refused(#[from] LoadError),
    /// The partition list is malformed or names a partition that does not exist.
    #[error("{0}")]
    BadPartitions(String),
    /// There is no install to roll back.
    #[error("nothing to roll back: no install in the history")]
    NothingToRollBack,
    /// A partition could not switch (it keeps its old version).
    #[error("{0}")]
    SwapFailed(String),
    /// Saving the version or the install record failed; nothing changed.
    #[error("saving the rule: {0}")]
    Persist(String),
}

/// One entry of the install history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// `install` or `rollback`.
    pub action: Action,
    /// The partitions it changed.
    pub partitions: Vec<u32>,
    /// The version each of those partitions runs after it (same order).
    pub versions: Vec<String>,
    /// The version each ran before it (same order): what a rollback restores.
    pub previous: Vec<String>,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// Whether a later rollback undid it.
    pub rolled_back: bool,
    /// The label the install was given (`PUT /v1/admin/rule?label=...`, e.g. a git sha).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// What a history entry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// A new version was installed (`PUT /v1/admin/rule` or the watched file).
    Install,
    /// An install was undone.
    Rollback,
}

/// The result of an install or rollback.
#[derive(Debug, Clone, Serialize)]
pub struct InstallReport {
    /// The partitions that switched.
    pub partitions: Vec<u32>,
    /// The version each runs now (same order).
    pub versions: Vec<String>,
    /// How long each partition's thread was held by the switch, in microseconds (same order).
    pub pause_us: Vec<u64>,
    /// From the request to every partition running it, in milliseconds.
    pub elapsed_ms: f64,
}

/// What `rules/installed.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Installed {
    /// Version per partition.
    running: Vec<String>,
    history: Vec<HistoryEntry>,
}

/// The versions known to this process and which partition runs which.
pub struct RuleRegistry {
    sandbox: Arc<Sandbox>,
    /// `DATA_DIR/rules`, or none for a memory store.
    dir: Option<PathBuf>,
    /// Without a data dir: the bytes of every version added, where `dir` would keep them, so
    /// that an evicted version can be compiled again and a backup can write `rules/`. Costs the
    /// components' sizes (a few hundred KB each for Rust rules).
    kept_bytes: HashMap<String, Arc<[u8]>>,
    compiled: HashMap<String, Arc<CompiledRule>>,
    /// Versions by last use (added, or switched to), oldest first: the idle ones kept compiled
    /// are the newest `rule.max_idle_compiled_versions` of them.
    recent: Vec<String>,
    installed: Installed,
}

/// Compiled rule versions the newest registry keeps in memory (running and idle), for
/// `/metrics`: compiled code is what a version costs (hundreds of MB for a large one).
pub static COMPILED_VERSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl RuleRegistry {
    /// Opens the registry: with saved installs, loads the versions they name; otherwise every
    /// partition runs `initial` (saved, with a data dir). Returns the rule of each partition.
    pub fn open(
        sandbox: Arc<Sandbox>,
        data_dir: Option<&Path>,
        initial: Arc<CompiledRule>,
        initial_bytes: &[u8],
        partitions: u32,
    ) -> anyhow::Result<(RuleRegistry, Vec<Arc<CompiledRule>>)> {
        let dir = data_dir.map(|d| d.join("rules"));
        if let Some(dir) = &dir
            && sandbox.limits().isolation == crate::sandbox::Isolation::WarmInstanceLeaksState
        {
            mark_warm_instances(dir)?;
        }
        let mut registry = RuleRegistry {
            sandbox,
            dir,
            kept_bytes: HashMap::new(),
            compiled: HashMap::new(),
            recent: Vec::new(),
            installed: Installed::default(),
        };
        let saved = match &registry.dir {
            Some(dir) => read_installed(dir)?,
            None => None,
        };
        match saved {
            Some(saved) if saved.running.len() == partitions as usize => {
                for version in &saved.running {
                    if !registry.compiled.contains_key(version) {
                        let path = registry.version_path(version).expect("has a dir");
                        let bytes = std::fs::read(&path)
                            .with_context(|| format!("reading saved rule {}", path.display()))?;
                        let rule = registry
                            .sandbox
                            .compile(&bytes)
                            .with_context(|| format!("loading saved rule {}", path.display()))?;
                        registry.compiled.insert(version.clone(), Arc::new(rule));
                        registry.touch(version);
                    }
                }
                if saved.running.iter().any(|v| *v != initial.version) {
                    tracing::warn!(
                        "the data dir runs rule versions installed through the admin API; the configured rule {} is not used (install it with PUT /v1/admin/rule)",
                        short_version(&initial.version)
                    );
                }
                registry.installed = saved;
            }
            _ => {
                registry.save_version(&initial.version, initial_bytes)?;
                registry.installed.running = vec![initial.version.clone(); partitions as usize];
                registry.touch(&initial.version);
                registry.compiled.insert(initial.version.clone(), initial);
                registry.save_installed()?;
            }
        }
        let rules = registry
            .installed
            .running
            .iter()
            .map(|v| registry.compiled[v].clone())
            .collect();
        registry.evict();
        Ok((registry, rules))
    }

    /// The sandbox rules are compiled in.
    pub fn sandbox(&self) -> &Arc<Sandbox> {
        &self.sandbox
    }

    /// The version each partition runs.
    pub fn running(&self) -> &[String] {
        &self.installed.running
    }

    /// The history of installs and rollbacks, oldest first.
    pub fn history(&self) -> &[HistoryEntry] {
        &self.installed.history
    }

    /// A compiled version, if known.
    pub fn compiled(&self, version: &str) -> Option<Arc<CompiledRule>> {
        self.compiled.get(version).cloned()
    }

    /// Remembers a compiled version and saves its bytes (before any partition runs it, so a
    /// restart can always load what runs).
    pub fn add(&mut self, rule: Arc<CompiledRule>, bytes: &[u8]) -> Result<(), InstallError> {
        self.save_version(&rule.version, bytes)
            .map_err(|e| InstallError::Persist(format!("{e:#}")))?;
        self.insert_compiled(rule);
        Ok(())
    }

    /// Remembers a compiled version whose bytes are already saved (one compiled again after
    /// it was evicted).
    pub fn insert_compiled(&mut self, rule: Arc<CompiledRule>) {
        self.touch(&rule.version);
        self.compiled.insert(rule.version.clone(), rule);
        self.evict();
    }

    /// The saved bytes of a version, to compile it again after it was evicted.
    pub fn saved_bytes(&self, version: &str) -> Option<anyhow::Result<Vec<u8>>> {
        let Some(path) = self.version_path(version) else {
            return self.kept_bytes.get(version).map(|b| Ok(b.to_vec()));
        };
        Some(std::fs::read(&path).with_context(|| format!("reading {}", path.display())))
    }

    /// Writes what `rules/` of a data dir holds for this registry (every version's bytes and
    /// `installed.json`) into `to`, each file synced: a backup's copy, from memory too.
    pub fn write_rules_dir(&self, to: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
        match &self.dir {
            Some(dir) => {
                for entry in
                    std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?
                {
                    let entry = entry?;
                    if entry.file_type()?.is_file() {
                        let bytes = std::fs::read(entry.path())
                            .with_context(|| format!("reading {}", entry.path().display()))?;
                        write_atomically(&to.join(entry.file_name()), &bytes)?;
                    }
                }
            }
            None => {
                for (version, bytes) in &self.kept_bytes {
                    write_atomically(&to.join(format!("{version}.wasm")), bytes)?;
                }
                let text = serde_json::to_vec_pretty(&self.installed)?;
                write_atomically(&to.join("installed.json"), &text)?;
            }
        }
        std::fs::File::open(to)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", to.display()))
    }

    /// Marks `version` as the most recently used.
    fn touch(&mut self, version: &str) {
        self.recent.retain(|v| v != version);
        self.recent.push(version.to_string());
    }

    /// Drops compiled versions no partition runs, beyond the newest
    /// `rule.max_idle_compiled_versions`; a rollback to one compiles it again from the data dir.
    fn evict(&mut self) {
        let running = &self.installed.running;
        let keep_idle = self.sandbox.limits().max_idle_compiled_versions;
        let idle_kept: Vec<String> = self
            .recent
            .iter()
            .rev()
            .filter(|v| !running.contains(v))
            .take(keep_idle)
            .cloned()
            .collect();
        self.compiled
            .retain(|v, _| running.contains(v) || idle_kept.contains(v));
        self.recent.retain(|v| self.compiled.contains_key(v));
        COMPILED_VERSIONS.store(
            self.compiled.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The entry a rollback undoes: the newest install not yet rolled back.
    pub fn last_install(&self) -> Option<(usize, &HistoryEntry)> {
        self.installed
            .history
            .iter()
            .enumerate()
            .rev()
            .find(|(_, e)| e.action == Action::Install && !e.rolled_back)
    }

    /// Records that `partitions` now run `versions`, and saves it.
    pub fn record(
        &mut self,
        action: Action,
        partitions: &[u32],
        versions: &[String],
        undone: Option<usize>,
        label: Option<String>,
    ) -> Result<(), InstallError> {
        // No partition switched: nothing happened, so nothing is recorded (an empty entry
        // would be what the next rollback "undoes", changing nothing).
        if partitions.is_empty() {
            return Ok(());
        }
        let previous = partitions
            .iter()
            .map(|p| self.installed.running[*p as usize].clone())
            .collect();
        for (p, v) in partitions.iter().zip(versions) {
            self.installed.running[*p as usize] = v.clone();
        }
        if let Some(i) = undone {
            self.installed.history[i].rolled_back = true;
        }
        for v in versions {
            self.touch(v);
        }
        self.installed.history.push(HistoryEntry {
            action,
            partitions: partitions.to_vec(),
            versions: versions.to_vec(),
            previous,
            at_ms: now_ms(),
            rolled_back: false,
            label,
        });
        let saved = self
            .save_installed()
            .map_err(|e| InstallError::Persist(format!("{e:#}")));
        self.evict();
        saved
    }

    fn version_path(&self, version: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{version}.wasm")))
    }

    fn save_version(&mut self, version: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let Some(path) = self.version_path(version) else {
            self.kept_bytes
                .entry(version.to_string())
                .or_insert_with(|| bytes.into());
            return Ok(());
        };
        if path.exists() {
            return Ok(());
        }
        write_atomically(&path, bytes)
    }

    fn save_installed(&self) -> anyhow::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let text = serde_json::to_vec_pretty(&self.installed)?;
        write_atomically(&dir.join("installed.json"), &text)
    }
}

/// Name of the file under `rules/` that says this data dir's log was (at least partly) decided by
/// warm instances, whose decisions may depend on earlier requests: replay warns about it.
const WARM_MARKER: &str = "warm-instances.json";

/// Records, once, when this data dir first ran with `rule.isolation = "warm_instance_leaks_state"`.
fn mark_warm_instances(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(WARM_MARKER);
    if path.exists() {
        return Ok(());
    }
    let text = serde_json::to_vec(&serde_json::json!({ "since_ms": now_ms() }))?;
    write_atomically(&path, &text)
}

/// When `data_dir` first ran rules in warm instances (ms since the Unix epoch), if it ever did.
pub fn warm_instances_since(data_dir: &Path) -> Option<u64> {
    let bytes = std::fs::read(data_dir.join("rules").join(WARM_MARKER)).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(value["since_ms"].as_u64().unwrap_or(0))
}

fn read_installed(dir: &Path) -> anyhow::Result<Option<Installed>> {
    let path = dir.join("installed.json");
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes a file so that a crash leaves the old content or the new, never a mix.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = path.parent().expect("a file in a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Parses `?partitions=0,3` against N.
pub fn parse_partitions(text: &str, partitions: u32) -> Result<Vec<u32>, InstallError> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p: u32 = part.parse().map_err(|_| {
            InstallError::BadPartitions(format!("`{part}` is not a partition number"))
        })?;
        if p >= partitions {
            return Err(InstallError::BadPartitions(format!(
                "partition {p} does not exist (there are {partitions})"
            )));
        }
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        return Err(InstallError::BadPartitions(
            "`partitions` names no partition".into(),
        ));
    }
    Ok(out)
}

/// Polls the rule file and installs it on every partition when its content changes. A file that
/// fails to load is logged and ignored: the running version goes on.
///
/// The watched file wins, at start as while running (issue 16): its first look compares it with
/// what the partitions run, so a file replaced while the server was stopped is installed at the
/// next start even when the data dir brought back another version. A removed file is logged once.
pub async fn watch_rule_file(service: crate::service::Service, path: PathBuf, interval: Duration) {
    let mut last_seen: Option<(std::time::SystemTime, u64)> = None;
    let mut missing = false;
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        let meta = match tokio::fs::metadata(&path).await {
            Ok(meta) => meta,
            Err(e) => {
                if !missing {
                    tracing::warn!(
                        path = %path.display(),
                        "watched rule file is gone ({e}); the running version goes on"
                    );
                    missing = true;
                    // When it comes back, whatever it holds is looked at.
                    last_seen = None;
                }
                continue;
            }
        };
        missing = false;
        let stamp = (meta.modified().unwrap_or(std::time::UNIX_EPOCH), meta.len());
        if last_seen == Some(stamp) {
            continue;
        }
        last_seen = Some(stamp);
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(path = %path.display(), "watched rule unreadable: {e}");
                continue;
            }
        };
        if service
            .rules()
            .0
            .iter()
            .all(|v| *v == crate::sandbox::version_id(&bytes))
        {
            continue;
        }
        match service.install_rule(bytes, None, None).await {
            Ok(report) => tracing::info!(
                path = %path.display(),
                version = short_version(&report.versions[0]),
                elapsed_ms = report.elapsed_ms,
                "watched rule changed: installed"
            ),
            Err(e) => tracing::error!(
                path = %path.display(),
                "watched rule changed but was not installed, the running version goes on: {e}"
            ),
        }
    }
}
