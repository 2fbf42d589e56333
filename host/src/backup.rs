//! Online, consistent backup of a running server's partitions (item 11 of issue 12):
//! `POST /v1/admin/backup?out=DIR` starts one, `GET /v1/admin/backup` shows its progress, and
//! `turnstile backup --url URL --out DIR` drives both.
//!
//! Each partition thread, between two batches and after everything queued before the backup was
//! asked for, opens a redb read transaction and hands it over. A read transaction sees exactly
//! the committed batches (a batch is one transaction), so each copy is a batch boundary, and
//! every request answered before the backup started is in it. The copies are made by a backup
//! thread while traffic goes on: writers never wait for it (redb keeps the pages the snapshots
//! see until they are dropped, so the live files may grow during a backup).
//!
//! The output is a complete data dir: the same layout, one new redb file per partition with
//! every table copied record by record (records keep their checksums), the rule registry
//! (`rules/`, copied under the registry's lock together with the snapshots, so the rule versions
//! match the states). Every file is synced, and `turnstile.json` is written last, atomically: a
//! directory without it is an unfinished backup, which `turnstile run` refuses.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use redb::{Database, ReadTransaction, ReadableTable, TableDefinition};
use serde::Serialize;

use crate::model::now_ms;
use crate::store::{self, Layout, StoreError};

/// Records copied per write transaction of the copy: bounds the memory one copy holds.
const RECORDS_PER_COMMIT: u64 = 10_000;

/// What `GET /v1/admin/backup` shows of the last backup of this process.
#[derive(Debug, Clone, Serialize, Default)]
pub struct BackupStatus {
    /// `none` (no backup yet), `running`, `done` or `failed`.
    pub state: &'static str,
    /// The directory written.
    pub out: Option<PathBuf>,
    /// Partitions to copy.
    pub partitions: u32,
    /// Partitions copied and synced.
    pub partitions_done: u32,
    /// Records copied so far, over every table and partition.
    pub records: u64,
    /// Why it failed.
    pub error: Option<String>,
    /// When it started, ms since the Unix epoch.
    pub started_at_ms: Option<u64>,
    /// When it finished, ms since the Unix epoch.
    pub finished_at_ms: Option<u64>,
}

/// The backups of one server: at most one runs at a time.
#[derive(Default)]
pub struct Backups {
    /// The last backup's status, `state` `none` before the first.
    status: Mutex<BackupStatus>,
    /// Records copied by the running backup; read into `status` when shown.
    records: Arc<AtomicU64>,
}

/// Why a backup could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// One is running already.
    #[error("a backup to {0} is running; wait for it (GET /v1/admin/backup)")]
    Running(PathBuf),
    /// The output directory cannot be used.
    #[error("{0}")]
    Invalid(String),
}

/// What a backup needs from the running system: the snapshots, taken under the rule registry's
/// lock with the copy of `rules/`.
pub trait Source: Send + Sync + 'static {
    /// The layout the backup records.
    fn layout(&self) -> Layout;
    /// The data dir, if the server has one (a backup must not go inside it).
    fn data_dir(&self) -> Option<PathBuf>;
    /// Runs `copy_rules` with the rule registry, then takes one snapshot per partition (in
    /// partition order), while no rule install or rollback can run.
    fn snapshots(
        &self,
        copy_rules: &mut dyn FnMut(&crate::reload::RuleRegistry) -> anyhow::Result<()>,
    ) -> anyhow::Result<Vec<ReadTransaction>>;
}

impl Backups {
    /// The last backup's status.
    pub fn status(&self) -> BackupStatus {
        let mut status = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if status.state == "running" {
            status.records = self.records.load(Ordering::Relaxed);
        }
        if status.state.is_empty() {
            status.state = "none";
        }
        status
    }

