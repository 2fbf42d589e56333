//! `turnstile repartition`: moves a stopped data dir to another number of partitions or another
//! hash, all or nothing.
//!
//! Every record is re-homed to the partition its key has in the new layout: states by key,
//! routes by the key they point to, dedup entries by their decision's key, log entries and dead
//! letters by their request's key (renumbered per new partition, each key's entries kept in their
//! original order). The new files are written into a new generation directory and synced; the
//! counts are checked against what was read; only then is `turnstile.json` replaced (atomically),
//! which is the single commit point. The old generation is deleted after the commit.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use crate::router::{HashKind, Partitioner, Route};
use crate::store::{
    self, DEAD_LETTERS, DEDUP, DEDUP_ORDER, DeadLetter, DedupEntry, LOG, Layout, LogEntry, ROUTES,
    STATES,
};

/// What a repartition moved.
#[derive(Debug, Clone)]
pub struct Report {
    /// The layout before.
    pub old: Layout,
    /// The layout after.
    pub new: Layout,
    /// Keys with a state.
    pub states: u64,
    /// Routes.
    pub routes: u64,
    /// Dedup entries.
    pub dedup: u64,
    /// Log entries.
    pub log: u64,
    /// Dead letters.
    pub dead_letters: u64,
    /// How long it took.
    pub elapsed: Duration,
}

/// Rows bound for each new partition, as (key bytes, value bytes) in the order they must be
/// written; sequence-keyed tables are renumbered on write.
type Rows = Vec<Vec<(Vec<u8>, Vec<u8>)>>;