    /// Starts a backup of `source` into `out` (which must not exist, or be an empty directory)
    /// on its own thread.
    pub fn start(
        self: &Arc<Self>,
        source: Arc<dyn Source>,
        out: PathBuf,
    ) -> Result<BackupStatus, StartError> {
        {
            let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
            if status.state == "running" {
                return Err(StartError::Running(status.out.clone().unwrap_or_default()));
            }
            check_out_dir(&out).map_err(StartError::Invalid)?;
            if let Some(data_dir) = source.data_dir() {
                check_outside(&out, &data_dir).map_err(StartError::Invalid)?;
            }
            let layout = source.layout();
            *status = BackupStatus {
                state: "running",
                out: Some(out.clone()),
                partitions: layout.partitions,
                started_at_ms: Some(now_ms()),
                ..BackupStatus::default()
            };
            self.records.store(0, Ordering::Relaxed);
        }
        let backups = self.clone();
        let thread = std::thread::Builder::new()
            .name("backup".into())
            .spawn(move || {
                let result = backups.run(source.as_ref(), &out);
                let mut status = backups.status.lock().unwrap_or_else(|e| e.into_inner());
                status.records = backups.records.load(Ordering::Relaxed);
                status.finished_at_ms = Some(now_ms());
                match result {
                    Ok(()) => {
                        status.state = "done";
                        tracing::info!(out = %out.display(), records = status.records, "backup done");
                    }
                    Err(e) => {
                        status.state = "failed";
                        status.error = Some(format!("{e:#}"));
                        tracing::error!(out = %out.display(), "backup failed: {e:#}");
                    }
                }
            });
        if let Err(e) = thread {
            let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
            status.state = "failed";
            status.error = Some(format!("starting the backup thread: {e}"));
        }
        Ok(self.status())
    }

    fn run(&self, source: &dyn Source, out: &Path) -> anyhow::Result<()> {
        use anyhow::Context;
        let layout = source.layout();
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let generation = store::generation_dir(out, layout.generation);
        std::fs::create_dir_all(&generation)
            .with_context(|| format!("creating {}", generation.display()))?;
        // From the registry, not from a directory: a server without a data dir has its rule
        // versions in memory only, and its backup must run them too.
        let rules = out.join("rules");
        let mut copy_rules =
            |registry: &crate::reload::RuleRegistry| registry.write_rules_dir(&rules);
        let snapshots = source.snapshots(&mut copy_rules)?;
        tracing::info!(out = %out.display(), partitions = snapshots.len(), "backup: snapshots taken");
        for (partition, snapshot) in snapshots.into_iter().enumerate() {
            let path = store::partition_path(&generation, partition as u32);
            copy_snapshot(snapshot, &path, &self.records)
                .with_context(|| format!("copying partition {partition} to {}", path.display()))?;
            let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
            status.partitions_done += 1;
            tracing::info!(
                partition,
                done = status.partitions_done,
                of = status.partitions,
                records = self.records.load(Ordering::Relaxed),
                "backup: partition copied"
            );
        }
        sync_dir(&generation)?;
        sync_dir(out)?;
        // The commit point: a directory without its layout is an unfinished backup.
        store::write_layout(out, &layout).map_err(anyhow::Error::msg)
    }
}

/// A backup inside the data dir would copy itself (`rules/` into `rules/…`) or sit where the
/// server or `turnstile repartition` writes (a generation directory).
fn check_outside(out: &Path, data_dir: &Path) -> Result<(), String> {
    let resolve = |path: &Path| -> PathBuf {
        // The output may not exist yet: resolve its nearest existing ancestor, keep the rest.
        let mut existing = path.to_path_buf();
        let mut rest = Vec::new();
        while !existing.exists() {
            match (existing.file_name(), existing.parent()) {
                (Some(name), Some(parent)) => {
                    rest.push(name.to_os_string());
                    existing = parent.to_path_buf();
                }
                _ => break,
            }
        }
        let mut resolved = std::fs::canonicalize(&existing).unwrap_or(existing);
        resolved.extend(rest.iter().rev());
        resolved
    };
    let (out_resolved, data_resolved) = (resolve(out), resolve(data_dir));
    if out_resolved.starts_with(&data_resolved) || data_resolved.starts_with(&out_resolved) {
        return Err(format!(
            "{} is inside the data dir {} (or holds it); a backup goes outside the data dir",
            out.display(),
            data_dir.display()
        ));
    }
    Ok(())
}

/// An output directory must not exist yet, or be empty: a backup never mixes with other files.
fn check_out_dir(out: &Path) -> Result<(), String> {
    match std::fs::read_dir(out) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(format!(
                "{} is not empty; a backup goes to a new or empty directory",
                out.display()
            )),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{}: {e}", out.display())),
    }
}

/// Copies every table of `snapshot` into a new redb file at `path`, synced.
pub fn copy_snapshot(
    snapshot: ReadTransaction,
    path: &Path,
    records: &AtomicU64,
) -> anyhow::Result<()> {
    let db = Database::create(path)?;
    copy_table(&snapshot, &db, store::STATES, records)?;
    copy_table(&snapshot, &db, store::ROUTES, records)?;
    copy_table(&snapshot, &db, store::DEDUP, records)?;
    copy_table(&snapshot, &db, store::DEDUP_ORDER, records)?;
    copy_table(&snapshot, &db, store::LOG, records)?;
    copy_table(&snapshot, &db, store::DEAD_LETTERS, records)?;
    copy_table(&snapshot, &db, store::META, records)?;
    copy_table(&snapshot, &db, store::CHECKPOINTS, records)?;
    // The copies above commit without fsync; this empty durable commit syncs all of them.
    let txn = db.begin_write()?;
    txn.commit()?;
    Ok(())
}

fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    snapshot: &ReadTransaction,
    db: &Database,
    definition: TableDefinition<K, V>,
    records: &AtomicU64,
) -> anyhow::Result<()> {
    let source = match snapshot.open_table(definition) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut rows = source.iter()?;
    loop {
        let mut txn = db.begin_write()?;
        txn.set_durability(redb::Durability::None)?;
        let mut copied = 0;
        {
            let mut table = txn.open_table(definition)?;
            while copied < RECORDS_PER_COMMIT {
                let Some(row) = rows.next() else { break };
                let (key, value) = row?;
                table.insert(key.value(), value.value())?;
                copied += 1;
            }
        }
        txn.commit()?;
        records.fetch_add(copied, Ordering::Relaxed);
        if copied < RECORDS_PER_COMMIT {
            return Ok(());
        }
    }
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// A snapshot request failed in a partition.
pub fn snapshot_error(partition: u32, e: StoreError) -> anyhow::Error {
    anyhow::anyhow!("snapshot of partition {partition}: {e}")
}

/// `turnstile backup`: asks the server at `url` for a backup into `out` (a directory on the
/// server's host), then follows it, drawing progress, until it is done.
pub fn run_client(url: &str, out: &Path, token: &str) -> anyhow::Result<BackupStatus> {
    use anyhow::Context;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let base = url.trim_end_matches('/');
        let out_text = out
            .to_str()
            .context("the output directory must be valid UTF-8")?;
        let response = client
            .post(format!("{base}/v1/admin/backup"))
            .query(&[("out", out_text)])
            .bearer_auth(token)
            .send()
            .await
            .with_context(|| format!("asking {base} for a backup"))?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.context("reading the answer")?;
        if !status.is_success() {
            anyhow::bail!("{base} refused the backup ({status}): {}", body["error"]);
        }
        let mut progress = crate::progress::Progress::new("backup");
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let body: serde_json::Value = client
                .get(format!("{base}/v1/admin/backup"))
                .bearer_auth(token)
                .send()
                .await
                .with_context(|| format!("asking {base} how the backup goes"))?
                .json()
                .await
                .context("reading the backup status")?;
            let done = body["partitions_done"].as_u64().unwrap_or(0);
            let total = body["partitions"].as_u64().unwrap_or(0);
            progress.update(done, total);
            match body["state"].as_str() {
                Some("running") => continue,
                Some("done") => {
                    progress.finish();
                    return Ok(serde_json::from_value::<ClientStatus>(body)?.into());
                }
                _ => {
                    progress.finish();
                    anyhow::bail!("the backup failed: {}", body["error"]);
                }
            }
        }
    })
}

/// The status as the client reads it back.
#[derive(serde::Deserialize)]
struct ClientStatus {
    out: Option<PathBuf>,
    partitions: u32,
    partitions_done: u32,
    records: u64,
}

impl From<ClientStatus> for BackupStatus {
    fn from(s: ClientStatus) -> Self {
        BackupStatus {
            state: "done",
            out: s.out,
            partitions: s.partitions,
            partitions_done: s.partitions_done,
            records: s.records,
            ..BackupStatus::default()
        }
    }
}

impl Source for crate::runtime::Runtime {
    fn layout(&self) -> Layout {
        let partitioner = self.partitioner();
        let generation = self
            .data_dir()
            .and_then(|dir| store::read_layout(&dir).ok().flatten())
            .map_or(1, |layout| layout.generation);
        Layout {
            format: store::FORMAT,
            partitions: partitioner.partitions(),
            hash: partitioner.hash(),
            generation,
        }
    }

    fn data_dir(&self) -> Option<PathBuf> {
        match self.location() {
            store::Location::Dir(generation) => generation.parent().map(Path::to_path_buf),
            store::Location::Memory => None,
        }
    }

    fn snapshots(
        &self,
        copy_rules: &mut dyn FnMut(&crate::reload::RuleRegistry) -> anyhow::Result<()>,
    ) -> anyhow::Result<Vec<ReadTransaction>> {
        crate::runtime::Runtime::snapshots(self, copy_rules)
    }
}