/// Moves `dir` to `partitions` partitions hashed with `hash`. `progress` gets one line per step.
pub fn repartition(
    dir: &Path,
    partitions: u32,
    hash: HashKind,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<Report> {
    let started = Instant::now();
    ensure!(partitions >= 2, "a layout needs at least 2 partitions");
    let old = store::read_layout(dir)?.with_context(|| {
        format!(
            "{} is not a turnstile data dir (no turnstile.json)",
            dir.display()
        )
    })?;
    if old.partitions == partitions && old.hash == hash {
        bail!(
            "{} already has {partitions} partitions hashed with `{}`; nothing to do",
            dir.display(),
            hash.name()
        );
    }
    let new = Layout {
        format: store::FORMAT,
        partitions,
        hash,
        generation: old.generation + 1,
    };
    let partitioner = Partitioner::new(hash, partitions);
    let home = |key: &str| partitioner.partition(key) as usize;
    let n = partitions as usize;

    let old_dir = store::generation_dir(dir, old.generation);
    let mut olds = Vec::new();
    for p in 0..old.partitions {
        let path = store::partition_path(&old_dir, p);
        // Opening for writing takes redb's lock: a running server holds it. An existing file is
        // opened, never re-created; a missing or empty one stops the repartition.
        let db = store::open_existing(&path)?;
        let damage = store::scan(&db, 5);
        ensure!(
            damage.is_empty(),
            "{} is damaged: {}; nothing was changed ({})",
            path.display(),
            damage
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("; "),
            store::DAMAGE_RECOVERY
        );
        olds.push(db);
    }

    let mut states: Rows = vec![Vec::new(); n];
    let mut routes: Rows = vec![Vec::new(); n];
    let mut dedup: Rows = vec![Vec::new(); n];
    let mut logs: Rows = vec![Vec::new(); n];
    let mut dead: Rows = vec![Vec::new(); n];
    for (p, db) in olds.iter().enumerate() {
        let txn = db.begin_read()?;
        for row in txn.open_table(STATES)?.iter()? {
            let (key, value) = row?;
            states[home(key.value())]
                .push((key.value().as_bytes().to_vec(), value.value().to_vec()));
        }
        for row in txn.open_table(ROUTES)?.iter()? {
            let (user, value) = row?;
            let route: Route = store::decode(user.value(), value.value())?;
            routes[home(&route.key)]
                .push((user.value().as_bytes().to_vec(), value.value().to_vec()));
        }
        let dedup_table = txn.open_table(DEDUP)?;
        for row in txn.open_table(DEDUP_ORDER)?.iter()? {
            let (_, id) = row?;
            let Some(value) = dedup_table.get(id.value())? else {
                continue;
            };
            let entry: DedupEntry = store::decode(id.value(), value.value())?;
            dedup[home(&entry.decision.key)]
                .push((id.value().as_bytes().to_vec(), value.value().to_vec()));
        }
        for row in txn.open_table(LOG)?.iter()? {
            let (seq, value) = row?;
            let entry: LogEntry = store::decode(&seq.value(), value.value())?;
            logs[home(&entry.request.key)].push((Vec::new(), store::encode(&0, &entry)));
        }
        for row in txn.open_table(DEAD_LETTERS)?.iter()? {
            let (seq, value) = row?;
            let letter: DeadLetter = store::decode(&seq.value(), value.value())?;
            dead[home(&letter.request.key)].push((Vec::new(), store::encode(&0, &letter)));
        }
        progress(&format!("read partition {}/{}", p + 1, old.partitions));
    }
    let counted = |rows: &Rows| rows.iter().map(|r| r.len() as u64).sum::<u64>();
    let report = Report {
        states: counted(&states),
        routes: counted(&routes),
        dedup: counted(&dedup),
        log: counted(&logs),
        dead_letters: counted(&dead),
        old: old.clone(),
        new: new.clone(),
        elapsed: Duration::ZERO,
    };
    let expected: u64 = olds
        .iter()
        .map(|db| -> anyhow::Result<u64> {
            let txn = db.begin_read()?;
            Ok(txn.open_table(STATES)?.len()? + txn.open_table(LOG)?.len()?)
        })
        .sum::<anyhow::Result<u64>>()?;
    ensure!(
        expected == report.states + report.log,
        "read {} states and log entries but the files hold {expected}; nothing was changed",
        report.states + report.log
    );

    let new_dir = store::generation_dir(dir, new.generation);
    if new_dir.exists() {
        // Left by an interrupted repartition; never committed, since the layout names the old one.
        std::fs::remove_dir_all(&new_dir)
            .with_context(|| format!("removing the unfinished {}", new_dir.display()))?;
    }
    std::fs::create_dir_all(&new_dir).with_context(|| format!("creating {}", new_dir.display()))?;
    for p in 0..n {
        let path = store::partition_path(&new_dir, p as u32);
        let db = Database::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let txn = db.begin_write()?;
        {
            insert_str(&mut txn.open_table(STATES)?, &states[p])?;
            insert_str(&mut txn.open_table(ROUTES)?, &routes[p])?;
            let mut dedup_table = txn.open_table(DEDUP)?;
            let mut order = txn.open_table(DEDUP_ORDER)?;
            for (seq, (id, value)) in dedup[p].iter().enumerate() {
                let id = std::str::from_utf8(id)?;
                // A retry answers with where the request lives now.
                let mut entry: DedupEntry = store::decode(id, value)?;
                entry.decision.partition = p as u32;
                dedup_table.insert(id, store::encode(id, &entry).as_slice())?;
                order.insert(seq as u64 + 1, id)?;
            }
            let mut log = txn.open_table(LOG)?;
            for (i, (_, value)) in logs[p].iter().enumerate() {
                let mut entry: LogEntry = store::decode(&0, value)?;
                entry.seq = i as u64 + 1;
                log.insert(entry.seq, store::encode(&entry.seq, &entry).as_slice())?;
            }
            let mut dead_letters = txn.open_table(DEAD_LETTERS)?;
            for (i, (_, value)) in dead[p].iter().enumerate() {
                let mut letter: DeadLetter = store::decode(&0, value)?;
                letter.seq = i as u64 + 1;
                letter.partition = p as u32;
                dead_letters.insert(letter.seq, store::encode(&letter.seq, &letter).as_slice())?;
            }
        }
        // Immediate durability (the default): synced when commit returns.
        txn.commit()?;
        progress(&format!("wrote partition {}/{n}", p + 1));
    }
    std::fs::File::open(&new_dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", new_dir.display()))?;
    drop(olds);

    store::write_layout(dir, &new).map_err(anyhow::Error::msg)?;
    progress("switched to the new layout");
    if let Err(e) = std::fs::remove_dir_all(&old_dir) {
        progress(&format!(
            "could not remove the old {}: {e}",
            old_dir.display()
        ));
    }
    Ok(Report {
        elapsed: started.elapsed(),
        ..report
    })
}

fn insert_str(
    table: &mut redb::Table<'_, &'static str, &'static [u8]>,
    rows: &[(Vec<u8>, Vec<u8>)],
) -> anyhow::Result<()> {
    for (key, value) in rows {
        table.insert(std::str::from_utf8(key)?, value.as_slice())?;
    }
    Ok(())
}
